"""Softmax attention: `tessel.attention`, `tessel.attention_varlen` (packed
sequences), torch-compatible SDPA, `patch_sdpa`, and the plain PyTorch
references every kernel is checked against.

Layout (batch, heads, seq, head_dim) as torch SDPA. Masks are a band: query i
(bottom-right aligned, offset Nk - Nq, as FlashAttention-2) sees key j iff
i + off - left <= j <= i + off + right; `causal` sets right = min(right, 0).
Rows that see no key give zeros and lse = -inf.

Flow: attention() checks inputs -> resolve_backend -> op tessel::attention_fwd
(registered in C++ by tessel._C_ops, with its autograd through
tessel::attention_bwd) -> tessel._C_<level> on CPU, tessel.kernels.attention
on CUDA. The reference backend skips the op.
attention_varlen() takes the same road through tessel::attention_varlen_fwd /
_bwd: the kernels see packed sequences as a batch of one whose sequence axis
holds one segment per sequence (_segments), each with its own band.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from . import _C_ops, _dispatch
from ._dispatch import check_same, check_scale, check_tensor
from ._ops import acc_dtype
from .kernels._common import BAND_INF

_LAYOUT = "(batch, heads, seq, head_dim)"
_PACKED_LAYOUT = "(total, heads, head_dim)"
_torch_sdpa = F.scaled_dot_product_attention


def attention_reference(q, k, v, *, causal=False, scale=None, window=None, return_lse=False):
    """Plain PyTorch attention, accumulated in float32 (float64 for float64).

    Materialises the full (Nq, Nk) score matrix: the obviously correct version
    the kernels are tested and benchmarked against.
    """
    acc = acc_dtype(q.dtype)
    nq, nk, group = q.shape[-2], k.shape[-2], q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.to(acc).repeat_interleave(group, dim=1)
    v = v.to(acc).repeat_interleave(group, dim=1)
    scores = (q.to(acc) @ k.transpose(-1, -2)) * scale
    allowed = band_mask(nq, nk, causal, window, q.device)
    scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    seen = allowed.any(dim=-1)
    probs = torch.where(seen[:, None], torch.exp(scores - lse[..., None]), 0.0)
    out = (probs @ v).to(q.dtype)
    return (out, lse.to(acc)) if return_lse else out


def band_mask(nq: int, nk: int, causal: bool, window, device) -> torch.Tensor:
    """(Nq, Nk) bool: which keys each query sees (the band of the module docstring)."""
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        left, right = window
        if left is not None:
            allowed &= j >= i - min(int(left), nq + nk)
        if right is not None:
            allowed &= j <= i + min(int(right), nq + nk)
    return allowed


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None, window=None,
                               return_lse=False):
    """Packed sequences by a loop over them, each through attention_reference."""
    outs, lses = [], []
    for q0, q1, k0, k1 in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                              cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist()):
        # One dense (1, H, n, D) problem per sequence.
        dense = (x[a:e].transpose(0, 1)[None] for x, a, e in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        out, lse = attention_reference(*dense, causal=causal, scale=scale, window=window, return_lse=True)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def _band(nq: int, nk: int, causal: bool, window) -> tuple[int, int]:
    """(lo, hi): query i sees key j iff i + lo <= j <= i + hi."""
    off = nk - nq
    lo, hi = -BAND_INF, BAND_INF
    if window is not None:
        # A side past nq + nk reaches every key: unbounded.
        left, right = window
        if left is not None and left < nq + nk:
            lo = off - int(left)
        if right is not None and right < nq + nk:
            hi = off + int(right)
    if causal:
        hi = min(hi, off)
    return lo, hi


def _check_window(window) -> None:
    if window is None:
        return
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right) of non-negative ints, got {window!r}")
    for side, size in zip(("left", "right"), window):
        if size is None:
            continue
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral) or size < 0:
            raise ValueError(f"window {side} size must be a non-negative int or None, got {size!r}")


def check_attention_inputs(q, k, v, packed=False) -> None:
    """q, k, v of one attention problem: (batch, heads, seq, head_dim), or
    packed sequences (total, heads, head_dim)."""
    layout = _PACKED_LAYOUT if packed else _LAYOUT
    ndim = 3 if packed else 4
    check_tensor("q", q, ndim, layout)
    check_tensor("k", k, ndim, layout)
    check_tensor("v", v, ndim, layout)
    check_same(("q", "k", "v"), (q, k, v))
    qs, ks = q.shape, k.shape
    h, hk, d, dk = qs[1], ks[1], qs[-1], ks[-1]
    if not packed and ks[0] != qs[0]:
        raise ValueError(f"k has batch {ks[0]} but q has batch {qs[0]}: shapes {tuple(qs)} and {tuple(ks)}")
    if dk != d:
        raise ValueError(f"k has head_dim {dk} but q has head_dim {d}: shapes {tuple(qs)} and {tuple(ks)}")
    if v.shape != ks:
        raise ValueError(f"v must have k's shape {tuple(ks)} {layout}, got {tuple(v.shape)}")
    if h % hk != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({hk}) for grouped-query attention")


# ---------------------------------------------------------------- the ops

# Defined in C++ (csrc/ops.cpp, tessel._C_ops): schema, CPU kernels through tessel._C_<level>, autograd. Here:
# their fakes for torch.compile, and the Triton kernels their backend "triton" runs.
_attention_fwd = torch.ops.tessel.attention_fwd.default
_attention_bwd = torch.ops.tessel.attention_bwd.default
_attention_varlen_fwd = torch.ops.tessel.attention_varlen_fwd.default
_attention_varlen_bwd = torch.ops.tessel.attention_varlen_bwd.default


def _empty_like(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("tessel::attention_fwd")
def _attention_fwd_fake(q, k, v, scale, band_lo, band_hi, backend):
    return _empty_like(q), q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype))


@torch.library.register_fake("tessel::attention_bwd")
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, scale, band_lo, band_hi, backend):
    return _empty_like(q), _empty_like(k), _empty_like(v)


@torch.library.register_fake("tessel::attention_varlen_fwd")
def _attention_varlen_fwd_fake(q, k, v, segments, max_seqlen_q, max_seqlen_k, scale, backend):
    return _empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=acc_dtype(q.dtype))


@torch.library.register_fake("tessel::attention_varlen_bwd")
def _attention_varlen_bwd_fake(dout, q, k, v, out, lse, dlse, segments, max_seqlen_q, max_seqlen_k, scale, backend):
    return _empty_like(q), _empty_like(k), _empty_like(v)


def _triton(name):
    return getattr(_dispatch.triton_module("attention"), name)


def _triton_forward(q, k, v, scale, band_lo, band_hi):
    out, lse = _triton("attention_forward")(q, k, v, scale, band_lo, band_hi)
    return out.to(q.dtype), lse.to(acc_dtype(q.dtype))


def _triton_backward(dout, q, k, v, out, lse, dlse, scale, band_lo, band_hi):
    dq, dk, dv = _triton("attention_backward")(dout, q, k, v, out, lse, dlse, scale, band_lo, band_hi)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _triton_varlen_forward(q, k, v, segments, max_seqlen_q, max_seqlen_k, scale):
    out, lse = _triton("attention_varlen_forward")(q, k, v, segments, max_seqlen_q, max_seqlen_k, scale)
    return out.to(q.dtype).contiguous(), lse.to(acc_dtype(q.dtype)).contiguous()


def _triton_varlen_backward(dout, q, k, v, out, lse, dlse, segments, max_seqlen_q, max_seqlen_k, scale):
    grads = _triton("attention_varlen_backward")(dout, q, k, v, out, lse, dlse, segments, max_seqlen_q,
                                                  max_seqlen_k, scale)
    return tuple(g.to(x.dtype).contiguous() for g, x in zip(grads, (q, k, v)))


_C_ops.set_triton_kernel("attention_fwd", _triton_forward)
_C_ops.set_triton_kernel("attention_bwd", _triton_backward)
_C_ops.set_triton_kernel("attention_varlen_fwd", _triton_varlen_forward)
_C_ops.set_triton_kernel("attention_varlen_bwd", _triton_varlen_backward)


def _inputs_fit(q, k, v, packed, compiling) -> bool:
    """Eagerly, one C++ call accepts the common inputs (the Python checks took a quarter of a tiny call's time);
    False sends them to check_attention_inputs, as does tracing (dynamo does not trace into the C++ call)."""
    return not compiling and _C_ops.attention_inputs_fit(q, k, v, packed)


def _forward(q, k, v, scale, band_lo, band_hi, backend, compiling):
    """tessel::attention_fwd: eagerly called from C++ (_C_ops.attention_fwd, through the same dispatcher, a few
    microseconds less than torch.ops' argument parsing); torch.compile traces torch.ops."""
    forward = _attention_fwd if compiling else _C_ops.attention_fwd
    return forward(q, k, v, scale, band_lo, band_hi, backend)


# ---------------------------------------------------------------- public API


def attention(q, k, v, *, causal=False, scale=None, window=None, return_lse=False):
    """Fused softmax attention, softmax(q k^T * scale) v, with O(N) memory.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with H a multiple of Hkv (GQA/MQA).
    causal: bottom-right aligned when Nq != Nk (query i sees keys up to
    i + Nk - Nq). window=(left, right): sliding window, each side a
    non-negative int or None (unbounded). scale defaults to 1/sqrt(D).
    Returns out (B, H, Nq, D), and with return_lse the log-sum-exp of each
    row's scaled scores, (B, H, Nq) in float32 (float64 for float64 input;
    -inf for rows that see no key, whose output is zero). Differentiable in
    q, k, v (and through lse). A row is empty by the band alone (a window side
    past Nq + Nk is unbounded); NaN propagates along what is attended: a row
    is NaN when its query, or a key or value it sees, is NaN (lse is +inf,
    as torch's logsumexp, where a score is +inf and none is NaN), and masked
    keys never reach a row or its gradient.
    """
    compiling = torch.compiler.is_compiling()
    if not _inputs_fit(q, k, v, False, compiling):
        check_attention_inputs(q, k, v)
    check_scale(scale)
    _check_window(window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _dispatch.resolve_backend("attention", q.device)
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, scale=scale, window=window, return_lse=return_lse)
    lo, hi = _band(q.shape[-2], k.shape[-2], causal, window)
    out, lse = _forward(q, k, v, scale, lo, hi, backend, compiling)
    return (out, lse) if return_lse else out


def _check_cu_seqlens(name, cu, total, device, max_seqlen, max_name, like=None):
    """cu_seqlens and its max_seqlen; `like`: the checked cu_seqlens_q, whose length cu must share."""
    if not _dispatch.is_number(max_seqlen) or int(max_seqlen) != max_seqlen or max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    lengths = _dispatch.check_cu_seqlens(name, cu, total, device)
    if like is not None and cu.shape[0] != like.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {like.shape[0]} and "
                         f"{cu.shape[0]}")
    if lengths is None:
        return
    longest = max(lengths)
    if longest > max_seqlen:
        raise ValueError(f"{max_name} is {max_seqlen} but sequence {lengths.index(longest)} has length {longest}")


def _segments(cu_seqlens_q, cu_seqlens_k, causal, window):
    """int64 (batch, 6): per sequence (q_start, len_q, k_start, len_k,
    band_lo, band_hi), the band of _band with each side clamped to
    [-len_q - 1, len_k + 1] (past that it reaches every key or none)."""
    q_start, k_start = cu_seqlens_q[:-1].long(), cu_seqlens_k[:-1].long()
    len_q, len_k = cu_seqlens_q[1:].long() - q_start, cu_seqlens_k[1:].long() - k_start
    offset = len_k - len_q
    lo, hi = -len_q - 1, len_k + 1
    if window is not None:
        left, right = window
        if left is not None:
            lo = torch.maximum(offset - min(int(left), BAND_INF), lo)
        if right is not None:
            hi = torch.minimum(offset + min(int(right), BAND_INF), hi)
    if causal:
        hi = torch.minimum(offset, hi)
    return torch.stack((q_start, len_q, k_start, len_k, lo, hi), dim=1)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     scale=None, window=None, return_lse=False):
    """Attention over packed variable-length sequences (FlashAttention-2's varlen API).

    q: (total_q, H, D); k, v: (total_k, Hkv, D), H a multiple of Hkv.
    Sequence i holds q rows cu_seqlens_q[i]:cu_seqlens_q[i+1] and k/v rows
    cu_seqlens_k[i]:cu_seqlens_k[i+1] and attends only within itself;
    cu_seqlens_* are int32 (batch + 1,) from 0 to total, on q's device.
    max_seqlen_* bound the sequence lengths (an error if one is longer).
    causal is bottom-right aligned per sequence; window, scale and the rules
    for empty rows and NaN are attention()'s. Returns out (total_q, H, D) and,
    with return_lse, lse (H, total_q) in float32 (float64 for float64).
    No work is spent on padding: blocks never cross a sequence boundary.
    """
    if not _inputs_fit(q, k, v, True, torch.compiler.is_compiling()):
        check_attention_inputs(q, k, v, packed=True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, max_seqlen_q, "max_seqlen_q")
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, max_seqlen_k, "max_seqlen_k",
                      like=cu_seqlens_q)
    check_scale(scale)
    _check_window(window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = _dispatch.resolve_backend("attention_varlen", q.device)
    if backend == "reference":
        return attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                          window=window, return_lse=return_lse)
    segments = _segments(cu_seqlens_q, cu_seqlens_k, causal, window)
    out, lse = _attention_varlen_fwd(q, k, v, segments, int(max_seqlen_q), int(max_seqlen_k), scale, backend)
    return (out, lse) if return_lse else out


def _kernel_for_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, compiling):
    """(backend, lo, hi) when tessel's kernel covers this SDPA call exactly, else None."""
    if attn_mask is not None or dropout_p != 0.0:
        return None
    if not (_inputs_fit(query, key, value, False, compiling) or _sdpa_inputs_fit(query, key, value)):
        return None
    h, hk, d = query.shape[1], key.shape[1], query.shape[3]
    if hk != h and not (enable_gqa and h % hk == 0):
        return None
    try:
        backend = _dispatch.resolve_backend("scaled_dot_product_attention", query.device)
    except RuntimeError:
        return None
    if backend == "reference":
        return None
    if backend == "cpp" and query.dtype not in (torch.float32, torch.float64):
        return None  # torch has native half-precision CPU kernels; ours would upcast
    if backend == "triton" and not _triton_supports(query.dtype, d):
        return None
    # torch's is_causal is top-left aligned: query i sees keys j <= i.
    return (backend, -BAND_INF, 0) if is_causal else (backend, -BAND_INF, BAND_INF)


def _sdpa_inputs_fit(query, key, value) -> bool:
    """Non-empty 4-D floating tensors of one device and dtype, with one batch and head dim, v of k's shape."""
    tensors = (query, key, value)
    if any(not isinstance(x, torch.Tensor) or x.dim() != 4 or x.numel() == 0 or x.is_nested for x in tensors):
        return False
    if len({(x.device, x.dtype) for x in tensors}) != 1 or query.dtype not in _dispatch.FLOAT_DTYPES:
        return False
    (b, _, _, d), (bk, _, _, dk) = query.shape, key.shape
    return bk == b and dk == d and value.shape == key.shape


def _triton_supports(dtype: torch.dtype, head_dim: int) -> bool:
    try:
        kernels = _dispatch.triton_module("attention")
    except NotImplementedError:
        return False
    return kernels.supports(dtype, head_dim)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    Same signature and semantics. Calls tessel's kernel when it covers the call
    exactly (4-D inputs, no attn_mask, no dropout, matching head dims, GQA only
    with enable_gqa); everything else goes to torch's own implementation.
    """
    compiling = torch.compiler.is_compiling()
    kernel = _kernel_for_sdpa(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, compiling)
    if kernel is None:
        kwargs = {"scale": scale}
        if enable_gqa:
            kwargs["enable_gqa"] = True
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)
    check_scale(scale)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    backend, lo, hi = kernel
    out, _ = _forward(query, key, value, scale, lo, hi, backend, compiling)
    return out


class patch_sdpa:
    """Route torch.nn.functional.scaled_dot_product_attention to tessel.

    A plain call patches until `.restore()`; as a context manager it restores
    torch's function on exit. Unmodified models (nn.TransformerEncoderLayer,
    nn.MultiheadAttention, Hugging Face models) then run tessel's kernels.
    """

    def __init__(self):
        self._previous = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = scaled_dot_product_attention

    def restore(self) -> None:
        F.scaled_dot_product_attention = self._previous

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
