"""NaN and inf in attention, on every backend with the same expectations: a
row is empty (zeros, lse = -inf) only when the band gives it no key, never
because its scores summed to something odd; a row is NaN when its query or a
key or value it sees is (nan_rows), and its lse exactly when its query or a
key it sees is. Tiles (and the dense reference) multiply masked entries by
zero, so a masked NaN may also reach other rows and gradients of the same
(batch, kv head), never another head. Also: windows past the sequence, numpy
scalars."""
import math

import numpy as np
import pytest
import torch

import tessel
from tessel.attention import attention_reference

BACKENDS = ["cpp", "reference"]
try:
    import triton  # noqa: F401

    BACKENDS.append("triton")
except ImportError:
    pass


def visible(nq, nk, causal, window):
    """(Nq, Nk): query i sees key j (bottom-right aligned, as tessel.attention)."""
    i = torch.arange(nq)[:, None] + (nk - nq)
    j = torch.arange(nk)[None, :]
    seen = torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        seen &= j <= i
    if window is not None:
        left, right = window
        seen &= (j >= i - left) if left is not None else seen
        seen &= (j <= i + right) if right is not None else seen
    return seen


def nan_rows(q, k, v, causal=False, window=None):
    """Rows that must hold NaN: of out and dq (B, H, Nq), of lse, of dk and of dv (B, Hkv, Nk)."""
    group = q.shape[1] // k.shape[1]
    seen = visible(q.shape[2], k.shape[2], causal, window)
    bad_q = torch.isnan(q).any(-1)
    bad_k = torch.isnan(k).any(-1).repeat_interleave(group, 1)
    bad_v = torch.isnan(v).any(-1).repeat_interleave(group, 1)
    lse_rows = (bad_q & seen.any(-1)) | (seen & bad_k[:, :, None, :]).any(-1)  # an empty row stays empty
    rows = lse_rows | (seen & bad_v[:, :, None, :]).any(-1)

    def reached(by):  # keys seen by those rows, per kv head
        return (seen & by[..., None]).any(-2).reshape(k.shape[0], k.shape[1], group, -1).any(2)

    # dv = P^T dO needs only P (lse); dk = dS^T q also meets delta = rowsum(dO * out).
    return rows, lse_rows, reached(rows), reached(lse_rows)


def head_closure(q, k, v):
    """(q rows, k rows) of every (batch, kv head) that holds a NaN: where NaN may reach."""
    group = q.shape[1] // k.shape[1]
    b, hk = k.shape[:2]
    bad = (torch.isnan(q).reshape(b, hk, -1).any(-1) | torch.isnan(k).flatten(2).any(-1)
           | torch.isnan(v).flatten(2).any(-1))
    return (bad.repeat_interleave(group, 1)[..., None].expand(q.shape[:3]), bad[..., None].expand(k.shape[:3]))


def assert_between(got, must, may, what):
    assert (must & ~got).sum() == 0, f"{what}: finite where NaN must reach"
    assert (got & ~may).sum() == 0, f"{what}: NaN outside the (batch, kv head) that holds one"


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, 16, generator=gen, requires_grad=True) for n in (5, 7, 7)]


def _poison(case, q, k, v):
    q, k, v = (x.detach().clone() for x in (q, k, v))
    if case == "nan_q":
        q[0, 0, 1, 3] = math.nan
    elif case == "nan_k":
        k[0, 1, 4, 0] = math.nan
    elif case == "nan_v":
        v[0, 0, 6, 2] = math.nan
    elif case == "inf_k":
        k[0, 1, 2, 5] = math.inf
    elif case == "overflow":  # float32 scores past 3.4e38
        q, k = q * 1e20, k * 1e20
    return [x.requires_grad_() for x in (q, k, v)]


def _rows(x):
    return torch.isnan(x).any(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["nan_q", "nan_k", "nan_v"])
@pytest.mark.parametrize("band", [dict(), dict(causal=True), dict(window=(1, 1))], ids=["full", "causal", "window"])
def test_nan_propagates_along_what_is_attended(backend, case, band):
    q, k, v = _poison(case, *_inputs())
    rows, lse_rows, k_rows, v_rows = nan_rows(q, k, v, **band)
    may_rows, may_keys = head_closure(q, k, v)
    assert rows.any()
    ref, ref_lse = attention_reference(q, k, v, return_lse=True, **band)
    tessel.set_backend(backend)
    out, lse = tessel.attention(q, k, v, return_lse=True, **band)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(torch.isnan(lse), lse_rows)
    assert_between(_rows(out), rows, may_rows, "out")
    assert_between(_rows(dq), rows, may_rows, "dq")
    assert_between(_rows(dk), k_rows, may_keys, "dk")
    assert_between(_rows(dv), v_rows, may_keys, "dv")
    fine = ~may_rows
    assert torch.allclose(out[fine], ref[fine], atol=1e-5) and torch.allclose(lse[~lse_rows], ref_lse[~lse_rows],
                                                                              atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["inf_k", "overflow"])
def test_inf_and_overflow_are_never_finite_or_empty(backend, case):
    q, k, v = _poison(case, *_inputs())
    ref, ref_lse = attention_reference(q, k, v, return_lse=True)
    tessel.set_backend(backend)
    out, lse = tessel.attention(q, k, v, return_lse=True)
    # Overflowing products give inf or NaN scores depending on the summation order (FMA, blocking): what
    # must hold is that the same rows are poisoned and none passes for empty.
    assert torch.equal(_rows(out), _rows(ref))
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)) and not torch.isneginf(lse).any()
    if case == "inf_k":  # a +inf score and no NaN: lse = +inf, as torch's logsumexp
        assert torch.equal(lse, ref_lse.to(lse.dtype)) or torch.allclose(lse[torch.isfinite(lse)],
                                                                          ref_lse[torch.isfinite(lse)])
        assert torch.isposinf(lse).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_are_zero_with_lse_minus_inf(backend):
    tessel.set_backend(backend)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 9, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 1, 4, 16, generator=gen, requires_grad=True) for _ in range(2))
    out, lse = tessel.attention(q, k, v, causal=True, return_lse=True)  # bottom-right: rows 0..4 see nothing
    assert out[0, 0, :5].abs().max() == 0 and torch.isneginf(lse[0, 0, :5]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[0, 0, 5:]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads) and grads[0][0, 0, :5].abs().max() == 0


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_windows_past_the_sequence_are_unbounded(backend):
    tessel.set_backend(backend)
    q, k, v = (x.detach() for x in _inputs(2))
    full = tessel.attention(q, k, v, causal=True)
    assert torch.equal(tessel.attention(q, k, v, causal=True, window=(10**30, 0)), full)
    assert torch.equal(tessel.attention(q, k, v, window=(np.int64(10**18), 10**40)), tessel.attention(q, k, v))


def test_numpy_scalars_are_numbers():
    q, k, v = (x.detach() for x in _inputs(3))
    for scale in (np.float32(0.5), np.float64(0.5), 0.5):
        assert torch.allclose(tessel.attention(q, k, v, scale=scale), tessel.attention(q, k, v, scale=0.5))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        tessel.attention(q, k, v, scale=np.float32("nan"))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        tessel.attention(q, k, v, scale=np.bool_(True))
