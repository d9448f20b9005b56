"""tessel.compress under hostile use: state from other dtypes, layouts,
shapes and ranks, non-finite and rank-deficient gradients, extreme norms, and
C++ bindings handed the wrong buffers. The cases that once corrupted the heap
run in a subprocess, so an abort fails one test, not the suite."""
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import error_vs

import tessel
from tessel import compress
from tessel.compress import Laser, PowerSGD, ZSGD

BACKENDS = ["cpp", "reference"]
try:
    import triton  # noqa: F401

    BACKENDS.append("triton")
except ImportError:
    pass


def _grad(n, m, seed=0, dtype=torch.float32):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _in_subprocess(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


# ---------------------------------------------------------------- state of another dtype or layout


def test_a_float64_gradient_after_float32_state_is_computed_in_float64():
    out = _in_subprocess("""
        import torch
        from tessel.compress import PowerSGD
        g = torch.randn(30, 40, generator=torch.Generator().manual_seed(0))
        comp = PowerSGD(rank=2)
        comp.compress("w", g)
        P, Q = comp.compress("w", g.double())
        assert P.dtype == Q.dtype == torch.float64, (P.dtype, Q.dtype)
        assert comp._tensors["w"].error.dtype == torch.float64
        assert torch.isfinite(P).all() and torch.isfinite(Q).all()
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.parametrize("cast", ["half", "float64", "transposed"])
def test_checkpointed_error_buffers_of_another_dtype_or_layout_resume_like_the_original(cast):
    out = _in_subprocess(f"""
        import torch
        from tessel.compress import PowerSGD
        grads = [torch.randn(30, 40, generator=torch.Generator().manual_seed(s)) for s in range(4)]
        straight = PowerSGD(rank=2)
        for g in grads[:2]:
            straight.compress("w", g)
        state = straight.state_dict()
        error = state["tensors"]["w"]["error"]
        state["tensors"]["w"]["error"] = {{"half": error.half(), "float64": error.double(),
                                          "transposed": error.T.contiguous().T}}["{cast}"]
        resumed = PowerSGD(rank=2)
        resumed.load_state_dict(state)
        for g in grads[2:]:
            a, b = straight.decompress(*straight.compress("w", g)), resumed.decompress(*resumed.compress("w", g))
            tol = 1e-2 if "{cast}" == "half" else 1e-5
            assert (a - b).abs().max() <= tol * a.abs().max(), (a - b).abs().max()
        print("ok")
    """)
    assert out.strip() == "ok"


def test_float32_checkpoint_resumed_with_float64_gradients():
    out = _in_subprocess("""
        import torch
        from tessel.compress import Laser
        g = torch.randn(30, 40, generator=torch.Generator().manual_seed(0))
        first = Laser(rank=2)
        first.compress("w", g)
        second = Laser(rank=2)
        second.load_state_dict(first.state_dict())
        P, Q = second.compress("w", g.double())
        assert P.dtype == torch.float64 and torch.isfinite(P).all() and torch.isfinite(Q).all()
        print("ok")
    """)
    assert out.strip() == "ok"


# ---------------------------------------------------------------- state that does not fit


def test_load_state_dict_rejects_states_that_do_not_fit():
    comp = PowerSGD(rank=2)
    comp.compress("w", _grad(30, 40))
    good = comp.state_dict()

    def bad(**fields):
        state = {**good, "tensors": {"w": {**good["tensors"]["w"], **fields}}}
        with pytest.raises(ValueError, match=r"state\['tensors'\]\['w'\]"):
            PowerSGD(rank=2).load_state_dict(state)

    bad(q=torch.zeros(2, 41))  # q's columns do not fit the error's
    bad(q=torch.zeros(4, 40))  # another rank
    bad(error="not a tensor")
    bad(error=torch.zeros(30))
    bad(error=torch.full((30, 40), math.nan))
    bad(steps=-1)
    bad(phase=2)
    with pytest.raises(ValueError, match=r"shapes .* do not fit .* rank 4"):
        PowerSGD(rank=4).load_state_dict(good)  # a rank-2 state into a rank-4 compressor
    with pytest.raises(ValueError, match=r"state\['iteration'\]"):
        PowerSGD(rank=2).load_state_dict({**good, "iteration": "3"})
    with pytest.raises(ValueError, match=r"state\['tensors'\] must be a dict"):
        PowerSGD(rank=2).load_state_dict({**good, "tensors": None})


def test_a_state_whose_shape_does_not_fit_the_gradient_raises_naming_it():
    comp = PowerSGD(rank=2)
    comp.compress("w", _grad(30, 40))
    with pytest.raises(ValueError, match=r"compression state of 'w': error has shape \(30, 40\)"):
        comp.compress("w", _grad(31, 40))


# ---------------------------------------------------------------- steps, skips, odd inputs


def test_compress_advances_the_step():
    comp = PowerSGD(rank=2, start_iter=2)
    g = _grad(30, 40)
    assert comp.compress("w", g)[1] is None and comp.compress("w", g)[1] is None  # warm-up: uncompressed
    assert comp.compress("w", g)[1] is not None and comp.iteration == 3
    laser = Laser(rank=2, power=10.0)
    first, second = laser.compress("w", g), laser.compress("w", g)
    assert not torch.equal(first[0], second[0])  # the noise key moves with the step


def test_a_skipped_compress_returns_zero_factors_and_leaves_the_input_alone():
    comp = PowerSGD(rank=2, on_nonfinite="skip")
    comp.compress("w", _grad(30, 40))
    error = comp._tensors["w"].error.clone()
    g = _grad(30, 40, 1)
    g[2, 3] = math.inf
    before = g.clone()
    P, Q = comp.compress("w", g)
    assert P.shape == (30, 2) and Q.shape == (40, 2)
    assert P.abs().sum() == 0 and Q.abs().sum() == 0
    assert torch.equal(g, before) and torch.equal(comp._tensors["w"].error, error)
    assert comp.skipped_steps == 1
    vec, none = comp.compress("b", torch.tensor([1.0, math.nan]))
    assert none is None and vec.abs().sum() == 0


def test_empty_dims_duplicate_names_and_bad_epsilon():
    comp = PowerSGD(rank=2)
    g = torch.zeros(0, 7)
    out, none = comp.compress("empty", g)
    assert none is None and out.shape == (0, 7)
    with pytest.raises(ValueError, match="duplicate name"):
        comp.reduce([("w", _grad(30, 40)), ("w", _grad(30, 40))])
    for eps in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match="orthogonalization_epsilon must be a finite number >= 0"):
            PowerSGD(orthogonalization_epsilon=eps)
    with pytest.raises(ValueError, match="min_compression_rate"):
        PowerSGD(min_compression_rate=math.nan)


def test_the_step_recovers_after_an_error_part_way():
    comp = PowerSGD(rank=2)
    with pytest.raises(ValueError, match="duplicate name"):
        comp.reduce([("w", _grad(30, 40)), ("w", _grad(30, 40))])
    assert comp.reduce([("w", _grad(30, 40))]) and comp.iteration == 1


# ---------------------------------------------------------------- rank deficiency and extreme norms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("true_rank", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rank_r_compressor_reconstructs_gradients_of_rank_up_to_r(backend, true_rank, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton passes compute in float32")
    tessel.set_backend(backend)
    gen = torch.Generator().manual_seed(true_rank)
    n, m = (24, 40) if backend == "triton" else (96, 150)
    g = (torch.randn(n, true_rank, generator=gen, dtype=dtype) @ torch.randn(true_rank, m, generator=gen,
                                                                             dtype=dtype))
    comp = PowerSGD(rank=4, error_feedback=False)
    approx = comp.decompress(*comp.compress("w", g))
    assert error_vs(approx, g) / g.abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e25, 1e-25, 1e-40])
def test_orthogonalize_survives_extreme_column_norms(backend, scale):
    tessel.set_backend(backend)
    M = torch.randn(64, 3, generator=torch.Generator().manual_seed(5)) * scale
    assert torch.isfinite(M).all() and (M != 0).any()
    compress.orthogonalize_(M, eps=0.0)
    assert torch.isfinite(M).all()
    assert error_vs(M.T @ M, torch.eye(3)) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_orthogonalize_keeps_nan_visible(backend):
    tessel.set_backend(backend)
    M = torch.randn(16, 2, generator=torch.Generator().manual_seed(6))
    M[3, 0] = math.nan
    compress.orthogonalize_(M)
    assert torch.isnan(M[:, 0]).all()


# ---------------------------------------------------------------- the C++ bindings check what they are handed


def _np(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("call", [
    lambda C: C.compress_project([_np(4, 5)], [_np(4, 5, dtype=np.float64)], _np(8), _np(10), 2, True, 1),
    lambda C: C.compress_project([_np(4, 5)], [None], _np(7), _np(10), 2, True, 1),
    lambda C: C.compress_project([_np(4, 5).T], [None], _np(10), _np(8), 2, True, 1),
    lambda C: C.compress_project([[0.0] * 5] * 4, [None], _np(8), _np(10), 2, True, 1),
    lambda C: C.compress_reconstruct([_np(4, 5)], [None], _np(8), _np(10), _np(8), _np(10), _np(1), 2, 1),
    lambda C: C.orthonormalize(_np(10), np.array([4], dtype=np.int64), np.array([4], dtype=np.int64), 2, 0, 1,
                               0.0, 1),
    lambda C: C.looped_forward(_np(2, 3, 5), _np(1, 1, 3, 3), _np(1, 1, 3, 3), _np(2, 3, 5), _np(1, 2, 3, 5),
                               4, 4, 0.25, 1, 1),
    lambda C: C.looped_forward(_np(2, 3, 5), _np(2, 1, 3, 3), _np(2, 1, 3, 3), _np(2, 3, 5), _np(4, 2, 3, 5),
                               4, 4, 0.25, 1, 1),
])
def test_cpp_bindings_raise_on_buffers_that_do_not_fit(call):
    with pytest.raises(RuntimeError, match="internal check failed"):
        call(tessel._dispatch.cpp_module())


def test_a_read_only_output_is_refused():
    out = _np(2, 3, 5)
    out.setflags(write=False)
    with pytest.raises(RuntimeError, match="out must be writable"):
        tessel._dispatch.cpp_module().looped_forward(_np(2, 3, 5), _np(1, 1, 3, 3), _np(1, 1, 3, 3), out,
                                                     _np(2, 2, 3, 5), 4, 4, 0.25, 2, 1)


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _segments(*rows):
    """Attention segments (q_start, len_q, k_start, len_k, band_lo, band_hi); default: one over 3 x 3."""
    return torch.tensor(rows or [(0, 3, 0, 3, -10, 10)], dtype=torch.int64)


_ops = torch.ops.tessel


@pytest.mark.parametrize("call", [
    lambda: _ops.attention_fwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4, dtype=torch.float64), _t(1, 2, 3, 4), 1.0, -9, 9,
                               "cpp"),
    lambda: _ops.attention_fwd(_t(1, 3, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4), 1.0, -9, 9, "cpp"),
    lambda: _ops.attention_fwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 5), 1.0, -9, 9, "cpp"),
    lambda: _ops.attention_fwd(_t(2, 3, 4), _t(2, 3, 4), _t(2, 3, 4), 1.0, -9, 9, "cpp"),
    lambda: _ops.attention_bwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 4),
                               _t(1, 2, 2), None, 1.0, -9, 9, "cpp"),
    lambda: _ops.attention_varlen_fwd(_t(3, 2, 4), _t(3, 2, 4), _t(3, 2, 4), _segments((0, 2, 0, 3, 0, 0)), 3, 3,
                                      1.0, "cpp"),
    lambda: _ops.attention_varlen_fwd(_t(3, 2, 4), _t(3, 2, 4), _t(3, 2, 4),
                                      _segments((0, 2, 0, 2, 0, 0), (1, 1, 2, 1, 0, 0)), 3, 3, 1.0, "cpp"),
    lambda: _ops.attention_varlen_fwd(_t(3, 2, 4), _t(3, 2, 4), _t(3, 2, 4), _segments((0, 4, 0, -1, 0, 0)), 4, 4,
                                      1.0, "cpp"),
    lambda: _ops.attention_varlen_fwd(_t(3, 2, 4), _t(3, 2, 4), _t(3, 2, 4), _segments().int(), 3, 3, 1.0, "cpp"),
    # Linear attention: q (1, 2, 3, 4), k (1, 2, 3, 4), v (1, 2, 3, 6) fit; each case breaks one thing.
    lambda: _ops.linear_attention_fwd(_t(1, 2, 3, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 6), None, None, 1.0, True, "cpp"),
    lambda: _ops.linear_attention_fwd(_t(1, 3, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 6), None, None, 1.0, True, "cpp"),
    lambda: _ops.linear_attention_fwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 4, 6), None, None, 1.0, True, "cpp"),
    lambda: _ops.linear_attention_fwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 6), _t(1, 2, 4, 5), None, 1.0,
                                      True, "cpp"),
    lambda: _ops.linear_attention_fwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 6), None,
                                      torch.tensor([0, 2, 4]), 1.0, True, "cpp"),
    lambda: _ops.linear_attention_fwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 6), None,
                                      torch.tensor([0, 2, 1, 3]), 1.0, True, "cpp"),
    lambda: _ops.linear_attention_fwd(_t(2, 2, 3, 4), _t(2, 2, 3, 4), _t(2, 2, 3, 6), None, torch.tensor([0, 3]),
                                      1.0, True, "cpp"),
    lambda: _ops.linear_attention_fwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 6), None,
                                      torch.tensor([0.0, 3.0]), 1.0, True, "cpp"),
    lambda: _ops.linear_attention_bwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 6), None, None, _t(1, 2, 4, 6),
                                      _t(1, 2, 3, 4), None, 1.0, True, "cpp"),
    lambda: _ops.linear_attention_bwd(_t(1, 2, 3, 4), _t(1, 2, 3, 4), _t(1, 2, 3, 6), None, None, _t(1, 2, 6, 4),
                                      _t(1, 2, 3, 6), None, 1.0, True, "cpp"),
])
def test_cpp_ops_raise_on_tensors_that_do_not_fit(call):
    with pytest.raises(RuntimeError, match="internal check failed"):
        call()


def test_zsgd_compress_advances_and_averages():
    comp = ZSGD(power=None)
    out, none = comp.compress("w", _grad(3, 4))
    assert none is None and torch.equal(out, _grad(3, 4)) and comp.iteration == 1
