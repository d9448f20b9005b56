"""The Triton linear-attention kernels (chunked linear attention and the
looped linear transformer): on a GPU for real, otherwise in the Triton
interpreter on CPU tensors (small shapes)."""
import pytest
import torch
from conftest import error_vs

import tessel
from tessel.linear_attention import linear_attention_reference
from tessel.looped import looped_linear_attention_reference

pytest.importorskip("triton")
from tessel.kernels.looped import _BWD_CHUNK  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 2e-4 if not ON_GPU else 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.fixture(autouse=True)
def _triton_backend():
    tessel.set_backend("triton")


def make(b, h, hk, n, d, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen) * 0.5
    k = torch.randn(b, hk, n, d, generator=gen) * 0.5
    v = torch.randn(b, hk, n, dv, generator=gen)
    return [x.to(DEVICE, dtype) for x in (q, k, v)]


def check(name, ours, exact, dtype):
    scale = max(1.0, exact.abs().max().item())
    assert error_vs(ours.float(), exact.float()) <= TOL[dtype] * scale, f"{name}: {error_vs(ours, exact):.3e}"


def run(fn, q, k, v, init, kwargs, grad_seed=1):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    s0 = None if init is None else init.detach().clone().requires_grad_()
    out, state = fn(*leaves, initial_state=s0, return_state=True, **kwargs)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(out.shape, generator=gen).to(out)
    gs = torch.randn(state.shape, generator=gen).to(state)
    ((out.float() * g.float()).sum() + (state * gs).sum()).backward()
    grads = [x.grad for x in leaves] + ([s0.grad] if s0 is not None else [])
    return out, state, grads


# (length, head dim, value dim, q heads, kv heads): odd lengths across the 16-token
# interpreter chunk, small head dims (the ICL sizes), GQA.
CASES = [(1, 8, 8, 2, 2), (17, 6, 21, 2, 1), (40, 16, 16, 4, 2), (33, 32, 8, 1, 1)]


@pytest.mark.parametrize("n,d,dv,h,hk", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_forward_backward_match_reference(n, d, dv, h, hk, causal, dtype):
    q, k, v = make(2, h, hk, n, d, dv, dtype)
    init = torch.randn(2, hk, d, dv, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    kwargs = dict(causal=causal)
    out, state, grads = run(tessel.linear_attention, q, k, v, init, kwargs)
    exact = [x.double().cpu() for x in (q, k, v)]
    ref = lambda *a, **kw: linear_attention_reference(*a, method="quadratic", **kw)
    r_out, r_state, r_grads = run(ref, *exact, init.double().cpu(), kwargs)
    assert out.dtype == dtype and state.dtype == torch.float32
    check("out", out.cpu(), r_out, dtype)
    check("state", state.cpu(), r_state, dtype)
    for name, a, b in zip(("dq", "dk", "dv", "dS0"), grads, r_grads):
        check(name, a.cpu(), b, dtype)


@pytest.mark.parametrize("normalize", [False, True])
def test_feature_maps_normalize_and_chaining(normalize):
    q, k, v = make(1, 2, 2, 37, 16, 16, torch.float32)
    kwargs = dict(feature_map="elu1", normalize=normalize)
    whole = tessel.linear_attention(q, k, v, **kwargs)
    ref = linear_attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), method="recurrent",
                                     **kwargs)
    check("whole", whole.cpu(), ref, torch.float32)
    first, state = tessel.linear_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], return_state=True, **kwargs)
    second = tessel.linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], initial_state=state, **kwargs)
    check("chained", torch.cat([first, second], dim=2).cpu(), ref, torch.float32)


def test_head_dim_needing_several_state_blocks():
    # Dv = 160 splits the forward state and the dk sum over value blocks.
    q, k, v = make(1, 1, 1, 20, 32, 160, torch.float32)
    out, state, grads = run(tessel.linear_attention, q, k, v, None, dict(causal=True))
    exact = [x.double().cpu() for x in (q, k, v)]
    r_out, r_state, r_grads = run(lambda *a, **kw: linear_attention_reference(*a, method="quadratic", **kw),
                                  *exact, None, dict(causal=True))
    check("out", out.cpu(), r_out, torch.float32)
    for name, a, b in zip(("dq", "dk", "dv"), grads, r_grads):
        check(name, a.cpu(), b, torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_dkdv_in_blocks_of_key_dims(causal, monkeypatch):
    # fp32 dK/dV split over key dims (what dims from 128 take on a GPU), here d = 40 in 16-dim blocks, the
    # last one partial: dv summed over the blocks; GQA, an initial state and the state's gradient.
    from tessel.kernels import linear_attention as kernels

    monkeypatch.setattr(kernels, "FMA_DKDV_DIM_BLOCK", 16)
    q, k, v = make(2, 4, 2, 23, 40, 24, torch.float32)
    init = torch.randn(2, 2, 40, 24, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out, state, grads = run(tessel.linear_attention, q, k, v, init, dict(causal=causal))
    exact = [x.double().cpu() for x in (q, k, v)]
    ref = lambda *a, **kw: linear_attention_reference(*a, method="quadratic", **kw)
    r_out, r_state, r_grads = run(ref, *exact, init.double().cpu(), dict(causal=causal))
    for name, a, b in zip(("dq", "dk", "dv", "dstate0"), grads, r_grads):
        check(name, a.cpu(), b, torch.float32)


def test_float64_is_a_clear_error():
    q, k, v = make(1, 1, 1, 4, 8, 8, torch.float32)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        tessel.linear_attention(q.double(), k.double(), v.double())


# ---------------------------------------------------------------- looped


def make_looped(batch, d, n, loops, heads, shared, seed=0, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(batch, d + 1, n + 1, generator=gen)
    Z[:, d, n] = 0
    shape = (1 if shared else loops, heads, d + 1, d + 1)
    P, Q = (torch.randn(shape, generator=gen) * scale for _ in range(2))
    return [x.to(DEVICE) for x in (Z, P, Q)]


@pytest.mark.parametrize("d,n,loops,heads,shared,recompute", [
    (5, 9, 1, 1, True, False), (5, 9, 4, 2, True, True), (5, 9, 3, 1, False, False), (5, 9, 5, 1, True, True),
    (9, 2 * _BWD_CHUNK + 20, 3, 2, False, True),  # the backward's chunks of columns: two whole, one part
    (20, 12, 2, 2, False, True),  # 32-wide tiles: the backward reads P^T transposed from memory
])
@pytest.mark.parametrize("mask", ["last_col", "none"])
def test_looped_forward_backward_match_reference(d, n, loops, heads, shared, recompute, mask):
    Z, P, Q = make_looped(3, d, n, loops, heads, shared)
    leaves = [x.clone().requires_grad_() for x in (Z, P, Q)]
    out = tessel.looped_linear_attention(*leaves, loops, mask=mask, recompute=recompute)
    exact = [x.double().cpu().requires_grad_() for x in (Z, P, Q)]
    ref = looped_linear_attention_reference(*exact, loops, mask=mask)
    check("Z", out.cpu(), ref, torch.float32)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g.to(out)).sum().backward()
    (ref * g.double()).sum().backward()
    for name, a, b in zip(("dZ", "dP", "dQ"), leaves, exact):
        check(name, a.grad.cpu(), b.grad, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_looped_divergence_raises():
    Z, P, Q = make_looped(2, 3, 5, 30, 1, True, scale=3.0)
    with pytest.raises(FloatingPointError, match="diverged"):
        tessel.looped_linear_attention(Z * 10, P, Q, 30)
