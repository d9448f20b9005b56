"""Linear attention, chunked: `linear_attention`, its kernels' custom ops and
the plain PyTorch references they are checked against.

Linear attention (`linear_attention`), layout (batch, heads, seq, dim) as
torch SDPA, phi the feature map, s = scale:

    causal:     o_t = s phi(q_t) S_t,   S_t = S_0 + sum_{u <= t} phi(k_u)^T v_u
    non-causal: o_t = s phi(q_t) S,     S   = S_0 + sum_u phi(k_u)^T v_u

With normalize=True the output is divided by s phi(q_t) z_t + eps, z_t =
z_0 + sum_{u <= t} phi(k_u) (all u when non-causal). Packed sequences
(cu_seqlens, flash-linear-attention's convention: batch 1) each run as their
own problem, with a state of their own. The kernels run the
chunked algorithm (flash-linear-attention's chunk mode): an intra-chunk masked
product plus the state carried across chunks, O(N D Dv), never the N x N
matrix. The state (S, and z when normalizing) has one copy per k/v head
(B, Hkv, D, Dv): q heads of a GQA group read the same one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _C_ops, _dispatch
from ._dispatch import check_same, check_scale, check_tensor
from ._ops import acc_dtype

FEATURE_MAPS = ("identity", "elu1", "relu")
# Added to the normaliser s phi(q_t) z_t (as in Katharopoulos et al.'s fast-transformers).
NORMALIZE_EPS = 1e-6
CHUNK = 64
_LAYOUT = "(batch, heads, seq, dim)"


def feature_map_fn(name: str):
    """phi for a feature map name: identity, elu1 (elu(x) + 1) or relu."""
    if name == "identity":
        return lambda x: x
    if name == "elu1":
        return lambda x: F.elu(x) + 1
    if name == "relu":
        return F.relu
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


def linear_attention_recurrent(q, k, v, *, causal=True, feature_map="identity", normalize=False, scale=None,
                               initial_state=None, return_state=False, eps=NORMALIZE_EPS):
    """The definition, token by token (slow, obviously correct): the state is
    updated one token at a time and each output read from it."""
    acc = acc_dtype(q.dtype)
    phi = feature_map_fn(feature_map)
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fq = phi(q.to(acc)) * scale
    fk = phi(k.to(acc)).repeat_interleave(group, dim=1)
    vv = v.to(acc).repeat_interleave(group, dim=1)
    b, h, d, dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    S = q.new_zeros(b, h, d, dv, dtype=acc)
    z = q.new_zeros(b, h, d, dtype=acc)
    if initial_state is not None:
        s0, z0 = initial_state if normalize else (initial_state, None)
        S = S + s0.to(acc).repeat_interleave(group, dim=1)
        if z0 is not None:
            z = z + z0.to(acc).repeat_interleave(group, dim=1)
    if not causal:
        S = S + fk.mT @ vv
        z = z + fk.sum(2)
    outs = []
    for t in range(q.shape[2]):
        if causal:
            S = S + fk[:, :, t, :, None] * vv[:, :, t, None, :]
            z = z + fk[:, :, t]
        o = (fq[:, :, t, None, :] @ S)[:, :, 0]
        if normalize:
            o = o / ((fq[:, :, t] * z).sum(-1, keepdim=True) + eps)
        outs.append(o)
    out = torch.stack(outs, dim=2).to(q.dtype)
    if not return_state:
        return out
    S, z = S[:, ::group], z[:, ::group]
    return out, ((S, z) if normalize else S)


def _quadratic_core(q, k, v, state0, scale, causal):
    """o = s (mask(q k^T) v + q S_0), with the full (Nq, Nk) matrix."""
    acc, group = acc_dtype(q.dtype), q.shape[1] // k.shape[1]
    q, k, v = q.to(acc) * scale, k.to(acc), v.to(acc)
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ kk.mT
    if causal:
        scores = scores.tril()
    out = scores @ vv
    state = k.mT @ v
    if state0 is not None:
        out = out + q @ state0.to(acc).repeat_interleave(group, dim=1)
        state = state + state0.to(acc)
    return out, state


def _chunked_core(q, k, v, state0, scale, causal, chunk=CHUNK):
    """The chunked algorithm in batched PyTorch matmuls: per chunk the masked
    intra-chunk product plus q times the state before the chunk (an exclusive
    cumulative sum of the chunks' k^T v)."""
    acc = acc_dtype(q.dtype)
    b, h, n, d = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    q = q.to(acc).view(b, hk, h // hk, n, d) * scale  # q heads grouped by their kv head
    k, v = k.to(acc), v.to(acc)
    if not causal:
        state = k.mT @ v
        if state0 is not None:
            state = state + state0.to(acc)
        return (q @ state[:, :, None]).view(b, h, n, dv), state
    pad = (-n) % chunk
    if pad:
        q, k, v = F.pad(q, (0, 0, 0, pad)), F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    nc = (n + pad) // chunk
    qc = q.view(b, hk, h // hk, nc, chunk, d)
    kc, vc = k.view(b, hk, nc, chunk, d), v.view(b, hk, nc, chunk, dv)
    kv = kc.mT @ vc  # (b, hk, nc, d, dv)
    before = kv.cumsum(2) - kv
    if state0 is not None:
        before = before + state0.to(acc)[:, :, None]
    scores = (qc @ kc[:, :, None].mT).tril()
    out = scores @ vc[:, :, None] + qc @ before[:, :, None]
    out = out.view(b, h, n + pad, dv)[:, :, :n]
    return out, before[:, :, -1] + kv[:, :, -1]


def check_linear_inputs(q, k, v, causal, feature_map, scale, eps) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4, _LAYOUT)
    check_same(("q", "k", "v"), (q, k, v))
    (b, h, nq, d), (bk, hk, nk, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if bk != b or bv != b:
        raise ValueError(f"q, k, v must share the batch size, got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if dk != d:
        raise ValueError(f"k has dim {dk} but q has dim {d}: shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if (hv, nv) != (hk, nk):
        raise ValueError(f"v must have k's heads and length {(hk, nk)}, got shape {tuple(v.shape)} {_LAYOUT}")
    if h % hk != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hk}) for grouped-query attention")
    if causal and nq != nk:
        raise ValueError(f"causal linear attention needs q and k of one length, got {nq} and {nk}")
    feature_map_fn(feature_map)
    check_scale(scale)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_packed(cu_seqlens, q, k) -> None:
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences into a batch of one, got batch {q.shape[0]} "
                         f"(shape {tuple(q.shape)} {_LAYOUT})")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"cu_seqlens packs q and k alike: they need one length, got {q.shape[2]} and {k.shape[2]}")
    _dispatch.check_cu_seqlens("cu_seqlens", cu_seqlens, q.shape[2], q.device)


def _state_inputs(initial_state, normalize, q, k, v, cu_seqlens=None):
    """(S_0, z_0) as given (z_0 None without normalize), checked: one state
    per batch element, or per packed sequence."""
    if initial_state is None:
        return None, None
    b, hk, d, dv = _state_shape(k, v, cu_seqlens)
    if normalize:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state must be a pair (S, z) with normalize=True (S of shape "
                             f"{(b, hk, d, dv)}, z of shape {(b, hk, d)}), got {type(initial_state).__name__}")
        s0, z0 = initial_state
        expected = (("initial_state[0]", s0, (b, hk, d, dv)), ("initial_state[1]", z0, (b, hk, d)))
    else:
        s0, z0 = initial_state, None
        expected = (("initial_state", s0, (b, hk, d, dv)),)
    for name, x, shape in expected:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} ({'batch' if cu_seqlens is None else 'sequences'}, "
                             f"kv heads, dim{', dim_v' if len(shape) == 4 else ''}), got {tuple(x.shape)}")
        if x.dtype not in _dispatch.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}: use one device")
    return s0, z0


# ---------------------------------------------------------------- kernels


def _state_shape(k, v, cu_seqlens):
    """(states, Hkv, D, Dv): a state per batch element, or per packed sequence."""
    states = k.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return states, k.shape[1], k.shape[-1], v.shape[-1]


# Defined in C++ (csrc/ops.cpp, tessel._C_ops): schema, CPU kernels through tessel._C_<level>, autograd. Here:
# their fakes for torch.compile, and the Triton kernels their backend "triton" runs.
_linear_fwd = torch.ops.tessel.linear_attention_fwd.default
_linear_bwd = torch.ops.tessel.linear_attention_bwd.default


@torch.library.register_fake("tessel::linear_attention_fwd")
def _linear_fwd_fake(q, k, v, state0, cu_seqlens, scale, causal, backend):
    b, h, nq, _ = q.shape
    return q.new_empty(b, h, nq, v.shape[-1]), q.new_empty(_state_shape(k, v, cu_seqlens), dtype=acc_dtype(q.dtype))


@torch.library.register_fake("tessel::linear_attention_bwd")
def _linear_bwd_fake(q, k, v, state0, cu_seqlens, state, dout, dstate, scale, causal, backend):
    ds0 = q.new_empty(_state_shape(k, v, cu_seqlens), dtype=acc_dtype(q.dtype))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds0


def _triton_forward(q, k, v, state0, cu_seqlens, scale, causal):
    out, state = _dispatch.triton_module("linear_attention").linear_forward(q, k, v, state0, cu_seqlens, scale, causal)
    return out.to(q.dtype), state.to(acc_dtype(q.dtype))


def _triton_backward(q, k, v, state0, cu_seqlens, state, dout, dstate, scale, causal):
    dq, dk, dv, ds0 = _dispatch.triton_module("linear_attention").linear_backward(
        q, k, v, state0, cu_seqlens, state, dout, dstate, scale, causal)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds0.to(acc_dtype(q.dtype))


_C_ops.set_triton_kernel("linear_attention_fwd", _triton_forward)
_C_ops.set_triton_kernel("linear_attention_bwd", _triton_backward)


def _forward(q, k, v, state0, cu_seqlens, scale, causal, backend):
    """tessel::linear_attention_fwd: eagerly called from C++ (_C_ops.linear_attention_fwd, through the same
    dispatcher); torch.compile traces torch.ops."""
    forward = _linear_fwd if torch.compiler.is_compiling() else _C_ops.linear_attention_fwd
    return forward(q, k, v, state0, cu_seqlens, scale, causal, backend)


def _linear_attention_with(core, q, k, v, causal, feature_map, normalize, scale, initial_state, return_state, eps,
                           cu_seqlens=None):
    """Feature maps, scale, normalisation and state around `core`, which maps
    (phi(q), phi(k), v, S_0 or None, scale, causal) to (out, final state)."""
    s0, z0 = _state_inputs(initial_state, normalize, q, k, v, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    phi = feature_map_fn(feature_map)
    acc = acc_dtype(q.dtype)
    state0 = None if s0 is None else s0.to(acc)
    if normalize:
        # z is the state of one more value column of ones: one kernel call serves both.
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        if state0 is not None:
            state0 = torch.cat([state0, z0.to(acc)[..., None]], dim=-1)
    out, state = core(phi(q), phi(k), v, state0, scale, causal)
    if normalize:
        out = out[..., :-1].to(acc) / (out[..., -1:].to(acc) + eps)
        state = (state[..., :-1], state[..., -1])
    out = out.to(q.dtype)
    return (out, state) if return_state else out


def linear_attention(q, k, v, *, causal=True, feature_map="identity", normalize=False, scale=None,
                     initial_state=None, return_state=False, eps=NORMALIZE_EPS, cu_seqlens=None):
    """Linear attention, chunked: O(N D Dv) time, O(D Dv) state per head.

    q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), H a multiple of
    Hkv (GQA: q heads of a group share their kv head's state). causal: o_t
    sees tokens u <= t (needs Nq == Nk); otherwise every token. feature_map:
    "identity", "elu1" (elu(x) + 1) or "relu", applied to q and k. scale
    multiplies phi(q) (default 1/sqrt(D)). normalize divides each output by
    scale * phi(q_t) z_t + eps (z_t: the running sum of phi(k)).
    initial_state / the returned state: S of shape (B, Hkv, D, Dv), or with
    normalize the pair (S, z), z of shape (B, Hkv, D); float32 for half
    inputs, else q's dtype. Feeding the state of one piece into the next gives
    exactly the result on the whole sequence (a decoder steps with Nq = 1).
    cu_seqlens: packed sequences (flash-linear-attention's convention): B = 1,
    sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1] of q, k and v (so
    Nq == Nk), int32 on q's device; each has its own state (reset at every
    boundary), so initial_state and the returned state hold one per
    sequence: (sequences, Hkv, D, Dv).
    Returns out (B, H, Nq, Dv), and the final state with return_state.
    Differentiable in q, k, v and initial_state.
    """
    check_linear_inputs(q, k, v, causal, feature_map, scale, eps)
    if cu_seqlens is not None:
        _check_packed(cu_seqlens, q, k)
    backend = _dispatch.resolve_backend("linear_attention", q.device)
    if backend == "reference":
        return linear_attention_reference(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                          scale=scale, initial_state=initial_state, return_state=return_state,
                                          eps=eps, cu_seqlens=cu_seqlens)

    def core(fq, fk, v, state0, scale, causal):
        return _forward(fq, fk, v, state0, cu_seqlens, scale, causal, backend)

    return _linear_attention_with(core, q, k, v, causal, feature_map, normalize, scale, initial_state,
                                  return_state, eps, cu_seqlens)


def linear_attention_reference(q, k, v, *, causal=True, feature_map="identity", normalize=False, scale=None,
                               initial_state=None, return_state=False, eps=NORMALIZE_EPS, method="chunked",
                               cu_seqlens=None):
    """linear_attention in plain PyTorch: method "chunked" (batched matmuls,
    what backend "reference" runs), "quadratic" (the masked (Nq, Nk) matrix)
    or "recurrent" (token by token, linear_attention_recurrent); packed
    sequences (cu_seqlens) by a loop over them."""
    kwargs = dict(causal=causal, feature_map=feature_map, normalize=normalize, scale=scale, eps=eps, method=method)
    if cu_seqlens is not None:
        return _by_sequence(q, k, v, cu_seqlens, initial_state, return_state, kwargs)
    if method == "recurrent":
        return linear_attention_recurrent(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                          scale=scale, initial_state=initial_state, return_state=return_state,
                                          eps=eps)
    core = {"chunked": _chunked_core, "quadratic": _quadratic_core}[method]
    return _linear_attention_with(core, q, k, v, causal, feature_map, normalize, scale, initial_state,
                                  return_state, eps)


def _by_sequence(q, k, v, cu_seqlens, initial_state, return_state, kwargs):
    """The reference on each packed sequence with its own state; an empty
    sequence passes its state through."""
    acc, normalize = acc_dtype(q.dtype), kwargs["normalize"]
    _, hk, d, dv = _state_shape(k, v, cu_seqlens)
    outs, states = [], []
    bounds = cu_seqlens.tolist()
    for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        if initial_state is None:
            init = None
        else:
            init = tuple(x[i:i + 1] for x in initial_state) if normalize else initial_state[i:i + 1]
        if e > a:
            out, state = linear_attention_reference(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], initial_state=init,
                                                    return_state=True, **kwargs)
        else:
            out = q.new_empty(1, q.shape[1], 0, dv)
            s0, z0 = (None, None) if init is None else (init if normalize else (init, None))
            S = q.new_zeros(1, hk, d, dv, dtype=acc) if s0 is None else s0.to(acc)
            z = q.new_zeros(1, hk, d, dtype=acc) if z0 is None else z0.to(acc)
            state = (S, z) if normalize else S
        outs.append(out)
        states.append(state)
    out = torch.cat(outs, dim=2)
    if not return_state:
        return out
    if normalize:
        return out, tuple(torch.cat(part) for part in zip(*states))
    return out, torch.cat(states)
