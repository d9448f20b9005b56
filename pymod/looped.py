"""The looped linear transformer ("Can looped transformers learn to implement
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

The in-context regression prompts and baselines it is compared with live in
tessel.icl.
"""
from __future__ import annotations

import math

import torch

from . import _dispatch
from ._dispatch import check_same, check_tensor
from ._ops import acc_dtype, kernel_op, numpy_view

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
    work = acc_dtype(Z.dtype)
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


def _loops_text(loops: int) -> str:
    return f"{loops} loop" + ("s" if loops != 1 else "")


def _forward_outputs(result, Z, P, Q, loops, *_):
    out, saved, nonfinite = result
    if nonfinite:
        raise FloatingPointError(
            f"looped_linear_attention diverged: Z of {nonfinite} of {Z.shape[0]} prompts left the range of "
            f"{Z.dtype} within {_loops_text(loops)} (or the input was not finite); use fewer loops or smaller P, Q"
        )
    return out.to(Z.dtype), saved


@kernel_op("looped", "fwd", cpp=_forward_cpp, triton="looped_forward", finish=_forward_outputs)
def _looped_fwd(
    Z: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, loops: int, key_cols: int, every: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    saved = Z.new_empty(((loops + every - 1) // every, *Z.shape), dtype=acc_dtype(Z.dtype))
    return torch.empty_like(Z, memory_format=torch.contiguous_format), saved


def _backward_outputs(result, saved, P, Q, dout, *_):
    dz, dp, dq = result
    return dz.to(dout.dtype), dp.to(P.dtype), dq.to(Q.dtype)


@kernel_op("looped", "bwd", cpp=_backward_cpp, triton="looped_backward", finish=_backward_outputs)
def _looped_bwd(
    saved: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, dout: torch.Tensor,
    loops: int, key_cols: int, every: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(dout), torch.empty_like(P), torch.empty_like(Q)


def _setup_context(ctx, inputs, output):
    Z, P, Q, loops, key_cols, every, backend = inputs
    ctx.save_for_backward(output[1], P, Q)
    ctx.args = (loops, key_cols, every, backend)


def _backward(ctx, dout, _dsaved):
    saved, P, Q = ctx.saved_tensors
    dz, dp, dq = _looped_bwd(saved, P, Q, dout, *ctx.args)
    return dz, dp, dq, None, None, None, None


torch.library.register_autograd(_looped_fwd, _backward, setup_context=_setup_context)


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
