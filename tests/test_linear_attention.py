"""tessel.linear_attention (C++ chunked kernels) against the token-by-token
recurrence and the quadratic form, its state API, bad input, and
nn.LinearAttention."""
import pytest
import torch
from conftest import error_vs

import tessel
from tessel.linear_attention import linear_attention_reference

FEATURE_MAPS = ["identity", "elu1", "relu"]
# (length, head dim, value dim): odd lengths around the chunk (64), head dims 6..64.
SHAPES = [(1, 8, 8), (17, 6, 6), (63, 16, 21), (64, 32, 32), (65, 21, 6), (200, 64, 64)]


def make(b, h, hk, n, d, dv, dtype=torch.float64, seed=0, nk=None):
    gen = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    q = torch.randn(b, h, n, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hk, nk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hk, nk, dv, generator=gen, dtype=dtype)
    return q, k, v


def make_state(b, hk, d, dv, normalize, dtype=torch.float64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    S = torch.randn(b, hk, d, dv, generator=gen, dtype=dtype)
    return (S, torch.rand(b, hk, d, generator=gen, dtype=dtype) + 1) if normalize else S


def leaves_of(*xs):
    out = []
    for x in xs:
        if isinstance(x, tuple):
            out.append(tuple(t.clone().requires_grad_() for t in x))
        else:
            out.append(x.clone().requires_grad_())
    return out


def flat(xs):
    for x in xs:
        yield from (x if isinstance(x, tuple) else (x,))


def run_and_grad(fn, inputs, kwargs, seed=7):
    """(out, state, grads of q, k, v and the initial state) for a fixed random
    weighting of out and the final state."""
    leaves = leaves_of(*inputs)
    q, k, v, init = leaves
    out, state = fn(q, k, v, initial_state=init, return_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    for s in flat((state,)):
        loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    loss.backward()
    return out, state, [x.grad for x in flat(leaves)]


def assert_close(name, ours, exact, rtol):
    scale = max(1.0, exact.abs().max().item())
    assert error_vs(ours, exact) <= rtol * scale, f"{name}: {error_vs(ours, exact):.3e} (scale {scale:.3g})"


@pytest.mark.parametrize("n,d,dv", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_recurrence_and_quadratic_form(n, d, dv, causal, feature_map, normalize):
    q, k, v = make(2, 2, 2, n, d, dv)
    init = make_state(2, 2, d, dv, normalize)
    kwargs = dict(causal=causal, feature_map=feature_map, normalize=normalize)
    out, state, grads = run_and_grad(tessel.linear_attention, (q, k, v, init), kwargs)
    assert out.shape == (2, 2, n, dv) and out.dtype == q.dtype
    for method in ("recurrent", "quadratic"):
        ref = lambda *a, m=method, **kw: linear_attention_reference(*a, method=m, **kw)
        r_out, r_state, r_grads = run_and_grad(ref, (q, k, v, init), kwargs)
        assert_close(f"{method} out", out, r_out, 1e-10)
        for i, (a, b) in enumerate(zip(flat((state,)), flat((r_state,)))):
            assert_close(f"{method} state[{i}]", a, b, 1e-10)
        for name, a, b in zip(("dq", "dk", "dv", "dS0", "dz0"), grads, r_grads):
            assert_close(f"{method} {name}", a, b, 1e-9)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hk", [1, 2])
def test_grouped_query_heads_share_their_kv_state(causal, hk):
    q, k, v = make(2, 4, hk, 70, 16, 12)
    init = make_state(2, hk, 16, 12, False)
    out, state, grads = run_and_grad(tessel.linear_attention, (q, k, v, init), dict(causal=causal))
    r_out, r_state, r_grads = run_and_grad(
        lambda *a, **kw: linear_attention_reference(*a, method="recurrent", **kw), (q, k, v, init),
        dict(causal=causal),
    )
    assert state.shape == (2, hk, 16, 12)
    assert_close("out", out, r_out, 1e-10)
    assert_close("state", state, r_state, 1e-10)
    for name, a, b in zip(("dq", "dk", "dv", "dS0"), grads, r_grads):
        assert_close(name, a, b, 1e-9)


def test_non_causal_cross_attention_lengths_differ():
    q, k, v = make(2, 2, 2, 9, 8, 5, nk=130)
    out = tessel.linear_attention(q, k, v, causal=False, feature_map="elu1", normalize=True)
    ref = linear_attention_reference(q, k, v, causal=False, feature_map="elu1", normalize=True, method="quadratic")
    assert out.shape == (2, 2, 9, 5)
    assert_close("out", out, ref, 1e-12)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(normalize, causal):
    q, k, v = make(1, 2, 1, 67 if causal else 5, 6, 5)
    init = make_state(1, 1, 6, 5, normalize)
    leaves = leaves_of(q, k, v, init)

    def fn(q, k, v, *state):
        out, final = tessel.linear_attention(q, k, v, causal=causal, feature_map="elu1", normalize=normalize,
                                             initial_state=state if normalize else state[0], return_state=True)
        return (out,) + tuple(flat((final,)))

    assert torch.autograd.gradcheck(fn, tuple(flat(leaves)), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_two_halves_equal_the_whole(normalize, causal):
    q, k, v = make(2, 2, 2, 150, 16, 8)
    kwargs = dict(causal=causal, feature_map="elu1", normalize=normalize)
    whole, whole_state = tessel.linear_attention(q, k, v, return_state=True, **kwargs)
    cut = 77
    first, state = tessel.linear_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], return_state=True, **kwargs)
    second, final = tessel.linear_attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], initial_state=state,
                                            return_state=True, **kwargs)
    for a, b in zip(flat((final,)), flat((whole_state,))):
        assert_close("state", a, b, 1e-12)
    if causal:
        assert_close("out", torch.cat([first, second], dim=2), whole, 1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_decoder_steps_one_token_at_a_time(normalize):
    q, k, v = make(1, 2, 1, 20, 8, 8)
    kwargs = dict(feature_map="relu", normalize=normalize)
    whole = tessel.linear_attention(q, k, v, **kwargs)
    state = None
    for t in range(20):
        step, state = tessel.linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                              initial_state=state, return_state=True, **kwargs)
        assert_close(f"token {t}", step, whole[:, :, t:t + 1], 1e-12)


@pytest.mark.parametrize("dv", [32, 21])  # whole panels of values or not; 300 keys: a partial key block
@pytest.mark.parametrize("causal", [True, False])
def test_float32_accuracy_and_strided_inputs(causal, dv):
    q, k, v = make(2, 3, 3, 300, 32, dv)
    # (B, N, H, D) memory seen as (B, H, N, D): the kernels read strides.
    q32, k32, v32 = (x.float().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    out = tessel.linear_attention(q32, k32, v32, causal=causal)
    exact = linear_attention_reference(q, k, v, causal=causal, method="quadratic")
    same_dtype = linear_attention_reference(q32, k32, v32, causal=causal, method="quadratic")
    assert error_vs(out, exact) <= 4 * error_vs(same_dtype, exact) + 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    q, k, v = (x.to(dtype) for x in make(1, 2, 2, 70, 16, 16))
    out, state = tessel.linear_attention(q, k, v, return_state=True)
    ref, ref_state = linear_attention_reference(q, k, v, return_state=True)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert_close("out", out.float(), ref.float(), 1e-2)
    assert_close("state", state, ref_state, 1e-4)


def test_reference_backend_runs_the_chunked_reference():
    q, k, v = make(1, 2, 2, 70, 8, 8, dtype=torch.float32)
    tessel.set_backend("reference")
    out = tessel.linear_attention(q, k, v, feature_map="elu1")
    assert torch.equal(out, linear_attention_reference(q, k, v, feature_map="elu1"))


def test_backward_is_deterministic():
    q, k, v = make(2, 4, 2, 130, 16, 16, dtype=torch.float32)
    grads = []
    for _ in range(2):
        leaves = leaves_of(q, k, v)
        tessel.linear_attention(*leaves).sum().backward()
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_torch_compile_fullgraph():
    q, k, v = make(1, 2, 2, 70, 8, 8, dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(q, k, v):
        return tessel.linear_attention(q, k, v, feature_map="elu1", normalize=True).sum()

    leaves = leaves_of(q, k, v)
    fn(*leaves).backward()
    ref_leaves = leaves_of(q, k, v)
    tessel.linear_attention(*ref_leaves, feature_map="elu1", normalize=True).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        assert_close("grad", a.grad, b.grad, 1e-6)


# ---------------------------------------------------------------- bad input

def _bad_input_cases():
    q, k, v = make(2, 4, 2, 10, 8, 6, dtype=torch.float32)
    S = torch.zeros(2, 2, 8, 6)
    return [
        ("rank", dict(q=q[0]), ValueError, "q must have 4 dims"),
        ("batch", dict(k=k[:1], v=v[:1]), ValueError, "batch"),
        ("head dim", dict(k=k[..., :4]), ValueError, "k has dim 4 but q has dim 8"),
        ("v length", dict(v=v[:, :, :5]), ValueError, "v must have k's heads and length"),
        ("heads", dict(q=torch.randn(2, 3, 10, 8)), ValueError, "multiple of k/v heads"),
        ("dtype mix", dict(k=k.double()), TypeError, "k has dtype torch.float64"),
        ("int dtype", dict(q=q.int()), TypeError, "q must be float16"),
        ("empty", dict(q=q[:, :, :0], k=k[:, :, :0], v=v[:, :, :0]), ValueError, "must not be empty"),
        ("causal lengths", dict(q=q[:, :, :5]), ValueError, "causal linear attention needs q and k of one length"),
        ("feature map", dict(feature_map="softmax"), ValueError, "feature_map must be one of"),
        ("scale", dict(scale=float("nan")), ValueError, "scale must be a finite number"),
        ("eps", dict(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
        ("state shape", dict(initial_state=S[:, :1]), ValueError, r"initial_state must have shape \(2, 2, 8, 6\)"),
        ("state type", dict(initial_state=[S]), TypeError, "initial_state must be a torch.Tensor"),
        ("state pair", dict(initial_state=S, normalize=True), ValueError, r"pair \(S, z\)"),
        ("z shape", dict(initial_state=(S, S), normalize=True), ValueError, r"initial_state\[1\] must have shape"),
    ]


@pytest.mark.parametrize("label,override,error,match", _bad_input_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(label, override, error, match):
    q, k, v = make(2, 4, 2, 10, 8, 6, dtype=torch.float32)
    args = dict(q=q, k=k, v=v)
    args.update(override)
    with pytest.raises(error, match=match):
        tessel.linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


# ---------------------------------------------------------------- nn.LinearAttention

def _manual_layer(layer, x, mask=None):
    b, n, e = x.shape
    h = layer.num_heads
    split = lambda t: t.view(b, -1, h, e // h).transpose(1, 2)
    q, k, v = split(layer.phi(layer.q_proj(x))), split(layer.phi(layer.k_proj(x))), split(layer.v_proj(x))
    if mask is not None:
        keep = ~mask
        k, v = k[:, :, keep[0]], v[:, :, keep[0]]
    out = linear_attention_reference(q, k, v, causal=layer.causal, normalize=True, method="recurrent")
    return layer.out_proj(out.transpose(1, 2).reshape(b, n, e))


@pytest.mark.parametrize("causal", [True, False])
def test_layer_matches_the_formula_and_trains(causal):
    torch.manual_seed(0)
    layer = tessel.nn.LinearAttention(32, 4, causal=causal, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    out, weights = layer(x, x, x)
    assert weights is None and out.shape == x.shape
    assert_close("out", out, _manual_layer(layer, x), 1e-10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_layer_sequence_first_and_key_padding_mask():
    torch.manual_seed(0)
    layer = tessel.nn.LinearAttention(16, 2, dtype=torch.float64)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 9:] = True
    out, _ = layer(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=mask)
    assert out.shape == (12, 1, 16)
    # Keys dropped by the mask are as if absent (the queries stay).
    assert_close("masked", out.transpose(0, 1), _manual_layer(layer, x, mask), 1e-10)


def test_layer_refuses_attn_mask_and_round_trips_state_dict():
    layer = tessel.nn.LinearAttention(16, 2, feature_map="relu", batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="no attn_mask"):
        layer(x, x, x, attn_mask=torch.zeros(5, 5))
    copy = tessel.nn.LinearAttention(16, 2, feature_map="relu", batch_first=True)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy(x, x, x)[0], layer(x, x, x)[0])
    with pytest.raises(ValueError, match="divisible"):
        tessel.nn.LinearAttention(10, 3)
