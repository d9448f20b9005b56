"""Seeded property-based sweep: random shapes, GQA ratios, masks, strides and
non-finite values, every case compared with the reference; none may crash,
none may return NaN unless the reference does, in the same rows."""
import pytest
import torch
from conftest import error_vs
from test_attention_nonfinite import assert_between, head_closure, nan_rows

hypothesis = pytest.importorskip("hypothesis")  # not on every GPU image
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tessel
from tessel.attention import attention_reference

window_side = st.one_of(st.none(), st.integers(0, 40))


@st.composite
def problems(draw):
    b = draw(st.integers(1, 2))
    hk = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    d = draw(st.sampled_from([1, 3, 8, 16, 20, 33, 64, 80]))
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.tuples(window_side, window_side)))
    layout = draw(st.sampled_from(["bhnd", "bnhd", "strided_last"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    poison = draw(st.sampled_from([None, None, None, None, "q", "k", "v"]))
    seed = draw(st.integers(0, 2**16))
    return b, hk * group, hk, nq, nk, d, causal, window, layout, dtype, poison, seed


def build(b, h, n, d, layout, dtype, gen):
    if layout == "bnhd":  # a (B, N, H, D) projection viewed as (B, H, N, D)
        return torch.randn(b, n, h, d, generator=gen, dtype=dtype).transpose(1, 2)
    if layout == "strided_last":  # every other element of the last dim
        return torch.randn(b, h, n, 2 * d, generator=gen, dtype=dtype)[..., ::2]
    return torch.randn(b, h, n, d, generator=gen, dtype=dtype)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(problems())
def test_random_problems_match_reference(problem):
    b, h, hk, nq, nk, d, causal, window, layout, dtype, poison, seed = problem
    gen = torch.Generator().manual_seed(seed)
    q = build(b, h, nq, d, layout, dtype, gen).requires_grad_()
    k = build(b, hk, nk, d, layout, dtype, gen).requires_grad_()
    v = build(b, hk, nk, d, layout, dtype, gen).requires_grad_()
    if poison is not None:
        x = {"q": q, "k": k, "v": v}[poison]
        x.data[tuple(int(torch.randint(n, (1,), generator=gen)) for n in x.shape)] = float("nan")
    out, lse = tessel.attention(q, k, v, causal=causal, window=window, return_lse=True)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = attention_reference(*exact, causal=causal, window=window, return_lse=True)
    if poison is not None:
        rows, lse_rows, k_rows, v_rows = nan_rows(q, k, v, causal=causal, window=window)
        may_rows, may_keys = head_closure(q, k, v)
        assert torch.equal(torch.isnan(lse), lse_rows)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        for name, got, must, may in (("out", out, rows, may_rows), ("dq", dq, rows, may_rows),
                                     ("dk", dk, k_rows, may_keys), ("dv", dv, v_rows, may_keys)):
            assert_between(torch.isnan(got).any(-1), must, may, name)
        return
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert error_vs(out, ref) <= tol * 10
    assert error_vs(lse, ref_lse) <= tol * 10
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    (out * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    for name, ours, want in zip("qkv", (q, k, v), exact):
        assert not torch.isnan(ours.grad).any(), f"d{name} has NaN"
        assert error_vs(ours.grad, want.grad) <= tol * 100, f"d{name}"
