"""tessel.attention_varlen (packed sequences, FlashAttention-2's varlen API)
against its reference, a loop of dense reference calls per sequence: C++
and Triton (the interpreter on CPU), empty and one-token sequences, GQA,
windows, gradients, bad cu_seqlens, and the agreement with dense attention
on each sequence cut out of the pack."""
import importlib.util
import math

import pytest
import torch
from conftest import error_vs

import tessel
from tessel.attention import attention_reference, attention_varlen_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
MASKS = [dict(), dict(causal=True), dict(window=(5, 2)), dict(causal=True, window=(3, None))]


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def pack(lens_q, lens_k, h=4, hk=2, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), h, d, generator=gen).to(dtype)
    k, v = (torch.randn(sum(lens_k), hk, d, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, cu(lens_q), cu(lens_k)


def run_and_grad(fn, q, k, v, seed=1):
    """out, lse and the gradients of a random loss over both (lse where finite)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    dout, dlse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    loss = (out * dout.to(out.dtype)).sum() + (torch.nan_to_num(lse, neginf=0.0) * dlse.to(lse.dtype)).sum()
    loss.backward()
    return out, lse, [x.grad for x in leaves]


def check(lens_q, lens_k, backend, dtype=torch.float32, tol=2e-5, **kw):
    q, k, v, cu_q, cu_k = pack(lens_q, lens_k, dtype=dtype)
    max_q, max_k = max(lens_q), max(lens_k)

    def ours(q, k, v):
        with tessel.using_backend(backend):
            return tessel.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **kw)

    def exact(q, k, v):
        return attention_varlen_reference(q, k, v, cu_q, cu_k, return_lse=True, **kw)

    out, lse, grads = run_and_grad(ours, q, k, v)
    ref, ref_lse, ref_grads = run_and_grad(exact, *(x.double() for x in (q, k, v)))
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without keys differ"
    assert error_vs(out, ref) <= tol and error_vs(lse, ref_lse) <= tol
    for name, g, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.dtype == dtype and error_vs(g, want) <= 8 * tol * max(1.0, want.abs().max().item()), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", MASKS, ids=["full", "causal", "window", "causal-window"])
def test_matches_reference_with_empty_and_one_token_sequences(backend, kw):
    check([5, 0, 37, 1, 20, 3], [7, 4, 37, 1, 18, 0], backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision(backend):
    check([9, 30, 1], [9, 40, 2], backend, dtype=torch.float16, tol=4e-3, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_sequence_equals_dense_attention(backend):
    q, k, v, cu_q, cu_k = pack([45], [60], h=2, hk=1, d=24)
    with tessel.using_backend(backend):
        out, lse = tessel.attention_varlen(q, k, v, cu_q, cu_k, 45, 60, causal=True, return_lse=True)
        dense, dense_lse = tessel.attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), causal=True,
                                            return_lse=True)
    assert error_vs(out, dense[0].transpose(0, 1)) <= 1e-6 and error_vs(lse, dense_lse[0]) <= 1e-6


def test_thousands_of_short_sequences():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 9, (3000,), generator=gen).tolist()
    check(lengths, lengths, "cpp", causal=True)


def test_each_sequence_matches_dense_attention_cut_out():
    lens = [13, 70, 2, 31]
    q, k, v, cu_q, _ = pack(lens, lens, h=3, hk=3, d=8)
    out = tessel.attention_varlen(q, k, v, cu_q, cu_q, 70, 70, window=(4, 4))
    for a, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        dense = attention_reference(*(x[a:e].transpose(0, 1)[None] for x in (q, k, v)), window=(4, 4))
        assert error_vs(out[a:e], dense[0].transpose(0, 1)) <= 2e-6


def test_gradcheck_float64():
    q, k, v, cu_q, cu_k = pack([4, 0, 6, 1], [5, 2, 6, 1], h=2, hk=1, d=4, dtype=torch.float64)

    def fn(q, k, v):
        out, lse = tessel.attention_varlen(q, k, v, cu_q, cu_k, 6, 6, causal=True, return_lse=True)
        return out, torch.nan_to_num(lse, neginf=0.0)

    assert torch.autograd.gradcheck(fn, [x.requires_grad_() for x in (q, k, v)])


def test_max_seqlen_larger_than_needed_is_fine_and_int64_cu_seqlens_work():
    q, k, v, cu_q, cu_k = pack([5, 9], [5, 9])
    a = tessel.attention_varlen(q, k, v, cu_q, cu_k, 9, 9)
    b = tessel.attention_varlen(q, k, v, cu_q.long(), cu_k.long(), 100, 1000)
    assert torch.equal(a, b)


def test_scale():
    q, k, v, cu_q, cu_k = pack([5, 9], [6, 9])
    out = tessel.attention_varlen(q, k, v, cu_q, cu_k, 9, 9, scale=0.3)
    ref = attention_varlen_reference(q, k, v, cu_q, cu_k, scale=0.3)
    assert error_vs(out, ref) <= 2e-6
    default = tessel.attention_varlen(q, k, v, cu_q, cu_k, 9, 9)
    assert error_vs(default, attention_varlen_reference(q, k, v, cu_q, cu_k, scale=1 / math.sqrt(16))) <= 2e-6


@pytest.mark.parametrize("case, error, match", [
    (dict(max_seqlen_q=4), ValueError, r"max_seqlen_q is 4 but sequence 1 has length 9"),
    (dict(max_seqlen_k=8), ValueError, r"max_seqlen_k is 8 but sequence 1 has length 9"),
    (dict(max_seqlen_q=-1), ValueError, r"max_seqlen_q must be a non-negative int"),
    (dict(max_seqlen_q=9.5), ValueError, r"max_seqlen_q must be a non-negative int"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 13], dtype=torch.int32)), ValueError, r"cu_seqlens_q must rise from 0 to "
                                                                                 r"the packed length 14"),
    (dict(cu_seqlens_q=torch.tensor([1, 5, 14], dtype=torch.int32)), ValueError, r"cu_seqlens_q must rise from 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 10, 15], dtype=torch.int32)), ValueError, r"the same length"),
    (dict(cu_seqlens_k=torch.tensor([0, 10, 5], dtype=torch.int32)), ValueError, r"without decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 5.0, 14.0])), ValueError, r"cu_seqlens_q must be a 1-D int32 tensor"),
    (dict(cu_seqlens_q=[0, 5, 14]), TypeError, r"cu_seqlens_q must be a torch.Tensor"),
    (dict(cu_seqlens_q=torch.tensor([[0, 5, 14]], dtype=torch.int32)), ValueError, r"1-D int32"),
    (dict(q=torch.randn(14, 4, 8)), ValueError, r"k has head_dim 16 but q has head_dim 8"),
    (dict(q=torch.randn(14, 3, 16)), ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
    (dict(q=torch.randn(1, 14, 4, 16)), ValueError, r"q must have 3 dims \(total, heads, head_dim\)"),
    (dict(v=torch.randn(15, 2, 8)), ValueError, r"v must have k's shape"),
    (dict(q=torch.randn(0, 4, 16)), ValueError, r"q must not be empty"),
    (dict(q=torch.randn(14, 4, 16, dtype=torch.float64)), TypeError,
     r"has dtype torch.float32 but q has torch.float64"),
    (dict(window=(1,)), ValueError, r"window must be None or a pair"),
])
def test_bad_input(case, error, match):
    q, k, v, cu_q, cu_k = pack([5, 9], [6, 9])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=9, max_seqlen_k=9)
    window = case.pop("window", None)
    args.update(case)
    with pytest.raises(error, match=match):
        tessel.attention_varlen(**args, window=window)


def test_torch_compile_fullgraph():
    q, k, v, cu_q, cu_k = pack([5, 0, 9], [6, 2, 9])

    def f(q, k, v):
        return tessel.attention_varlen(q, k, v, cu_q, cu_k, 9, 9, causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), f(q, k, v))
