"""Seeded property-based sweeps, 500 cases per family, over shapes, strides,
dtypes, GQA ratios, states and non-finite values: every case is compared with
the family's reference (non-finite where the reference is non-finite), and
none may crash. (Attention has its own sweep in test_attention_sweep.py.)"""
import io
import math

import pytest
import torch
from conftest import error_vs

hypothesis = pytest.importorskip("hypothesis")  # not on every GPU image
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tessel
from tessel import compress
from tessel._compress_passes import orthogonalize_reference
from tessel.linear_attention import linear_attention_reference
from tessel.looped import looped_linear_attention_reference

SWEEP = settings(max_examples=500, deadline=None, derandomize=True, database=None)
DTYPES = st.sampled_from([torch.float32, torch.float64])
POISON = st.sampled_from([None, None, None, "nan", "inf"])


def _tol(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-10


def _tensor(shape, dtype, gen, layout):
    """A tensor of `shape` with the given memory layout: contiguous, its last
    two dims swapped in memory, or every other element of the last dim."""
    if layout == "swapped" and len(shape) >= 2:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=dtype).mT
    if layout == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=dtype)[..., ::2]
    return torch.randn(shape, generator=gen, dtype=dtype)


def _poison_(x, kind, gen):
    if kind is not None:  # one element, at a random index (the tensor may be a strided view)
        index = tuple(int(torch.randint(size, (1,), generator=gen)) for size in x.shape)
        x.data[index] = math.nan if kind == "nan" else math.inf
    return x


def _same_nonfinite(ours, ref, what):
    """Non-finite in the same rows (vectors of the last dim) as the reference."""
    assert torch.equal(~torch.isfinite(ours).all(-1), ~torch.isfinite(ref).all(-1)), what


# ---------------------------------------------------------------- linear attention


@st.composite
def linear_problems(draw):
    hk, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    causal = draw(st.booleans())
    nq = draw(st.integers(1, 80))
    nk = nq if causal else draw(st.integers(1, 80))
    return dict(b=draw(st.integers(1, 2)), h=hk * group, hk=hk, nq=nq, nk=nk,
                d=draw(st.sampled_from([1, 4, 16, 33])), dv=draw(st.sampled_from([1, 8, 20])), causal=causal,
                feature_map=draw(st.sampled_from(["identity", "elu1", "relu"])), normalize=draw(st.booleans()),
                with_state=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "strided"])),
                dtype=draw(DTYPES), poison=draw(POISON), seed=draw(st.integers(0, 2**16)))


@SWEEP
@given(linear_problems())
def test_linear_attention_sweep(p):
    gen = torch.Generator().manual_seed(p["seed"])
    dtype = p["dtype"]
    q = _tensor((p["b"], p["h"], p["nq"], p["d"]), dtype, gen, p["layout"])
    k = _tensor((p["b"], p["hk"], p["nk"], p["d"]), dtype, gen, p["layout"])
    v = _tensor((p["b"], p["hk"], p["nk"], p["dv"]), dtype, gen, p["layout"])
    _poison_(k, p["poison"], gen)
    state = None
    if p["with_state"]:
        s = torch.randn(p["b"], p["hk"], p["d"], p["dv"], generator=gen, dtype=dtype)
        state = (s, torch.rand(p["b"], p["hk"], p["d"], generator=gen, dtype=dtype)) if p["normalize"] else s
    kwargs = dict(causal=p["causal"], feature_map=p["feature_map"], normalize=p["normalize"],
                  initial_state=state, return_state=True)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, _ = tessel.linear_attention(*leaves, **kwargs)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact_state = None if state is None else (tuple(t.double() for t in state) if p["normalize"]
                                              else state.double())
    if p["poison"] is not None:
        # The token recurrence: the chunked reference multiplies masked entries by 0 (0 * NaN).
        ref, _ = linear_attention_reference(*exact, **{**kwargs, "initial_state": exact_state}, method="recurrent")
        _same_nonfinite(out, ref, "out")
        return
    ref, _ = linear_attention_reference(*exact, **{**kwargs, "initial_state": exact_state})
    scale = max(1.0, ref.abs().max().item())
    assert error_vs(out, ref) <= _tol(dtype) * 10 * scale
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    g_ours = torch.autograd.grad(out, leaves, grad)
    g_ref = torch.autograd.grad(ref, exact, grad.double())
    for name, a, b in zip("qkv", g_ours, g_ref):
        assert error_vs(a, b) <= _tol(dtype) * 100 * max(1.0, b.abs().max().item()), f"d{name}"


# ---------------------------------------------------------------- the looped transformer


@st.composite
def looped_problems(draw):
    loops = draw(st.integers(1, 6))
    return dict(b=draw(st.integers(1, 3)), d=draw(st.integers(1, 6)), n=draw(st.integers(1, 20)), loops=loops,
                heads=draw(st.integers(1, 2)), shared=draw(st.booleans()), mask=draw(st.sampled_from(["last_col",
                                                                                                   "none"])),
                recompute=draw(st.booleans()), dtype=draw(DTYPES), poison=draw(POISON),
                layout=draw(st.sampled_from(["contiguous", "swapped"])), seed=draw(st.integers(0, 2**16)))


@SWEEP
@given(looped_problems())
def test_looped_sweep(p):
    gen = torch.Generator().manual_seed(p["seed"])
    dtype = p["dtype"]
    Z = _tensor((p["b"], p["d"] + 1, p["n"] + 1), dtype, gen, p["layout"])
    w_shape = (1 if p["shared"] else p["loops"], p["heads"], p["d"] + 1, p["d"] + 1)
    P, Q = (0.1 * torch.randn(w_shape, generator=gen, dtype=dtype) for _ in range(2))
    if p["poison"] is not None:
        _poison_(Z, p["poison"], gen)
        with pytest.raises(FloatingPointError, match="not finite"):
            tessel.looped_linear_attention(Z, P, Q, p["loops"], mask=p["mask"], recompute=p["recompute"])
        return
    leaves = [x.detach().requires_grad_() for x in (Z, P, Q)]
    out = tessel.looped_linear_attention(*leaves, p["loops"], mask=p["mask"], recompute=p["recompute"])
    exact = [x.detach().double().requires_grad_() for x in (Z, P, Q)]
    ref = looped_linear_attention_reference(*exact, p["loops"], mask=p["mask"])
    scale = max(1.0, ref.abs().max().item())
    assert error_vs(out, ref) <= _tol(dtype) * 10 * scale
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    for name, a, b in zip("ZPQ", torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, exact,
                                                                                            grad.double())):
        assert error_vs(a, b) <= _tol(dtype) * 100 * max(1.0, b.abs().max().item()), f"d{name}"


# ---------------------------------------------------------------- orthogonalize_


@st.composite
def matrices(draw):
    batch = draw(st.one_of(st.none(), st.integers(1, 3)))
    m = draw(st.integers(1, 150))
    r = draw(st.integers(1, min(m, 8)))
    return dict(batch=batch, m=m, r=r, dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                layout=draw(st.sampled_from(["contiguous", "swapped", "strided"])),
                scale=draw(st.sampled_from([1.0, 1e-30, 1e25])), degenerate=draw(st.sampled_from([None, "zero",
                                                                                                  "repeat"])),
                poison=draw(POISON), seed=draw(st.integers(0, 2**16)))


@SWEEP
@given(matrices())
def test_orthogonalize_sweep(p):
    gen = torch.Generator().manual_seed(p["seed"])
    shape = (p["m"], p["r"]) if p["batch"] is None else (p["batch"], p["m"], p["r"])
    work = torch.float64 if p["dtype"] == torch.float64 else torch.float32
    M = (_tensor(shape, work, gen, p["layout"]) * p["scale"])
    if p["degenerate"] == "zero":
        M[..., -1] = 0
    elif p["degenerate"] == "repeat" and p["r"] > 1:
        M[..., -1] = 3 * M[..., 0]
    if p["dtype"] == torch.bfloat16:
        M = M.to(torch.bfloat16)
    _poison_(M, p["poison"], gen)
    ref = orthogonalize_reference(M.to(work).clone(), 0.0)
    compress.orthogonalize_(M, eps=0.0)
    if p["poison"] is not None:
        assert torch.equal(torch.isnan(M).any(-2), torch.isnan(ref).any(-2)) or not torch.isfinite(M).all()
        return
    assert torch.isfinite(M).all()
    keep = ref.norm(dim=-2) > 0.5  # columns that are not (numerically) dependent on earlier ones
    got = M.to(work)
    tol = 2e-2 if p["dtype"] == torch.bfloat16 else (1e-4 if work == torch.float32 else 1e-10)
    independent = p["degenerate"] is None and p["m"] >= p["r"]
    if independent:
        assert error_vs(got, ref) <= tol * 10
    gram = got.mT @ got
    eye = torch.diag_embed(keep.to(work))
    assert error_vs(gram * keep[..., None, :] * keep[..., :, None], eye) <= tol * 10


# ---------------------------------------------------------------- compressors: steps, skips, state round trips


@st.composite
def compressor_runs(draw):
    shapes = draw(st.lists(st.sampled_from([(30, 40), (7, 3, 5), (64,), (1, 90), (0, 4), (12, 12)]), min_size=1,
                           max_size=4))
    kind = draw(st.sampled_from(["powersgd", "alternate", "laser", "noerror"]))
    return dict(shapes=shapes, kind=kind, rank=draw(st.integers(1, 5)), start_iter=draw(st.integers(0, 2)),
                steps=draw(st.integers(1, 4)), dtype=draw(DTYPES), poison=draw(POISON),
                skip=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _make_compressor(p):
    on_nonfinite = "skip" if p["skip"] else "raise"
    if p["kind"] == "laser":
        return compress.Laser(rank=p["rank"], power=100.0, start_iter=p["start_iter"], on_nonfinite=on_nonfinite)
    return compress.PowerSGD(rank=p["rank"], start_iter=p["start_iter"], alternate=p["kind"] == "alternate",
                             error_feedback=p["kind"] != "noerror", on_nonfinite=on_nonfinite)


def _round_trip(comp, p):
    """A fresh compressor from comp's state, through bytes as a checkpoint file would go."""
    buf = io.BytesIO()
    torch.save(comp.state_dict(), buf)
    buf.seek(0)
    fresh = _make_compressor(p)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    return fresh


@SWEEP
@given(compressor_runs())
def test_compressor_sweep(p):
    gen = torch.Generator().manual_seed(p["seed"])
    names = [f"t{i}" for i in range(len(p["shapes"]))]
    steps = [[torch.randn(s, generator=gen, dtype=p["dtype"]) for s in p["shapes"]] for _ in range(p["steps"] + 1)]
    comp = _make_compressor(p)
    for grads in steps[:-1]:
        comp.reduce(list(zip(names, [g.clone() for g in grads])))
    resumed = _round_trip(comp, p)
    last = steps[-1]
    if p["poison"] is not None and any(g.numel() for g in last):
        _poison_(next(g for g in last if g.numel()), p["poison"], gen)
        before = {nm: None if st.error is None else st.error.clone() for nm, st in comp._tensors.items()}
        work = list(zip(names, [g.clone() for g in last]))
        if not p["skip"]:
            with pytest.raises(FloatingPointError, match="non-finite gradient"):
                comp.reduce(work)
        else:
            assert comp.reduce(work) is False
            assert all(g.abs().sum() == 0 for _, g in work)
        for nm, err in before.items():
            assert err is None or torch.equal(comp._tensors[nm].error, err), nm
        return
    a = list(zip(names, [g.clone() for g in last]))
    b = list(zip(names, [g.clone() for g in last]))
    assert comp.reduce(a) and resumed.reduce(b)
    for (_, x), (_, y) in zip(a, b):
        assert torch.equal(x, y)
        assert torch.isfinite(x).all()
