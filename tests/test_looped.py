"""tessel.looped_linear_attention (C++ fused loops) against the literal
reference, its backward modes, the module, and the regression baselines."""
import pytest
import torch
from conftest import error_vs

import tessel
from tessel.icl import icl_prompt, least_squares_predict, preconditioned_gd_predict
from tessel.looped import _looped_fwd, looped_linear_attention_reference


def make(batch, d, n, loops, heads, shared, dtype=torch.float64, seed=0, scale=0.15):
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(batch, d + 1, n + 1, generator=gen, dtype=dtype)
    Z[:, d, n] = 0
    if heads == 1 and shared:
        shape = (d + 1, d + 1)
    elif heads == 1:
        shape = (loops, d + 1, d + 1)
    else:
        shape = (1 if shared else loops, heads, d + 1, d + 1)
    P = torch.randn(shape, generator=gen, dtype=dtype) * scale
    Q = torch.randn(shape, generator=gen, dtype=dtype) * scale
    return Z, P, Q


CASES = [
    # loops, heads, shared
    (1, 1, True), (2, 1, True), (7, 1, True), (20, 1, True),
    (7, 1, False), (2, 2, True), (7, 2, False), (20, 2, True),
]


@pytest.mark.parametrize("loops,heads,shared", CASES)
@pytest.mark.parametrize("mask", ["last_col", "none"])
@pytest.mark.parametrize("recompute", [False, True])
def test_forward_and_gradients_match_reference(loops, heads, shared, mask, recompute):
    Z, P, Q = make(3, 5, 9, loops, heads, shared, scale=0.15 / loops**0.5)
    leaves = [x.clone().requires_grad_() for x in (Z, P, Q)]
    ref_leaves = [x.clone().requires_grad_() for x in (Z, P, Q)]
    out = tessel.looped_linear_attention(*leaves, loops, mask=mask, recompute=recompute)
    ref = looped_linear_attention_reference(*ref_leaves, loops, mask=mask)
    assert out.shape == Z.shape and out.dtype == Z.dtype
    assert error_vs(out, ref) < 1e-12 * max(1.0, ref.abs().max().item())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    for name, a, b in zip(("dZ", "dP", "dQ"), leaves, ref_leaves):
        assert a.grad.shape == b.grad.shape
        assert error_vs(a.grad, b.grad) < 1e-10 * max(1.0, b.grad.abs().max().item()), name


@pytest.mark.parametrize("shape", ["shared", "per_loop", "heads"])
def test_gradcheck_float64(shape):
    loops = 3
    Z, P, Q = make(2, 3, 5, loops, 2 if shape == "heads" else 1, shape != "per_loop", scale=0.3)
    inputs = [x.requires_grad_() for x in (Z, P, Q)]
    assert torch.autograd.gradcheck(lambda z, p, q: tessel.looped_linear_attention(z, p, q, loops), inputs)
    assert torch.autograd.gradcheck(
        lambda z, p, q: tessel.looped_linear_attention(z, p, q, loops, recompute=True), inputs
    )


def test_float32_matches_float64_reference():
    Z, P, Q = make(64, 10, 20, 10, 1, True, dtype=torch.float32, scale=0.05)
    out = tessel.looped_linear_attention(Z, P, Q, 10)
    ref = looped_linear_attention_reference(Z.double(), P.double(), Q.double(), 10)
    same_dtype = looped_linear_attention_reference(Z, P, Q, 10)
    assert error_vs(out, ref) <= 4 * error_vs(same_dtype, ref) + 1e-6


def test_recompute_keeps_sqrt_loops_checkpoints():
    Z, P, Q = make(2, 3, 4, 16, 1, True)
    P4, Q4 = P[None, None], Q[None, None]
    _, saved_all = _looped_fwd(Z, P4, Q4, 16, 4, 1, "cpp")
    _, saved_some = _looped_fwd(Z, P4, Q4, 16, 4, 4, "cpp")
    assert saved_all.shape[0] == 16 and saved_some.shape[0] == 4


def test_return_all_states_and_their_gradients():
    Z, P, Q = make(2, 4, 6, 5, 2, False)
    leaves = [x.clone().requires_grad_() for x in (Z, P, Q)]
    ref_leaves = [x.clone().requires_grad_() for x in (Z, P, Q)]
    states = tessel.looped_linear_attention(*leaves, 5, return_all=True)
    ref = looped_linear_attention_reference(*ref_leaves, 5, return_all=True)
    assert states.shape == (5, *Z.shape) and error_vs(states, ref) < 1e-12
    states[2].sum().backward()  # through an intermediate state only
    ref[2].sum().backward()
    for a, b in zip(leaves, ref_leaves):
        assert error_vs(a.grad, b.grad) < 1e-10


def test_torch_compile_runs_through():
    Z, P, Q = make(4, 3, 6, 4, 1, True, dtype=torch.float32)
    leaves = [x.clone().requires_grad_() for x in (Z, P, Q)]

    def f(z, p, q):
        return tessel.looped_linear_attention(z, p, q, 4, recompute=True).square().sum()

    torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves).backward()
    eager = [x.clone().requires_grad_() for x in (Z, P, Q)]
    f(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_divergence_raises_instead_of_nan():
    Z, P, Q = make(4, 3, 6, 30, 1, True, dtype=torch.float32, scale=3.0)
    with pytest.raises(FloatingPointError, match="diverged"):
        tessel.looped_linear_attention(Z, P, Q, 30)
    with pytest.raises(FloatingPointError, match=r"diverged: .* at loop \d+ of 30 loops"):
        tessel.looped_linear_attention(Z, P, Q, 30, return_all=True)
    Z[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        tessel.looped_linear_attention(Z, P * 0.01, Q * 0.01, 2)


@pytest.mark.parametrize("kwargs", [dict(loops=0), dict(loops=2.0), dict(d=0, loops=2), dict(loops=3, heads=0)])
def test_looped_module_arguments_are_checked_at_construction(kwargs):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        tessel.nn.LoopedLinearTransformer(**{"d": 3, **kwargs})


def test_reference_and_triton_backends():
    Z, P, Q = make(2, 3, 4, 2, 1, True)
    ref = looped_linear_attention_reference(Z, P, Q, 2)
    tessel.set_backend("reference")
    assert torch.equal(tessel.looped_linear_attention(Z, P, Q, 2), ref)
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        tessel.set_backend("triton")  # the interpreter (conftest), computing in float32
        assert error_vs(tessel.looped_linear_attention(Z, P, Q, 2), ref) < 1e-5
    with pytest.raises(NotImplementedError, match="no Triton kernel for nothing"):
        tessel._dispatch.triton_module("nothing")


@pytest.mark.parametrize(
    "z_shape,p_shape,loops,error,match",
    [
        ((2, 4, 6, 1), (4, 4), 2, ValueError, r"Z must have 3 dims \(batch, d\+1, n\+1\)"),
        ((2, 4, 1), (4, 4), 2, ValueError, "n >= 1 examples"),
        ((2, 4, 6), (5, 5), 2, ValueError, r"P must have shape \(4, 4\), \(2, 4, 4\)"),
        ((2, 4, 6), (3, 4, 4), 2, ValueError, r"one matrix per loop must have shape \(2, 4, 4\)"),
        ((2, 4, 6), (3, 2, 4, 4), 2, ValueError, "P must have shape"),
        ((2, 4, 6), (4, 4), 0, ValueError, "loops must be an int >= 1"),
        ((2, 4, 6), (4, 4), 2.0, ValueError, "loops must be an int >= 1"),
        ((0, 4, 6), (4, 4), 2, ValueError, "Z must not be empty"),
    ],
)
def test_bad_input(z_shape, p_shape, loops, error, match):
    with pytest.raises(error, match=match):
        tessel.looped_linear_attention(torch.randn(z_shape), torch.randn(p_shape), torch.randn(p_shape), loops)


def test_bad_input_dtype_device_mask_and_mismatched_weights():
    Z, P, Q = torch.randn(2, 4, 6), torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(TypeError, match="P has dtype torch.float64 but Z has torch.float32"):
        tessel.looped_linear_attention(Z, P.double(), Q, 2)
    with pytest.raises(ValueError, match="Q is on meta but Z is on cpu"):
        tessel.looped_linear_attention(Z, P, Q.to("meta"), 2)
    with pytest.raises(ValueError, match="mask must be one of"):
        tessel.looped_linear_attention(Z, P, Q, 2, mask="causal")
    with pytest.raises(ValueError, match="P and Q must have the same shape"):
        tessel.looped_linear_attention(Z, P, torch.randn(2, 4, 4), 2)
    with pytest.raises(TypeError, match="Z must be float16"):
        tessel.looped_linear_attention(Z.int(), P, Q, 2)


def regression_task(batch, n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    y = (X @ w[:, :, None])[:, :, 0]
    x_query = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    return X, y, x_query, (x_query * w).sum(-1)


@pytest.mark.parametrize("heads", [1, 2])
def test_gd_initialisation_is_gradient_descent(heads):
    X, y, x_query, _ = regression_task(16, 20, 5)
    for loops in (1, 3, 8):
        model = tessel.nn.LoopedLinearTransformer(5, loops, heads=heads, init="gd", init_scale=0.5,
                                                  dtype=torch.float64)
        want = preconditioned_gd_predict(X, y, x_query, loops, lr=0.5)
        assert error_vs(model(X, y, x_query), want) < 1e-10


def test_gd_and_least_squares_baselines():
    X, y, x_query, truth = regression_task(8, 30, 4)
    assert error_vs(least_squares_predict(X, y, x_query), truth) < 1e-8
    gamma = torch.linalg.inv(X.mT @ X / 30)  # the ideal preconditioner: one step solves it
    assert error_vs(preconditioned_gd_predict(X, y, x_query, 1, preconditioner=gamma), truth) < 1e-8
    far = (preconditioned_gd_predict(X, y, x_query, 2, lr=0.3) - truth).abs().mean()
    near = (preconditioned_gd_predict(X, y, x_query, 200, lr=0.3) - truth).abs().mean()
    assert near < 1e-3 * far


def test_module_state_dict_round_trip_and_training_step():
    model = tessel.nn.LoopedLinearTransformer(4, 6, heads=2, shared=False)
    assert model.P.shape == (6, 2, 5, 5)
    clone = tessel.nn.LoopedLinearTransformer(4, 6, heads=2, shared=False)
    clone.load_state_dict(model.state_dict())
    X, y, x_query, truth = regression_task(32, 10, 4)
    X, y, x_query, truth = X.float(), y.float(), x_query.float(), truth.float()
    assert torch.equal(model(X, y, x_query), clone(X, y, x_query))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = (model(X, y, x_query) - truth).square().mean()
    loss.backward()
    opt.step()
    assert (model(X, y, x_query) - truth).square().mean() < loss
    assert "loops=6" in repr(model)


def test_icl_prompt_layout_and_errors():
    X, y, x_query, _ = regression_task(2, 3, 2)
    Z = tessel.nn.LoopedLinearTransformer.icl_prompt(X, y, x_query)
    assert Z.shape == (2, 3, 4)
    assert torch.equal(Z[:, :2, :3], X.mT) and torch.equal(Z[:, 2, :3], y)
    assert torch.equal(Z[:, :2, 3], x_query) and torch.all(Z[:, 2, 3] == 0)
    with pytest.raises(ValueError, match="y must have shape"):
        icl_prompt(X, y[:, :2], x_query)
