"""tessel.linear_attention with cu_seqlens (packed sequences, a state per
sequence, flash-linear-attention's convention) against the token-by-token
recurrence run on each sequence alone: C++ and Triton (the interpreter on
CPU), empty and one-token sequences, initial and final states per sequence,
normalisation, gradients, bad input."""
import importlib.util

import pytest
import torch
from conftest import error_vs

import tessel
from tessel.linear_attention import linear_attention_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
LENGTHS = [5, 0, 70, 1, 23]


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def pack(lengths, h=4, hk=2, d=16, dv=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, s = sum(lengths), len(lengths)
    q = torch.randn(1, h, n, d, generator=gen)
    k, v = torch.randn(1, hk, n, d, generator=gen), torch.randn(1, hk, n, dv, generator=gen)
    states = (torch.randn(s, hk, d, dv, generator=gen), torch.rand(s, hk, d, generator=gen))
    return [x.to(dtype) for x in (q, k, v)], [x.to(dtype) for x in states]


def run(fn, tensors, init, kwargs, seed=1):
    """out, final state(s) and the gradients of a random loss over both."""
    leaves = [x.clone().requires_grad_() for x in tensors]
    init_leaves = None if init is None else [x.clone().requires_grad_() for x in init]
    given = None if init is None else (tuple(init_leaves) if kwargs.get("normalize") else init_leaves[0])
    out, state = fn(*leaves, initial_state=given, return_state=True, **kwargs)
    states = state if isinstance(state, tuple) else (state,)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen).to(out.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=gen).to(s.dtype)).sum() for s in states)
    loss.backward()
    grads = [x.grad for x in leaves + (init_leaves or [])[:len(states)]]
    return out, states, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize, with_state", [(False, False), (False, True), (True, True)])
def test_each_sequence_is_its_own_problem(backend, causal, normalize, with_state):
    tensors, states = pack(LENGTHS)
    init = (states if normalize else states[:1]) if with_state else None
    kwargs = dict(causal=causal, normalize=normalize, feature_map="elu1" if normalize else "identity",
                  cu_seqlens=cu(LENGTHS))

    def ours(*args, **kw):
        with tessel.using_backend(backend):
            return tessel.linear_attention(*args, **kw)

    def exact(*args, **kw):
        return linear_attention_reference(*args, method="recurrent", **kw)

    out, got, grads = run(ours, tensors, init, kwargs)
    ref, want, ref_grads = run(exact, [x.double() for x in tensors],
                               None if init is None else [x.double() for x in init], kwargs)
    assert out.shape == tensors[0].shape[:3] + (8,) and all(s.shape[0] == len(LENGTHS) for s in got)
    assert error_vs(out, ref) <= 2e-4
    for s, w in zip(got, want):
        assert error_vs(s, w) <= 2e-4 * max(1.0, w.abs().max().item())
    for g, w in zip(grads, ref_grads):
        assert error_vs(g, w) <= 2e-4 * max(1.0, w.abs().max().item())


def test_packed_equals_separate_calls_and_empty_sequences_pass_the_state():
    (q, k, v), (s0, _) = pack(LENGTHS, dtype=torch.float64)
    out, state = tessel.linear_attention(q, k, v, initial_state=s0, return_state=True, cu_seqlens=cu(LENGTHS))
    bounds = cu(LENGTHS).tolist()
    for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if e == a:
            assert torch.equal(state[i], s0[i])
            continue
        alone, alone_state = tessel.linear_attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e],
                                                     initial_state=s0[i:i + 1], return_state=True)
        assert error_vs(out[:, :, a:e], alone) <= 1e-12 and error_vs(state[i:i + 1], alone_state) <= 1e-12


def test_gradcheck_float64():
    lengths = [3, 0, 5, 1]
    (q, k, v), (s0, _) = pack(lengths, h=2, hk=1, d=3, dv=2, dtype=torch.float64)

    def fn(q, k, v, s0):
        return tessel.linear_attention(q, k, v, initial_state=s0, return_state=True, cu_seqlens=cu(lengths))

    assert torch.autograd.gradcheck(fn, [x.requires_grad_() for x in (q, k, v, s0)])


def test_reference_backend_and_torch_compile():
    (q, k, v), _ = pack(LENGTHS)
    c = cu(LENGTHS)
    eager = tessel.linear_attention(q, k, v, cu_seqlens=c)
    with tessel.using_backend("reference"):
        assert error_vs(tessel.linear_attention(q, k, v, cu_seqlens=c), eager) <= 1e-5
    compiled = torch.compile(lambda q, k, v: tessel.linear_attention(q, k, v, cu_seqlens=c), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(q, k, v), eager)


@pytest.mark.parametrize("change, error, match", [
    (dict(q=torch.randn(2, 4, 99, 16), k=torch.randn(2, 2, 99, 16), v=torch.randn(2, 2, 99, 8)), ValueError,
     r"cu_seqlens packs sequences into a batch of one, got batch 2"),
    (dict(causal=False, k=torch.randn(1, 2, 50, 16), v=torch.randn(1, 2, 50, 8)), ValueError,
     r"cu_seqlens packs q and k alike: they need one length, got 99 and 50"),
    (dict(cu_seqlens=torch.tensor([0, 5, 98], dtype=torch.int32)), ValueError,
     r"cu_seqlens must rise from 0 to the packed length 99"),
    (dict(cu_seqlens=torch.tensor([0.0, 99.0])), ValueError, r"cu_seqlens must be a 1-D int32 tensor"),
    (dict(cu_seqlens=[0, 99]), TypeError, r"cu_seqlens must be a torch.Tensor"),
    (dict(initial_state=torch.zeros(1, 2, 16, 8)), ValueError,
     r"initial_state must have shape \(5, 2, 16, 8\) \(sequences, kv heads, dim, dim_v\)"),
])
def test_bad_input(change, error, match):
    (q, k, v), _ = pack(LENGTHS)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu(LENGTHS))
    args.update(change)
    with pytest.raises(error, match=match):
        tessel.linear_attention(**args)
