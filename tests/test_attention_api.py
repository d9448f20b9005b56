"""The drop-ins (SDPA, patch_sdpa, MultiheadAttention), backend dispatch, and
the errors bad input gets."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import error_vs

import tessel
from tessel.attention import attention_reference

tattn = importlib.import_module("tessel.attention")  # the module; tessel.attention is the function

TORCH_SDPA = F.scaled_dot_product_attention


class _ForwardCalls(TorchDispatchMode):
    """Counts the calls of tessel::attention_fwd that reach a kernel."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.tessel.attention_fwd.default:
            self.calls.append(1)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def kernel_calls():
    with _ForwardCalls() as mode:
        yield mode.calls


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- SDPA


@pytest.mark.parametrize("nq,nk", [(20, 20), (12, 30), (30, 12)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch_and_uses_kernel(nq, nk, is_causal, kernel_calls):
    q, k, v = rand(2, 3, nq, 16, seed=1), rand(2, 3, nk, 16, seed=2), rand(2, 3, nk, 16, seed=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = tessel.scaled_dot_product_attention(*leaves, is_causal=is_causal, scale=0.3)
    want = TORCH_SDPA(*torch_leaves, is_causal=is_causal, scale=0.3)
    assert kernel_calls and error_vs(got, want) < 1e-5
    got.square().sum().backward()
    want.square().sum().backward()
    for a, b in zip(leaves, torch_leaves):
        assert error_vs(a.grad, b.grad) < 1e-4


def test_sdpa_gqa_only_with_enable_gqa(kernel_calls):
    q, k, v = rand(1, 4, 10, 8, seed=1), rand(1, 2, 10, 8, seed=2), rand(1, 2, 10, 8, seed=3)
    got = tessel.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert kernel_calls and error_vs(got, TORCH_SDPA(q, k, v, enable_gqa=True)) < 1e-5
    with pytest.raises(RuntimeError):
        TORCH_SDPA(q, k, v)
    with pytest.raises(RuntimeError):
        tessel.scaled_dot_product_attention(q, k, v)  # torch's own error, unchanged


@pytest.mark.parametrize(
    "case",
    ["bool_mask", "float_mask", "dropout", "three_dims", "value_dim", "half"],
)
def test_sdpa_falls_back_to_torch(case, kernel_calls):
    q, k, v = rand(2, 2, 9, 8, seed=1), rand(2, 2, 11, 8, seed=2), rand(2, 2, 11, 8, seed=3)
    kw = {}
    if case == "bool_mask":
        kw["attn_mask"] = rand(9, 11, seed=4) > 0
    elif case == "float_mask":
        kw["attn_mask"] = rand(2, 1, 9, 11, seed=4)
    elif case == "dropout":
        kw["dropout_p"] = 0.3
    elif case == "three_dims":
        q, k, v = q[0], k[0], v[0]
    elif case == "value_dim":
        v = rand(2, 2, 11, 5, seed=3)
    elif case == "half":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    torch.manual_seed(0)
    got = tessel.scaled_dot_product_attention(q, k, v, **kw)
    torch.manual_seed(0)
    want = TORCH_SDPA(q, k, v, **kw)
    assert not kernel_calls
    assert torch.equal(got, want)


def test_patch_sdpa_on_transformer_encoder_layer(kernel_calls):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = rand(3, 21, 32, seed=5)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(21)
    want = layer(x, src_mask=mask, is_causal=True)
    want_full = layer(x)
    with tessel.patch_sdpa():
        assert F.scaled_dot_product_attention is tessel.scaled_dot_product_attention
        got = layer(x, src_mask=mask, is_causal=True)
        got_full = layer(x)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert len(kernel_calls) == 2
    assert error_vs(got, want) < 1e-5 and error_vs(got_full, want_full) < 1e-5


def test_patch_sdpa_plain_call_until_restore(kernel_calls):
    patch = tessel.patch_sdpa()
    try:
        q = rand(1, 2, 8, 8)
        F.scaled_dot_product_attention(q, q, q)
        assert kernel_calls
    finally:
        patch.restore()
    assert F.scaled_dot_product_attention is TORCH_SDPA


# ---------------------------------------------------------------- MultiheadAttention


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_loads_torch_state_dict(batch_first, causal, kernel_calls):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first)
    ours = tessel.nn.MultiheadAttention(32, 4, batch_first=batch_first)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = rand(3, 13, 32, seed=1) if batch_first else rand(13, 3, 32, seed=1)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(13) if causal else None
    want, _ = theirs(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)
    got, weights = ours(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)
    assert weights is None and kernel_calls
    assert error_vs(got, want) < 1e-5
    got.sum().backward()
    want.sum().backward()
    for mine, torchs in ((ours.in_proj_weight, theirs.in_proj_weight), (ours.out_proj.weight, theirs.out_proj.weight)):
        assert error_vs(mine.grad, torchs.grad) < 1e-4


def test_a_second_derivative_is_refused_not_silently_zero():
    q = rand(1, 2, 5, 8).requires_grad_()
    (grad,) = torch.autograd.grad(tessel.attention(q, q, q, causal=True).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for tessel::attention_bwd is not implemented"):
        grad.sum().backward()


def test_multihead_attention_other_paths_are_torch():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
    ours = tessel.nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    q, k, v = rand(2, 5, 16, seed=1), rand(2, 7, 8, seed=2), rand(2, 7, 12, seed=3)
    want, want_w = theirs(q, k, v)
    got, got_w = ours(q, k, v)  # need_weights=True: torch's path
    assert torch.equal(got, want) and torch.equal(got_w, want_w)
    got, _ = ours(q, k, v, need_weights=False)  # separate projections, our kernel
    assert error_vs(got, theirs(q, k, v, need_weights=False)[0]) < 1e-5
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[:, -2:] = True
    assert torch.equal(ours(q, k, v, key_padding_mask=padding, need_weights=False)[0],
                       theirs(q, k, v, key_padding_mask=padding, need_weights=False)[0])


# ---------------------------------------------------------------- backends


def test_backend_choice(monkeypatch):
    q = rand(1, 2, 9, 8)
    assert tessel.get_backend() == "auto"
    tessel.set_backend("reference")
    assert torch.equal(tessel.attention(q, q, q), attention_reference(q, q, q))
    tessel.set_backend("cpp")
    assert error_vs(tessel.attention(q, q, q), attention_reference(q, q, q)) < 1e-6
    with pytest.raises(ValueError, match="backend must be one of"):
        tessel.set_backend("cuda")
    tessel.set_backend("auto")
    monkeypatch.setenv("TESSEL_BACKEND", "reference")
    assert tessel.get_backend() == "auto", "an explicit set_backend wins over the environment"
    monkeypatch.setattr(tessel._dispatch, "_chosen", None)
    assert tessel.get_backend() == "reference"
    monkeypatch.setenv("TESSEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="TESSEL_BACKEND"):
        tessel.attention(q, q, q)


def test_empty_cache_gives_back_the_kernels_scratch():
    # K packed into panels: 32 x 2 heads x 256 keys x 32 floats = 2 MB, a block the kernels keep between calls.
    q, k, v = (rand(32, 2, 256, 32, seed=s) for s in range(3))
    first = tessel.attention(q, k, v)
    assert error_vs(first, attention_reference(q, k, v)) < 2e-5
    assert torch.equal(tessel.attention(q, k, v), first)  # on the blocks the first call left
    assert tessel.empty_cache() >= 32 * 2 * 256 * 32 * 4
    assert tessel.empty_cache() == 0
    assert torch.equal(tessel.attention(q, k, v), first)  # on scratch allocated anew


def test_forced_backend_that_cannot_serve_raises(monkeypatch):
    q = rand(1, 2, 9, 8)
    tessel.set_backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tessel.attention(q, q, q)
    tessel.set_backend("cpp")
    meta = torch.empty(1, 2, 9, 8, device="meta")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        tessel.attention(meta, meta, meta)


def test_missing_triton_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tattn._dispatch, "triton_module", _no_kernel)
    tessel.set_backend("triton")  # TRITON_INTERPRET=1 from the test setup
    q = rand(1, 2, 9, 8)
    with pytest.raises(NotImplementedError, match="no Triton kernel for attention"):
        tessel.attention(q, q, q)


def _no_kernel(family):
    raise NotImplementedError(f"tessel has no Triton kernel for {family} yet")


# ---------------------------------------------------------------- bad input

GOOD = (1, 2, 5, 8)


@pytest.mark.parametrize(
    "q_shape,k_shape,v_shape,error,match",
    [
        ((2, 5, 8), GOOD, GOOD, ValueError, r"q must have 4 dims \(batch, heads, seq, head_dim\)"),
        (GOOD, (1, 2, 1, 5, 8), GOOD, ValueError, "k must have 4 dims"),
        (GOOD, (2, 2, 5, 8), (2, 2, 5, 8), ValueError, "k has batch 2 but q has batch 1"),
        (GOOD, (1, 2, 5, 4), (1, 2, 5, 4), ValueError, "k has head_dim 4 but q has head_dim 8"),
        (GOOD, GOOD, (1, 2, 6, 8), ValueError, r"v must have k's shape \(1, 2, 5, 8\)"),
        ((1, 3, 5, 8), GOOD, GOOD, ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
        ((1, 2, 0, 8), GOOD, GOOD, ValueError, "q must not be empty"),
        (GOOD, (1, 2, 0, 8), (1, 2, 0, 8), ValueError, "k must not be empty"),
    ],
)
def test_bad_shapes(q_shape, k_shape, v_shape, error, match):
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
    assert not tattn._C_ops.attention_inputs_fit(q, k, v, False)  # the C++ fast check sends it to Python's
    with pytest.raises(error, match=match):
        tessel.attention(q, k, v)


class _Marked(torch.Tensor):
    """A tensor subclass: it may change semantics, so the Python checks look at it."""


def test_common_inputs_skip_the_python_checks(monkeypatch):
    checked = []
    monkeypatch.setattr(tattn, "check_attention_inputs", lambda *args, **kwargs: checked.append(args))
    q, k = rand(2, 4, 7, 8), rand(2, 2, 9, 8, seed=1)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        tessel.attention(q.to(dtype), k.to(dtype), k.to(dtype))
    tessel.attention(torch.nn.Parameter(q), k.transpose(-1, -2).contiguous().transpose(-1, -2), k)
    packed = rand(7, 4, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    tessel.attention_varlen(packed, packed[:, :2], packed[:, :2], cu, cu, 4, 4)
    assert checked == []
    tessel.attention(q.as_subclass(_Marked), k, k)
    assert len(checked) == 1


def test_bad_dtypes_and_devices():
    q = torch.randn(GOOD)
    for bad in ((q.int(), q, q), (q, q, q.double()), (q, q.to("meta"), q), (q.numpy(), q, q), (q, q, q.to_sparse())):
        assert not tattn._C_ops.attention_inputs_fit(*bad, False)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64, got torch.int32"):
        tessel.attention(q.int(), q, q)
    with pytest.raises(TypeError, match="v has dtype torch.float64 but q has torch.float32"):
        tessel.attention(q, q, q.double())
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        tessel.attention(q, q.to("meta"), q)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        tessel.attention(q.numpy(), q, q)


@pytest.mark.parametrize("window", [(-1, 0), (0, -3), (1,), 5, (1.5, 2), (True, 1)])
def test_bad_window(window):
    q = torch.randn(GOOD)
    with pytest.raises(ValueError, match="window"):
        tessel.attention(q, q, q, window=window)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5"])
def test_bad_scale(scale):
    q = torch.randn(GOOD)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        tessel.attention(q, q, q, scale=scale)
