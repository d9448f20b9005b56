"""The Triton attention kernels against the reference: in the interpreter on
CPU (TRITON_INTERPRET=1 from the test setup, small shapes), or on a real GPU
when one is present (larger shapes, half precision). bfloat16 runs on GPUs
only: triton 3.6's interpreter mangles in-kernel casts to bfloat16."""
import importlib
import math

import pytest
import torch
from conftest import assert_backward_deterministic, error_vs

import tessel
from tessel.attention import BAND_INF, attention_reference

triton = pytest.importorskip("triton")
kernels = importlib.import_module("tessel.kernels.attention")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SIZES = (1, 17, 64, 100, 300, 1000) if ON_GPU else (1, 17, 64, 100)
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _triton_backend():
    tessel.set_backend("triton")


def make(b, h, hk, nq, nk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, h, nq, d), (b, hk, nk, d), (b, hk, nk, d))
    return [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype) for s in shapes]


def tolerance(dtype, grad=False):
    """Max abs error allowed against the float64 reference."""
    base = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    return base * (8 if grad else 1)


def check(q, k, v, grads=True, **kw):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = tessel.attention(*leaves, return_lse=True, **kw)
    ref, ref_lse = attention_reference(*exact, return_lse=True, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert error_vs(out, ref) <= tolerance(q.dtype), f"out error {error_vs(out, ref):.2e}"
    assert error_vs(lse, ref_lse) <= tolerance(q.dtype), f"lse error {error_vs(lse, ref_lse):.2e}"
    if not grads:
        return
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=gen).to(DEVICE)
    for o, l in ((out, lse), (ref, ref_lse)):
        ((o * dout.to(o.dtype)).sum() + (torch.nan_to_num(l, neginf=0.0) * dlse.to(l.dtype)).sum()).backward()
    for name, ours, want in zip(("dq", "dk", "dv"), leaves, exact):
        err = error_vs(ours.grad, want.grad)
        assert err <= tolerance(q.dtype, grad=True) * max(1.0, want.grad.abs().max().item()), f"{name} error {err:.2e}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_head_dims(n, d, causal):
    check(*make(1, 2, 2, n, n, d, torch.float32), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(dtype):
    check(*make(2, 2, 1, 33, 40, 32, dtype), causal=True)


@pytest.mark.parametrize("d", [24, 96] + ([128, 256] if ON_GPU else []))
def test_head_dims_padded_inside(d):
    check(*make(1, 2, 2, 20, 20, d, torch.float32), causal=True)


@pytest.mark.parametrize("nq,nk", [(17, 100), (100, 17), (1, 64), (64, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_query_and_key_lengths_differ(nq, nk, causal):
    check(*make(1, 2, 1, nq, nk, 16, torch.float32), causal=causal)


@pytest.mark.parametrize("window", [(0, 0), (5, 3), (None, 0), (20, None)])
def test_sliding_window(window):
    check(*make(1, 2, 2, 70, 60, 16, torch.float32), window=window, causal=window == (20, None))


@pytest.mark.parametrize("h,hk", [(4, 1), (4, 2), (6, 3)])
def test_grouped_query_attention(h, hk):
    check(*make(1, h, hk, 30, 45, 16, torch.float32), causal=True)


def test_fully_masked_rows_give_zeros():
    q, k, v = make(1, 2, 2, 40, 10, 16, torch.float32)
    out, lse = tessel.attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :30] == 0) and torch.all(lse[:, :, :30] == -math.inf)
    check(q, k, v, causal=True)


def test_top_left_causal_through_sdpa():
    q, k, v = make(1, 2, 2, 20, 50, 16, torch.float32)
    got = tessel.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert error_vs(got, want) < 1e-5


@pytest.mark.parametrize("nq", [1, 3, 16])
@pytest.mark.parametrize("band", [(-BAND_INF, BAND_INF), (-BAND_INF, "causal"), ("window", "causal")])
def test_split_k_decode_matches_reference(nq, band):
    nk = 700 if not ON_GPU else 32768
    q, k, v = make(1, 2, 1, nq, nk, 16, torch.float32)
    off = nk - nq
    lo = off - 300 if band[0] == "window" else band[0]
    hi = off if band[1] == "causal" else band[1]
    window = (300 if band[0] == "window" else None, 0 if band[1] == "causal" else None)
    out, lse = kernels.attention_forward(q, k, v, 0.25, lo, hi, num_splits=3)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), scale=0.25, window=window,
                                       return_lse=True)
    assert error_vs(out, ref) <= 2e-5 and error_vs(lse, ref_lse) <= 2e-5


def test_backward_is_deterministic():
    assert_backward_deterministic(lambda q, k, v: tessel.attention(q, k, v, causal=True),
                                  make(1, 4, 2, 50, 50, 16, torch.float32))


def test_head_dim_over_256_is_a_clear_error():
    q, k, v = make(1, 1, 1, 4, 4, 264, torch.float32)
    with pytest.raises(ValueError, match="head_dim <= 256"):
        tessel.attention(q, k, v)
