"""tessel.compress on one worker: orthogonalize_, the fused passes against
their reference, PowerSGD / LASER / Z-SGD steps and their state."""
import math

import pytest
import torch
from conftest import error_vs

import tessel
from tessel import compress
from tessel._compress_passes import CppOps, Group, ReferenceOps
from tessel.compress import Laser, NoisyChannel, PowerSGD, ZSGD

KERNEL_OPS = [("cpp", CppOps)]
try:
    import triton  # noqa: F401

    KERNEL_OPS.append(("triton", None))
except ImportError:
    pass


def kernel_ops(name):
    if name == "cpp":
        return CppOps()
    return tessel._dispatch.triton_module("compress").CompressOps()


# ---------------------------------------------------------------- orthogonalize_


@pytest.mark.parametrize("backend", ["cpp", "reference"] + (["triton"] if len(KERNEL_OPS) > 1 else []))
@pytest.mark.parametrize("shape", [(768, 4), (3, 100, 1), (64, 50, 7), (16, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orthogonalize_gives_orthonormal_columns(backend, shape, dtype):
    tessel.set_backend(backend)
    M = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    before = M.clone()
    out = compress.orthogonalize_(M, eps=0.0)  # the default eps shortens each column by ~eps / norm
    assert out is M
    eye = torch.eye(shape[-1], dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 or backend == "triton" else 1e-12  # triton computes in float32
    assert error_vs(M.mT @ M, eye.expand_as(M.mT @ M)) < tol
    # Same span: the first column keeps its direction.
    first = before[..., :, :1] / before[..., :, :1].norm(dim=-2, keepdim=True)
    assert error_vs(M[..., :, :1], first) < 100 * tol


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_orthogonalize_rank_deficient_stays_finite(backend):
    tessel.set_backend(backend)
    M = torch.randn(4, 32, 5, generator=torch.Generator().manual_seed(1))
    M[:, :, 2] = 0
    M[:, :, 4] = M[:, :, 0] * 3  # dependent on an earlier column
    compress.orthogonalize_(M, eps=1e-8)
    assert torch.isfinite(M).all()
    assert M[:, :, 2].abs().max() == 0
    kept = M[:, :, [0, 1, 3]]
    assert error_vs(kept.mT @ kept, torch.eye(3).expand(4, 3, 3)) < 1e-5


@pytest.mark.parametrize("backend", ["cpp"] + (["triton"] if len(KERNEL_OPS) > 1 else []))
def test_orthogonalize_in_place_is_seen_by_autograd(backend):
    # The kernels write through numpy views or Triton pointers: the op itself bumps M's version counter.
    tessel.set_backend(backend)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    M = x * 1
    saved_by_square = (M * M).sum()
    version = M._version
    compress.orthogonalize_(M)
    assert M._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_by_square.backward()


def test_orthogonalize_half_and_bad_input():
    M = torch.randn(40, 3, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    compress.orthogonalize_(M)
    assert M.dtype == torch.bfloat16
    assert error_vs((M.float().T @ M.float()), torch.eye(3)) < 3e-2
    with pytest.raises(ValueError, match=r"M must have shape \(m, r\) or \(batch, m, r\)"):
        compress.orthogonalize_(torch.zeros(5))
    with pytest.raises(TypeError, match="M must be float16"):
        compress.orthogonalize_(torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="M must not be empty"):
        compress.orthogonalize_(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="eps must be"):
        compress.orthogonalize_(torch.zeros(5, 2), eps=-1.0)


# ---------------------------------------------------------------- the fused passes


PASS_SHAPES = [(10, 40), (33, 600), (130, 9)]
# Rows over several partial sums of the C++ Q pass, with a tail, and factor lines past L1 (rows in pairs):
# too slow for the Triton interpreter.
LARGE_PASS_SHAPES = PASS_SHAPES + [(517, 1100)]


def _group(r, dtype, shapes=PASS_SHAPES):
    with_error = [i % 3 != 1 for i in range(len(shapes))]
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, m, generator=gen, dtype=dtype) for n, m in shapes]
    errors = [torch.randn(n, m, generator=gen, dtype=dtype) if e else None for (n, m), e in zip(shapes, with_error)]
    group = Group(grads, errors, r)
    P = torch.randn(group.p_size, generator=gen, dtype=dtype)
    Q = torch.randn(group.q_size, generator=gen, dtype=dtype)
    return group, P, Q


def _run_passes(ops, r, dtype, shapes):
    group, P, Q = _group(r, dtype, shapes)
    ops.project(group, P, Q, onto_p=True)
    p1 = P.clone()
    ops.project(group, P, Q, onto_p=False)
    q1 = Q.clone()
    ops.reconstruct(group, P, Q, P * 0.5, Q, torch.ones(1, dtype=torch.bool))
    grads = [g.clone() for g in group.grads]
    errors = [e.clone() for e in group.errors if e is not None]
    ops.orthonormalize(P, group.p_offsets, group.ns, r, 1e-8)
    return [p1, q1, *grads, *errors, P]


@pytest.mark.parametrize("ops_name", [name for name, _ in KERNEL_OPS])
@pytest.mark.parametrize("rank", [1, 4, 9])
def test_fused_passes_match_reference(ops_name, rank):
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-11)):
        if ops_name == "triton" and dtype == torch.float64:
            continue
        shapes = PASS_SHAPES if ops_name == "triton" else LARGE_PASS_SHAPES
        ours = _run_passes(kernel_ops(ops_name), rank, dtype, shapes)
        ref = _run_passes(ReferenceOps(), rank, dtype, shapes)
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert error_vs(a, b) <= tol * max(1.0, b.abs().max().item()), (i, dtype)


def test_cpp_passes_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_run_passes(CppOps(), 4, torch.float32, LARGE_PASS_SHAPES))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


# ---------------------------------------------------------------- PowerSGD


def _grad(n, m, seed=0, dtype=torch.float64):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("alternate", [False, True])
def test_full_rank_step_reconstructs_the_gradient(alternate):
    comp = PowerSGD(rank=64, min_compression_rate=0.0, alternate=alternate)
    g = _grad(40, 24)
    P, Q = comp.compress("w", g)
    assert P.shape == (40, 24) and Q.shape == (24, 24)
    assert error_vs(comp.decompress(P, Q), g) < 1e-10
    assert comp._tensors["w"].error.abs().max() < 1e-10


@pytest.mark.parametrize("alternate", [False, True])
def test_error_buffer_holds_what_was_not_sent(alternate):
    comp = PowerSGD(rank=2, alternate=alternate)
    error = torch.zeros(30, 50, dtype=torch.float64)
    for step in range(4):
        g = _grad(30, 50, seed=step)
        P, Q = comp.compress("w", g)
        sent = comp.decompress(P, Q)
        # Each step: M = grad + previous error = what was sent + the new error.
        assert error_vs(sent + comp._tensors["w"].error, g + error) < 1e-10
        assert torch.linalg.matrix_rank(sent) <= 2
        error = comp._tensors["w"].error.clone()


def test_small_tensors_pass_uncompressed_and_shapes_reshape():
    comp = PowerSGD(rank=4)
    bias = torch.randn(64)
    P, Q = comp.compress("b", bias)
    assert Q is None and torch.equal(P, bias)
    conv = torch.randn(64, 32, 3, 3, dtype=torch.float64)
    P, Q = comp.compress("conv", conv)
    assert P.shape == (64, 4) and Q.shape == (288, 4)
    assert comp.decompress(P, Q, conv.shape).shape == conv.shape
    assert not comp.compressible(torch.zeros(8, 8))  # (8 + 8) * 4 * 2 >= 64


def test_reduce_in_place_matches_the_reference_backend():
    grads = [("a", _grad(64, 96, 1)), ("b", torch.randn(96, dtype=torch.float64)), ("c", _grad(50, 200, 2))]
    results = {}
    for backend in ("cpp", "reference"):
        tessel.set_backend(backend)
        comp = PowerSGD(rank=3)
        outs = []
        for step in range(3):
            work = [(n, g.clone() * (step + 1)) for n, g in grads]
            comp.reduce(work)
            outs.append([g for _, g in work])
        results[backend] = outs
    for a_step, b_step in zip(results["cpp"], results["reference"]):
        for a, b in zip(a_step, b_step):
            assert error_vs(a, b) < 1e-9


def test_warm_start_off_draws_a_fresh_q_each_step():
    a, b = PowerSGD(rank=2, warm_start=False), PowerSGD(rank=2, warm_start=False)
    g = _grad(30, 40)
    for _ in range(2):
        pa, qa = a.compress("w", g)
        pb, qb = b.compress("w", g)
        assert torch.equal(pa, pb) and torch.equal(qa, qb)  # same seed: same draws


@pytest.mark.parametrize("make", [lambda: PowerSGD(rank=2, alternate=True), lambda: Laser(rank=2, power=10.0),
                                  lambda: ZSGD(power=5.0)])
def test_state_dict_round_trip_resumes_bit_for_bit(make):
    grads = [_grad(30, 40, s) for s in range(6)]
    straight = make()
    expected = []
    for g in grads:
        work = [("w", g.clone()), ("b", g[0].clone())]
        straight.reduce(work)
        expected.append(work)
    first = make()
    for g in grads[:3]:
        first.reduce([("w", g.clone()), ("b", g[0].clone())])
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for g, exp in zip(grads[3:], expected[3:]):
        work = [("w", g.clone()), ("b", g[0].clone())]
        resumed.reduce(work)
        for (_, a), (_, b) in zip(work, exp):
            assert torch.equal(a, b)


def test_nonfinite_gradient_raises_or_skips_without_touching_state():
    comp = PowerSGD(rank=2)
    comp.reduce([("w", _grad(30, 40))])
    before = comp._tensors["w"].error.clone()
    bad = _grad(30, 40, 1)
    bad[3, 4] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite gradient in w"):
        comp.reduce([("w", bad.clone()), ("b", torch.ones(3, dtype=torch.float64))])
    assert torch.equal(comp._tensors["w"].error, before)
    skipper = PowerSGD(rank=2, on_nonfinite="skip")
    work = [("w", bad.clone()), ("b", torch.ones(3, dtype=torch.float64))]
    assert skipper.reduce(work) is False
    assert all(g.abs().sum() == 0 for _, g in work) and skipper.skipped_steps == 1
    inf_bias = [("w", _grad(30, 40)), ("b", torch.tensor([1.0, math.inf], dtype=torch.float64))]
    with pytest.raises(FloatingPointError, match="in b"):
        PowerSGD(rank=2).reduce(inf_bias)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        PowerSGD(rank=0)
    with pytest.raises(ValueError, match="alternate=True needs warm_start=True"):
        PowerSGD(alternate=True, warm_start=False)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        PowerSGD(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="power must be a finite number > 0"):
        Laser(power=-1.0)
    with pytest.raises(ValueError, match="power_allocation must be one of"):
        ZSGD(power=1.0, power_allocation="column")
    for comp in (PowerSGD(rank=2), Laser(rank=2, power=1.0), ZSGD(power=1.0)):
        with pytest.raises(TypeError, match="name must be a str"):
            comp.compress(3, torch.randn(20, 30))
        with pytest.raises(TypeError, match="gradient 'w' must be a torch.Tensor"):
            comp.compress("w", [[1.0, 2.0]])
        for dtype in (torch.int32, torch.complex64):
            with pytest.raises(TypeError, match=f"gradient 'w' must be float16, .* got {dtype}"):
                comp.compress("w", torch.ones(20, 30, dtype=dtype))
        assert comp.iteration == 0  # nothing was taken


# ---------------------------------------------------------------- the noisy channel


class _FakeComm:
    """n identical workers: sums multiply by n, maxima stay."""

    def __init__(self, n):
        self.world_size = n

    def sum_(self, t):
        t.mul_(self.world_size)

    def max_(self, t):
        pass


def test_noisy_channel_noise_matches_the_power_budget():
    channel = NoisyChannel(power=4.0, power_allocation="uniform", seed=0)
    signal = torch.zeros(200_000, dtype=torch.float64)
    signal[0] = 3.0  # norm c = 3
    received = signal.clone()
    channel.average_([received], _FakeComm(2), torch.ones(1, dtype=torch.bool))
    noise = received - signal
    # s = c / (n sqrt(p)) = 3 / (2 * 2)
    assert abs(noise[1:].std().item() - 0.75) < 0.01
    # Norm allocation: a tensor with twice the norm gets twice the power.
    std = NoisyChannel(power=3.0).noise_std(torch.tensor([1.0, 2.0], dtype=torch.float64), 1)
    # (c_t: 1 and 2, so p_t = 1 and 2)
    assert torch.allclose(std, torch.tensor([1.0, 2.0], dtype=torch.float64) / torch.tensor([1.0, 2.0]).sqrt())


def test_column_allocation_splits_a_factors_power_over_its_vectors():
    channel = NoisyChannel(power=4.0, seed=1, column_exponent=1.0)
    factor = torch.zeros(3, 200_000, dtype=torch.float64)
    factor[0, 0], factor[1, 0] = 3.0, 1.0  # vector norms 3, 1 and 0
    received = factor.clone()
    channel.average_([received], _FakeComm(1), torch.ones(1, dtype=torch.bool), ["f"], 0, factors=1)
    noise = (received - factor)[:, 1:].std(dim=1)
    # shares 3/4, 1/4, 0 of p = 4: std = c_j / sqrt(p_j) = 3 / sqrt(3), 1 / 1, and none for the zero vector
    assert abs(noise[0].item() - math.sqrt(3)) < 0.02 and abs(noise[1].item() - 1.0) < 0.02
    assert noise[2].item() == 0


def test_laser_without_noise_is_alternating_powersgd_and_noise_shrinks_with_power():
    grads = [_grad(40, 60, s) for s in range(4)]

    def run(comp):
        outs = []
        for g in grads:
            work = [("w", g.clone())]
            comp.reduce(work)
            outs.append(work[0][1])
        return outs

    for a, b in zip(run(Laser(rank=3)), run(PowerSGD(rank=3, alternate=True))):
        assert torch.equal(a, b)
    clean = run(Laser(rank=3))
    errs = [sum(error_vs(a, b) for a, b in zip(run(Laser(rank=3, power=p)), clean)) for p in (1.0, 100.0, 1e4)]
    assert errs[0] > errs[1] > errs[2] > 0


def test_orthogonalize_under_torch_compile():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(M):
        compress.orthogonalize_(M)
        return M * 2

    M = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(f(M.clone()), compress.orthogonalize_(M.clone()) * 2)


@pytest.mark.skipif(len(KERNEL_OPS) < 2, reason="needs triton")
@pytest.mark.parametrize("alternate", [False, True])
def test_reduce_on_the_triton_passes_matches_cpp(alternate):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # else the interpreter (conftest)
    gen = torch.Generator().manual_seed(5)
    grads = [("a", torch.randn(40, 60, generator=gen)), ("b", torch.randn(60, generator=gen)),
             ("c", torch.randn(33, 70, generator=gen))]
    results = {}
    for backend in ("cpp", "triton"):
        tessel.set_backend(backend)
        comp = PowerSGD(rank=3, alternate=alternate)
        outs = []
        for _ in range(3):
            work = [(n, g.clone().to(device if backend == "triton" else "cpu")) for n, g in grads]
            comp.reduce(work)
            outs.append([g.cpu() for _, g in work])
        results[backend] = outs
    for a_step, b_step in zip(results["cpp"], results["triton"]):
        for a, b in zip(a_step, b_step):
            assert error_vs(a, b) < 1e-4
