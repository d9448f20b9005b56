"""tessel.attention on the C++ backend against the plain PyTorch reference."""
import math

import pytest
import torch
from conftest import assert_as_accurate, assert_backward_deterministic, error_vs

import tessel
from tessel.attention import attention_reference


def make_qkv(b, h, hk, nq, nk, d, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=gen, dtype=dtype) * scale
    k = torch.randn(b, hk, nk, d, generator=gen, dtype=dtype) * scale
    v = torch.randn(b, hk, nk, d, generator=gen, dtype=dtype)
    return q, k, v


def check_against_reference(q, k, v, grads=True, factor=2.0, **kw):
    """Output, lse and every gradient of tessel vs float64, relative to the
    float32 reference's own error."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    exact_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = tessel.attention(*leaves, return_lse=True, **kw)
    ref_out, ref_lse = attention_reference(*ref_leaves, return_lse=True, **kw)
    ex_out, ex_lse = attention_reference(*exact_leaves, return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    assert_as_accurate("out", out, ref_out, ex_out, factor, atol=1e-6)
    assert_as_accurate("lse", lse, ref_lse, ex_lse, factor, atol=1e-6)
    if not grads:
        return
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen)
    dlse = torch.randn(lse.shape, generator=gen)
    for o, l, ls in ((out, lse, leaves), (ref_out, ref_lse, ref_leaves), (ex_out, ex_lse, exact_leaves)):
        # Rows without keys have lse = -inf; their gradient is zero.
        ((o * dout.to(o.dtype)).sum() + (torch.nan_to_num(l, neginf=0.0) * dlse.to(l.dtype)).sum()).backward()
    for name, a, r, e in zip(("dq", "dk", "dv"), leaves, ref_leaves, exact_leaves):
        assert_as_accurate(name, a.grad, r.grad, e.grad, 3 * factor, atol=1e-5)


@pytest.mark.parametrize("d", [16, 24, 32, 64, 128, 256])
@pytest.mark.parametrize("n", [1, 17, 127])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_and_odd_lengths(d, n, causal):
    check_against_reference(*make_qkv(1, 2, 2, n, n, d), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_with_gqa(causal):
    check_against_reference(*make_qkv(1, 4, 2, 1000, 1000, 64), causal=causal)


@pytest.mark.parametrize("nq,nk,d,kw", [(1100, 1100, 128, {}), (1100, 1100, 128, {"causal": True}),
                                        (1030, 1250, 128, {"causal": True}), (1100, 1100, 128, {"window": (200, 50)}),
                                        (1200, 1200, 100, {"causal": True}), (1700, 1700, 72, {})])
def test_long_sequences_backward_on_long_key_blocks(nq, nk, d, kw):
    # One head's Q of 256 KB or more (1030-1700 rows of 72-128 floats, padded to whole panels) runs the
    # backward on 192-key blocks, which copy Q's and dO's rows per query block as row panels.
    check_against_reference(*make_qkv(1, 2, 1, nq, nk, d), **kw)


@pytest.mark.parametrize("nq,nk", [(17, 100), (100, 17), (1, 1000), (127, 64), (64, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_query_and_key_lengths_differ(nq, nk, causal):
    check_against_reference(*make_qkv(2, 2, 1, nq, nk, 32), causal=causal)


# Decode shapes (a few query rows per kv head against a long cache) take the C++ kernel's split-key path:
# 1-2 rows from 1024 keys on, up to 16 rows when a head's K holds 2^20 elements.
@pytest.mark.parametrize("h,hk,nq,nk,d", [(4, 2, 1, 1500, 64), (2, 2, 2, 4099, 24), (8, 2, 3, 8209, 128),
                                          (4, 4, 16, 8209, 128)])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window=(700, 0)), dict(window=(3, None))],
                         ids=["full", "causal", "window", "short-window"])
def test_decode_against_a_long_kv_cache(h, hk, nq, nk, d, kw):
    check_against_reference(*make_qkv(2, h, hk, nq, nk, d), grads=False, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nq,d", [(1, 24), (2, 128)])
def test_decode_half_precision_is_computed_in_float32(dtype, nq, d):
    q, k, v = make_qkv(1, 4, 2, nq, 3001, d, dtype=dtype)
    out = tessel.attention(q, k, v, causal=True)
    ref = attention_reference(*(x.double() for x in (q, k, v)), causal=True)
    assert out.dtype == dtype
    assert error_vs(out.double(), ref) <= error_vs(ref.to(dtype).double(), ref) + 1e-5


def test_decode_float64_and_nan_rules():
    q, k, v = make_qkv(1, 4, 2, 1, 3000, 32, dtype=torch.float64)
    out, lse = tessel.attention(q, k, v, window=(10, 0), return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, window=(10, 0), return_lse=True)
    assert error_vs(out, ref) <= 1e-12 and error_vs(lse, ref_lse) <= 1e-12
    k[0, 1, 2990] = float("nan")  # seen by the q heads of kv head 1, by none of kv head 0's
    out, lse = tessel.attention(q, k, v, window=(10, 0), return_lse=True)
    assert torch.isnan(out[0, 2:]).all() and torch.isnan(lse[0, 2:]).all()
    assert torch.isfinite(out[0, :2]).all() and error_vs(out[0, :2], ref[0, :2]) <= 1e-12


@pytest.mark.parametrize("window", [(0, 0), (3, 5), (None, 0), (16, None), (100, 100), (0, None)])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window(window, causal):
    check_against_reference(*make_qkv(1, 2, 2, 150, 130, 32), causal=causal, window=window)


@pytest.mark.parametrize("h,hk", [(4, 1), (4, 2), (6, 3), (3, 3)])
def test_grouped_query_attention(h, hk):
    check_against_reference(*make_qkv(2, h, hk, 33, 47, 16), causal=True)


def test_custom_scale():
    check_against_reference(*make_qkv(1, 2, 2, 40, 40, 32), scale=0.37)
    check_against_reference(*make_qkv(1, 2, 2, 40, 40, 32), scale=-0.2, causal=True)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(causal=True), dict(window=(2, 1)), dict(causal=True, window=(3, None))],
    ids=["full", "causal", "window", "causal-window"],
)
@pytest.mark.parametrize("nq,nk,h,hk", [(7, 7, 2, 2), (5, 9, 2, 1), (9, 4, 4, 2)])
def test_gradcheck_float64(kw, nq, nk, h, hk):
    q, k, v = (x.requires_grad_() for x in make_qkv(1, h, hk, nq, nk, 8, dtype=torch.float64))

    def fn(q, k, v):
        out, lse = tessel.attention(q, k, v, return_lse=True, **kw)
        return out, torch.nan_to_num(lse, neginf=0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_float64_output_and_lse_dtype():
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, dtype=torch.float64)
    out, lse = tessel.attention(q, k, v, return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    assert error_vs(out, ref) < 1e-12 and error_vs(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nq,nk,d", [(50, 61, 7), (50, 61, 32), (50, 61, 128), (1200, 1100, 100)])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_on_cpu_computes_in_float32(dtype, nq, nk, d, causal):
    """Output and gradients are exact results rounded once to the input dtype, up to float32's own error
    (bfloat16's dot products multiply exactly and sum in float32), GQA, odd lengths and head dims
    included, and heads long enough for the backward's 192-key blocks (which convert Q's and dO's rows
    per query block). The backward reads the output as saved, in the input dtype (as FlashAttention
    does): the exact gradients given that output are what it is held to."""
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 4, 2, nq, nk, d, dtype=dtype))
    out, lse = tessel.attention(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    exact_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = attention_reference(*exact_leaves, causal=causal, return_lse=True)
    # rowsum(dO * O) enters dS = P (dP - rowsum(dO * O)): with the saved output it is short by c, which
    # adds P * c to dS, the gradient of sum(lse * c).
    c = ((ref - out.double()) * dout.double()).sum(-1).detach()
    ref_grads = torch.autograd.grad((ref * dout.double()).sum() + (ref_lse * c).sum(), exact_leaves)
    assert error_vs(lse, ref_lse) <= 1e-5
    for ours, exact in zip((out, *grads), (ref.detach(), *ref_grads)):
        assert ours.dtype == dtype
        rounding = error_vs(exact.to(dtype).double(), exact)
        assert error_vs(ours.double(), exact) <= rounding + 1e-5 * float(exact.abs().max())


def test_fully_masked_rows_give_zeros_and_minus_inf_lse():
    # causal with Nq > Nk: the first Nq - Nk queries see no key.
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 2, 10, 4, 16))
    out, lse = tessel.attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :6] == 0) and torch.all(lse[:, :, :6] == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 6:]).all()
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert torch.all(q.grad[:, :, :6] == 0)
    # A window that leaves some rows without keys.
    q, k, v = make_qkv(1, 1, 1, 8, 30, 16)
    out, lse = tessel.attention(q, k, v, window=(0, 0), return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, window=(0, 0), return_lse=True)
    assert torch.isfinite(out).all() and error_vs(out, ref) < 1e-5 and error_vs(lse, ref_lse) < 1e-5


def test_large_logits_do_not_overflow():
    q, k, v = make_qkv(1, 2, 2, 65, 65, 16, scale=50.0)  # |logits| up to ~1e4
    scores = (q @ k.transpose(-1, -2)) / 4
    assert scores.abs().max() > 5e3
    check_against_reference(q, k, v, causal=True, factor=4.0)


def test_softmax_probabilities_within_a_few_ulp():
    """The float32 kernel's exp2 (a table and a polynomial) has a documented error (relative 1.6e-7): with V the
    identity, the output row is the softmax itself, compared entry by entry with float64 softmax of the
    same float32 scores (in [-4, 4], where the score's own rounding adds ~2.4e-7)."""
    n = 64
    gen = torch.Generator().manual_seed(7)
    scores = torch.rand(4, 1, 1, n, generator=gen) * 8 - 4  # one query row per batch element
    q = torch.zeros(4, 1, 1, n)
    q[..., 0] = 1.0
    k = torch.zeros(4, 1, n, n)
    k[..., 0] = scores[:, :, 0]  # q . k_j = scores_j, scale 1
    v = torch.eye(n).expand(4, 1, n, n)
    probs = tessel.attention(q, k, v, scale=1.0)
    exact = torch.softmax(scores.double(), dim=-1)
    rel = ((probs.double() - exact) / exact).abs().max().item()
    assert rel < 1e-6, rel


def test_non_contiguous_inputs_match_contiguous():
    gen = torch.Generator().manual_seed(3)
    # (B, N, H, D) projections viewed as (B, H, N, D), and a last dim with stride != 1.
    q, k, v = (torch.randn(2, 37, 4, 32, generator=gen).transpose(1, 2) for _ in range(3))
    v_t = v.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q.is_contiguous() and v_t.stride(-1) != 1
    for kw in (dict(), dict(causal=True)):
        got = tessel.attention(q, k, v_t, **kw)
        want = tessel.attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
        assert torch.equal(got, want)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    contiguous = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    for ls in (leaves, contiguous):
        tessel.attention(*ls, causal=True).square().sum().backward()
    for a, b in zip(leaves, contiguous):
        assert torch.equal(a.grad, b.grad)


def test_expanded_kv_heads_read_in_place():
    q, k, v = make_qkv(1, 4, 1, 20, 20, 16)
    got = tessel.attention(q, k.expand(1, 4, 20, 16), v.expand(1, 4, 20, 16))
    assert error_vs(got, tessel.attention(q, k, v)) == 0.0


@pytest.mark.parametrize("n,d", [(300, 32), (1030, 128)])  # the second on long key blocks, in several splits
def test_backward_is_deterministic(n, d):
    assert_backward_deterministic(lambda q, k, v: tessel.attention(q, k, v, causal=True),
                                  make_qkv(1, 2, 1, n, n, d))


def _peak_rss_growth_mb(fn) -> float:
    def kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    before = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return (kib("VmHWM") - before) / 1024


def test_forward_memory_is_linear_in_length():
    q, k, v = make_qkv(1, 1, 1, 16384, 16384, 16)
    try:
        growth = _peak_rss_growth_mb(lambda: tessel.attention(q, k, v))
    except OSError:
        pytest.skip("needs Linux /proc to read peak memory")
    assert growth < 64, f"forward at N=16384 grew memory by {growth:.0f} MB; N x N scores would be 1024 MB"


@pytest.mark.parametrize("causal", [False, True])
def test_forward_packs_kv_heads_in_chunks(causal):
    # K's and V's panels take ~2 MB a kv head at N = 2047, D = 128: the forward packs 6 heads ~8 MB at a time
    # (two chunks, the second partial), each head in pieces of 512 keys (the last partial).
    check_against_reference(*make_qkv(3, 4, 2, 2047, 2047, 128), grads=False, causal=causal)


def test_forward_scratch_holds_one_chunk_of_kv_heads():
    # Every head's panels would be 32 MB; the kernel's scratch (kept between calls, given back and counted by
    # empty_cache) holds one chunk's, ~8 MB.
    q, k, v = make_qkv(4, 4, 4, 2047, 2047, 128)
    tessel.empty_cache()
    tessel.attention(q, k, v)
    scratch_mb = tessel.empty_cache() / 2**20
    all_panels_mb = 2 * k.numel() * 4 / 2**20
    assert 0 < scratch_mb < all_panels_mb / 2, f"scratch {scratch_mb:.1f} MB; all panels {all_panels_mb:.0f} MB"


def test_torch_compile_has_no_graph_breaks():
    q, k, v = make_qkv(1, 2, 1, 33, 40, 16)

    def f(q, k, v):
        out, lse = tessel.attention(q, k, v, causal=True, return_lse=True)
        return out.sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    eager = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled(*leaves).backward()
    f(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_torch_compile_inductor_forward():
    q, k, v = make_qkv(2, 2, 2, 17, 17, 32)
    compiled = torch.compile(lambda q, k, v: tessel.attention(q, k, v) * 2, fullgraph=True)
    assert torch.allclose(compiled(q, k, v), tessel.attention(q, k, v) * 2)
