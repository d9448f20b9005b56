"""Linear-attention loops: chunked linear attention, the looped linear
transformer, their references and the in-context regression baselines.

Linear attention (`linear_attention`), layout (batch, heads, seq, dim) as
torch SDPA, phi the feature map, s = scale:

    causal:     o_t = s phi(q_t) S_t,   S_t = S_0 + sum_{u <= t} phi(k_u)^T v_u
    non-causal: o_t = s phi(q_t) S,     S   = S_0 + sum_u phi(k_u)^T v_u

With normalize=True the output is divided by s phi(q_t) z_t + eps, z_t =
z_0 + sum_{u <= t} phi(k_u) (all u when non-causal). The kernels run the
chunked algorithm (flash-linear-attention's chunk mode): an intra-chunk masked
product plus the state carried across chunks, O(N D Dv), never the N x N
matrix. The state (S, and z when normalizing) has one copy per k/v head
(B, Hkv, D, Dv): q heads of a GQA group read the same one.

The looped linear transformer ("Can looped transformers learn to implement
multi-step gradient descent for in-context learning?"; "On the role of depth
and looping for in-context learning with task diversity"): one linear
self-attention layer, weights (P, Q), applied `loops` times to the prompt
matrix Z = [[x_1 .. x_n, x_q], [y_1 .. y_n, 0]] of shape (d+1, n+1):

    Z <- Z + (1/n) sum_h P_h Z M (Z^T Q_h Z),   M = diag(1, .., 1, 0)

(M keeps the query column from acting as a key). The prediction for x_q is
-Z[d, n] after the last loop. The kernels compute each loop as
Z + (1/n) (sum_h P_h A Q_h) Z with A = Z M Z^T: O(n d^2) per loop, never the
(n+1) x (n+1) matrix, all loops fused in one call.

Weights: P, Q of shape (d+1, d+1) (shared by every loop), (loops, d+1, d+1)
(one pair per loop) or (1 or loops, heads, d+1, d+1) (heads summed).

Divergence: a prompt whose Z leaves the dtype's range raises
FloatingPointError (never a silent NaN).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _dispatch
from ._dispatch import check_same, check_scale, check_tensor, cpp_dtype, last_dim_contiguous, numpy_view

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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and references accumulate in float32 (float64 for float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention_recurrent(q, k, v, *, causal=True, feature_map="identity", normalize=False, scale=None,
                               initial_state=None, return_state=False, eps=NORMALIZE_EPS):
    """The definition, token by token (slow, obviously correct): the state is
    updated one token at a time and each output read from it."""
    acc = _acc_dtype(q.dtype)
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
    acc, group = _acc_dtype(q.dtype), q.shape[1] // k.shape[1]
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
    acc = _acc_dtype(q.dtype)
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


def _state_inputs(initial_state, normalize, q, k, v):
    """(S_0, z_0) as given (z_0 None without normalize), checked."""
    if initial_state is None:
        return None, None
    b, hk, d, dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
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
            raise ValueError(f"{name} must have shape {shape} (batch, kv heads, dim"
                             f"{', dim_v' if len(shape) == 4 else ''}), got {tuple(x.shape)}")
        if x.dtype not in _dispatch.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}: use one device")
    return s0, z0


# ---------------------------------------------------------------- kernels


def _linear_forward_cpp(q, k, v, state0, scale, causal):
    work = cpp_dtype(q.dtype)
    q, k, v = (last_dim_contiguous(x.to(work)) for x in (q, k, v))
    b, h, nq, _ = q.shape
    out = torch.empty(b, h, nq, v.shape[-1], dtype=work)
    state = torch.empty(b, k.shape[1], k.shape[-1], v.shape[-1], dtype=work)
    s0 = None if state0 is None else numpy_view(state0.to(work).contiguous())
    _dispatch.cpp_module().linear_forward(
        numpy_view(q), numpy_view(k), numpy_view(v), s0, numpy_view(out), numpy_view(state),
        scale, causal, torch.get_num_threads(),
    )
    return out, state


def _linear_backward_cpp(q, k, v, state0, state, dout, dstate, scale, causal):
    work = cpp_dtype(q.dtype)
    q, k, v, dout = (last_dim_contiguous(x.to(work)) for x in (q, k, v, dout))
    s0 = None if state0 is None else numpy_view(state0.to(work).contiguous())
    state = numpy_view(state.to(work).contiguous())
    ds = None if dstate is None else numpy_view(dstate.to(work).contiguous())
    dq, dk, dv = torch.empty(q.shape, dtype=work), torch.empty(k.shape, dtype=work), torch.empty(v.shape, dtype=work)
    ds0 = torch.empty(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], dtype=work)
    _dispatch.cpp_module().linear_backward(
        numpy_view(q), numpy_view(k), numpy_view(v), s0, state, numpy_view(dout), ds,
        numpy_view(dq), numpy_view(dk), numpy_view(dv), numpy_view(ds0), scale, causal, torch.get_num_threads(),
    )
    return dq, dk, dv, ds0


@torch.library.custom_op("tessel::linear_attn_fwd", mutates_args=())
def _linear_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state0: torch.Tensor | None, scale: float, causal: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cpp":
        out, state = _linear_forward_cpp(q, k, v, state0, scale, causal)
    else:
        out, state = _dispatch.triton_module("linear_attention").linear_forward(q, k, v, state0, scale, causal)
    return out.to(q.dtype), state.to(_acc_dtype(q.dtype))


@_linear_fwd.register_fake
def _(q, k, v, state0, scale, causal, backend):
    b, h, nq, _ = q.shape
    out = q.new_empty(b, h, nq, v.shape[-1])
    return out, q.new_empty(b, k.shape[1], k.shape[-1], v.shape[-1], dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("tessel::linear_attn_bwd", mutates_args=())
def _linear_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state0: torch.Tensor | None, state: torch.Tensor,
    dout: torch.Tensor, dstate: torch.Tensor | None, scale: float, causal: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # state: the forward's final state; the non-causal backward reads it as S.
    if backend == "cpp":
        dq, dk, dv, ds0 = _linear_backward_cpp(q, k, v, state0, state, dout, dstate, scale, causal)
    else:
        dq, dk, dv, ds0 = _dispatch.triton_module("linear_attention").linear_backward(
            q, k, v, state0, state, dout, dstate, scale, causal
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), ds0.to(_acc_dtype(q.dtype))


@_linear_bwd.register_fake
def _(q, k, v, state0, state, dout, dstate, scale, causal, backend):
    ds0 = q.new_empty(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], dtype=_acc_dtype(q.dtype))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds0


def _linear_setup_context(ctx, inputs, output):
    q, k, v, state0, scale, causal, backend = inputs
    ctx.save_for_backward(q, k, v, state0, output[1])
    ctx.args = (scale, causal, backend)
    ctx.state0_dtype = None if state0 is None else state0.dtype


def _linear_backward(ctx, dout, dstate):
    q, k, v, state0, state = ctx.saved_tensors
    dq, dk, dv, ds0 = _linear_bwd(q, k, v, state0, state, dout, dstate, *ctx.args)
    ds0 = None if ctx.state0_dtype is None else ds0.to(ctx.state0_dtype)
    return dq, dk, dv, ds0, None, None, None


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _linear_attention_with(core, q, k, v, causal, feature_map, normalize, scale, initial_state, return_state, eps):
    """Feature maps, scale, normalisation and state around `core`, which maps
    (phi(q), phi(k), v, S_0 or None, scale, causal) to (out, final state)."""
    s0, z0 = _state_inputs(initial_state, normalize, q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    phi = feature_map_fn(feature_map)
    acc = _acc_dtype(q.dtype)
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
                     initial_state=None, return_state=False, eps=NORMALIZE_EPS):
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
    Returns out (B, H, Nq, Dv), and the final state with return_state.
    Differentiable in q, k, v and initial_state.
    """
    check_linear_inputs(q, k, v, causal, feature_map, scale, eps)
    backend = _dispatch.resolve_backend("linear_attention", q.device)
    if backend == "reference":
        core = _chunked_core
    else:
        def core(fq, fk, v, state0, scale, causal):
            return _linear_fwd(fq, fk, v, state0, scale, causal, backend)
    return _linear_attention_with(core, q, k, v, causal, feature_map, normalize, scale, initial_state,
                                  return_state, eps)


def linear_attention_reference(q, k, v, *, causal=True, feature_map="identity", normalize=False, scale=None,
                               initial_state=None, return_state=False, eps=NORMALIZE_EPS, method="chunked"):
    """linear_attention in plain PyTorch: method "chunked" (batched matmuls,
    what backend "reference" runs), "quadratic" (the masked (Nq, Nk) matrix)
    or "recurrent" (token by token, linear_attention_recurrent)."""
    if method == "recurrent":
        return linear_attention_recurrent(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize,
                                          scale=scale, initial_state=initial_state, return_state=return_state,
                                          eps=eps)
    core = {"chunked": _chunked_core, "quadratic": _quadratic_core}[method]
    return _linear_attention_with(core, q, k, v, causal, feature_map, normalize, scale, initial_state,
                                  return_state, eps)


MASKS = ("last_col", "none")
_Z_LAYOUT = "(batch, d+1, n+1)"


def _as_stack(w: torch.Tensor) -> torch.Tensor:
    """P or Q as (weight_loops, heads, d+1, d+1)."""
    if w.dim() == 2:
        return w[None, None]
    if w.dim() == 3:
        return w[:, None]
    return w


def _weights_for_loop(w4: torch.Tensor, loop: int) -> torch.Tensor:
    return w4[0 if w4.shape[0] == 1 else loop]


def looped_linear_attention_reference(Z, P, Q, loops, *, mask="last_col", return_all=False):
    """The update exactly as written, with the (n+1) x (n+1) attention matrix.

    Plain PyTorch autograd; what the kernels are tested against.
    """
    n = Z.shape[-1] - 1
    keep = torch.ones(Z.shape[-1], dtype=Z.dtype, device=Z.device)
    if mask == "last_col":
        keep[-1] = 0
    P4, Q4 = _as_stack(P), _as_stack(Q)
    states = []
    for loop in range(loops):
        update = 0
        for p_h, q_h in zip(_weights_for_loop(P4, loop), _weights_for_loop(Q4, loop)):
            scores = Z.mT @ q_h @ Z  # (batch, n+1, n+1)
            update = update + p_h @ (Z * keep) @ scores
        Z = Z + update / n
        states.append(Z)
    return torch.stack(states) if return_all else Z


def check_looped_inputs(Z, P, Q, loops, mask) -> None:
    check_tensor("Z", Z, 3, _Z_LAYOUT)
    for name, w in (("P", P), ("Q", Q)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    check_same(("Z", "P", "Q"), (Z, P, Q))
    if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
        raise ValueError(f"loops must be an int >= 1, got {loops!r}")
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    dim, cols = Z.shape[1], Z.shape[2]
    if cols < 2:
        raise ValueError(f"Z must hold n >= 1 examples plus the query: shape {_Z_LAYOUT}, got {tuple(Z.shape)}")
    for name, w in (("P", P), ("Q", Q)):
        expected = (
            f"({dim}, {dim}), ({loops}, {dim}, {dim}) or (1 or {loops}, heads, {dim}, {dim}) for Z of shape "
            f"{tuple(Z.shape)}"
        )
        if w.dim() not in (2, 3, 4) or w.shape[-2:] != (dim, dim):
            raise ValueError(f"{name} must have shape {expected}, got {tuple(w.shape)}")
        if w.dim() == 3 and w.shape[0] != loops:
            raise ValueError(f"{name} with one matrix per loop must have shape ({loops}, {dim}, {dim}), "
                             f"got {tuple(w.shape)}")
        if w.dim() == 4 and w.shape[0] not in (1, loops):
            raise ValueError(f"{name} must have shape {expected}, got {tuple(w.shape)}")
    if P.shape != Q.shape:
        raise ValueError(f"P and Q must have the same shape, got {tuple(P.shape)} and {tuple(Q.shape)}")


# ---------------------------------------------------------------- kernels


def _checkpoint_every(loops: int, recompute: bool) -> int:
    return max(1, math.isqrt(loops - 1) + 1) if recompute else 1


def _forward_cpp(Z, P, Q, loops, key_cols, every):
    """(Z after the loops, saved states, how many prompts ended non-finite)."""
    work = cpp_dtype(Z.dtype)
    z, p, q = (x.to(work).contiguous() for x in (Z, P, Q))
    out = torch.empty_like(z)
    saved = torch.empty((loops + every - 1) // every, *z.shape, dtype=work)
    nonfinite = _dispatch.cpp_module().looped_forward(
        numpy_view(z), numpy_view(p), numpy_view(q), numpy_view(out), numpy_view(saved),
        loops, key_cols, 1.0 / (z.shape[-1] - 1), every, torch.get_num_threads(),
    )
    return out, saved, nonfinite


def _backward_cpp(saved, P, Q, dout, loops, key_cols, every):
    work = saved.dtype
    p, q, g = (x.to(work).contiguous() for x in (P, Q, dout))
    dz = torch.empty(saved.shape[1:], dtype=work)
    dp, dq = torch.empty_like(p), torch.empty_like(q)
    _dispatch.cpp_module().looped_backward(
        numpy_view(saved), numpy_view(p), numpy_view(q), numpy_view(g), numpy_view(dz), numpy_view(dp),
        numpy_view(dq), loops, key_cols, 1.0 / (dz.shape[-1] - 1), every, torch.get_num_threads(),
    )
    return dz, dp, dq


@torch.library.custom_op("tessel::looped_lsa_fwd", mutates_args=())
def _looped_fwd(
    Z: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, loops: int, key_cols: int, every: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cpp":
        out, saved, nonfinite = _forward_cpp(Z, P, Q, loops, key_cols, every)
    else:
        out, saved, nonfinite = _dispatch.triton_module("linear_attention").looped_forward(
            Z, P, Q, loops, key_cols, every
        )
    if nonfinite:
        raise FloatingPointError(
            f"looped_linear_attention diverged: Z of {nonfinite} of {Z.shape[0]} prompts left the range of "
            f"{Z.dtype} within {_loops_text(loops)} (or the input was not finite); use fewer loops or smaller P, Q"
        )
    return out.to(Z.dtype), saved


def _loops_text(loops: int) -> str:
    return f"{loops} loop" + ("s" if loops != 1 else "")


@_looped_fwd.register_fake
def _(Z, P, Q, loops, key_cols, every, backend):
    saved = Z.new_empty(((loops + every - 1) // every, *Z.shape), dtype=cpp_dtype(Z.dtype))
    return torch.empty_like(Z, memory_format=torch.contiguous_format), saved


@torch.library.custom_op("tessel::looped_lsa_bwd", mutates_args=())
def _looped_bwd(
    saved: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, dout: torch.Tensor,
    loops: int, key_cols: int, every: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cpp":
        dz, dp, dq = _backward_cpp(saved, P, Q, dout, loops, key_cols, every)
    else:
        dz, dp, dq = _dispatch.triton_module("linear_attention").looped_backward(
            saved, P, Q, dout, loops, key_cols, every
        )
    return dz.to(dout.dtype), dp.to(P.dtype), dq.to(Q.dtype)


@_looped_bwd.register_fake
def _(saved, P, Q, dout, loops, key_cols, every, backend):
    return torch.empty_like(dout), torch.empty_like(P), torch.empty_like(Q)


def _setup_context(ctx, inputs, output):
    Z, P, Q, loops, key_cols, every, backend = inputs
    ctx.save_for_backward(output[1], P, Q)
    ctx.args = (loops, key_cols, every, backend)


def _backward(ctx, dout, _dsaved):
    saved, P, Q = ctx.saved_tensors
    dz, dp, dq = _looped_bwd(saved, P, Q, dout, *ctx.args)
    return dz, dp, dq, None, None, None, None


_looped_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public API


def looped_linear_attention(Z, P, Q, loops, *, mask="last_col", return_all=False, recompute=False):
    """Apply the linear self-attention layer (P, Q) `loops` times to Z.

    Z: (batch, d+1, n+1) prompt matrices. P, Q: (d+1, d+1) shared by every
    loop, (loops, d+1, d+1) one pair per loop, or (1 or loops, heads, d+1, d+1)
    with heads summed. mask="last_col" keeps the query column from acting as a
    key (M = diag(1, .., 1, 0)); "none" lets every column act as one.
    Returns Z after the last loop, or with return_all a (loops, batch, d+1,
    n+1) stack of Z after each loop. Differentiable in Z, P and Q; the
    backward either keeps Z before every loop (recompute=False, fastest) or
    only every ~sqrt(loops)-th, recomputing the rest (recompute=True, memory
    O(sqrt(loops)) copies of Z). Raises FloatingPointError if Z diverges.
    """
    check_looped_inputs(Z, P, Q, loops, mask)
    backend = _dispatch.resolve_backend("looped_linear_attention", Z.device)
    if backend == "reference":
        return looped_linear_attention_reference(Z, P, Q, loops, mask=mask, return_all=return_all)
    P4, Q4 = _as_stack(P), _as_stack(Q)
    key_cols = Z.shape[-1] - 1 if mask == "last_col" else Z.shape[-1]
    if return_all:
        # One fused call per loop, so every returned state carries its gradient.
        states = []
        for loop in range(loops):
            p_l, q_l = (_weights_for_loop(w, loop)[None] for w in (P4, Q4))
            try:
                Z, _ = _looped_fwd(Z, p_l, q_l, 1, key_cols, 1, backend)
            except FloatingPointError:
                raise FloatingPointError(
                    f"looped_linear_attention diverged: Z left the range of {Z.dtype} at loop {loop + 1} of "
                    f"{_loops_text(loops)} (or the input was not finite); use fewer loops or smaller P, Q"
                ) from None
            states.append(Z)
        return torch.stack(states)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (Z, P, Q))
    # Without a backward to come, one checkpoint is all the op needs to keep.
    every = _checkpoint_every(loops, recompute) if needs_grad else loops
    out, _ = _looped_fwd(Z, P4, Q4, loops, key_cols, every, backend)
    return out


def icl_prompt(X, y, x_query):
    """Z = [[x_1 .. x_n, x_q], [y_1 .. y_n, 0]]: (batch, d+1, n+1) from
    X (batch, n, d), y (batch, n), x_query (batch, d)."""
    check_tensor("X", X, 3, "(batch, n, d)")
    check_tensor("y", y, 2, "(batch, n)")
    check_tensor("x_query", x_query, 2, "(batch, d)")
    check_same(("X", "y", "x_query"), (X, y, x_query))
    b, n, d = X.shape
    if y.shape != (b, n) or x_query.shape != (b, d):
        raise ValueError(
            f"y must have shape {(b, n)} and x_query {(b, d)} for X of shape {(b, n, d)}, "
            f"got {tuple(y.shape)} and {tuple(x_query.shape)}"
        )
    top = torch.cat([X.mT, x_query[:, :, None]], dim=2)
    bottom = torch.cat([y, torch.zeros_like(y[:, :1])], dim=1)[:, None, :]
    return torch.cat([top, bottom], dim=1)


def preconditioned_gd_predict(X, y, x_query, steps, preconditioner=None, lr=1.0):
    """Prediction x_q^T w after `steps` steps of preconditioned gradient
    descent on the in-context least squares loss (1/2n) |X w - y|^2 from
    w = 0: w <- w - lr * Gamma (1/n) X^T (X w - y). Batched; Gamma is (d, d)
    or one per prompt (batch, d, d), the identity when None."""
    n, d = X.shape[1], X.shape[2]
    gamma = torch.eye(d, dtype=X.dtype, device=X.device) if preconditioner is None else preconditioner
    w = torch.zeros(X.shape[0], d, 1, dtype=X.dtype, device=X.device)
    for _ in range(steps):
        grad = X.mT @ (X @ w - y[:, :, None]) / n
        w = w - lr * (gamma @ grad)
    return (x_query * w[:, :, 0]).sum(-1)


def least_squares_predict(X, y, x_query, ridge=0.0):
    """Prediction x_q^T w of (ridge) least squares on each prompt, batched."""
    d = X.shape[2]
    gram = X.mT @ X + ridge * torch.eye(d, dtype=X.dtype, device=X.device)
    w = torch.linalg.lstsq(gram, X.mT @ y[:, :, None]).solution[:, :, 0]
    return (x_query * w).sum(-1)
