"""tessel as a provider of torch's flash-attention path (torch >= 2.13).

`register_sdpa_provider()` registers "tessel" with
torch.nn.attention.register_flash_attention_impl; nothing is activated. After
`torch.nn.attention.activate_flash_attention_impl("tessel")`, the aten kernels
that F.scaled_dot_product_attention routes to its flash path run tessel's
custom ops (tessel::attention_fwd / _bwd): on CPU
aten::_scaled_dot_product_flash_attention_for_cpu and its backward, on CUDA
aten::_scaled_dot_product_flash_attention and its backward. The autograd
formulas, the fake kernels torch.compile traces with and the choice of path
stay torch's, so outputs are returned in the layouts torch's own kernels
use. `torch.nn.attention.restore_flash_attention_impl()` brings torch's
kernels back.

What the band kernels do not cover, an additive or boolean attn_mask on
CPU, runs the masked softmax in plain PyTorch inside the same kernels
(forward and backward), so a masked call is still correct; dropout never
reaches the flash path on CPU and is refused on CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.attention

from ..attention import _attention_bwd, _attention_fwd
from .._ops import acc_dtype
from ..kernels._common import BAND_INF

NAME = "tessel"
MIN_TORCH = (2, 13)
# torch's is_causal on the flash path is top-left aligned: query i sees keys j <= i.
_CAUSAL_BAND, _FULL_BAND = (-BAND_INF, 0), (-BAND_INF, BAND_INF)


def register_sdpa_provider() -> None:
    """Register "tessel" with torch's flash-attention provider registry
    (never activated here: users opt in with
    torch.nn.attention.activate_flash_attention_impl("tessel")). Needs torch
    >= 2.13; elsewhere tessel.patch_sdpa() is the portable route."""
    registry = getattr(torch.nn.attention, "register_flash_attention_impl", None)
    if registry is None:
        raise RuntimeError(
            f"tessel.register_sdpa_provider needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
            f"(torch.nn.attention.register_flash_attention_impl); this is torch {torch.__version__}. "
            "Use tessel.patch_sdpa() instead."
        )
    registry(NAME, register_fn=_activate)


@dataclass
class _Handle:
    """What torch's registry keeps while tessel is active; remove() unregisters the kernels."""

    library: torch.library.Library | None

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _activate() -> _Handle:
    library = torch.library.Library("aten", "IMPL")
    library.impl("_scaled_dot_product_flash_attention_for_cpu", _cpu_forward, "CPU")
    library.impl("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_backward, "CPU")
    library.impl("_scaled_dot_product_flash_attention", _cuda_forward, "CUDA")
    library.impl("_scaled_dot_product_flash_attention_backward", _cuda_backward, "CUDA")
    return _Handle(library)


def _scale(query, scale) -> float:
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def _band(is_causal: bool) -> tuple[int, int]:
    return _CAUSAL_BAND if is_causal else _FULL_BAND


def _masked_probs(query, key, attn_mask, is_causal, scale):
    """(probs, lse) of softmax(q k^T scale + mask) in plain PyTorch, in the
    accumulation dtype, k repeated to q's heads: the path for attn_mask, which
    the band kernels do not take. Rows that see no key get zero probabilities."""
    acc = acc_dtype(query.dtype)
    k = key.to(acc).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    scores = (query.to(acc) @ k.transpose(-1, -2)) * scale
    if is_causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    else:
        scores = scores + attn_mask.to(acc)
    lse = torch.logsumexp(scores, dim=-1)
    seen = torch.isfinite(lse)[..., None]
    return torch.where(seen, torch.exp(scores - torch.where(seen, lse[..., None], 0.0)), 0.0), lse


def _grouped(x, group):
    """(B, H, ...) summed over each group of `group` consecutive heads: (B, H / group, ...)."""
    return x.unflatten(1, (-1, group)).sum(2)


def _masked_backward(grad_out, query, key, value, attn_mask, is_causal, scale):
    """dq, dk, dv of _masked_probs' attention: dS = P (dP - rowsum(dO O))."""
    acc, group = acc_dtype(query.dtype), query.shape[1] // key.shape[1]
    probs, _ = _masked_probs(query, key, attn_mask, is_causal, scale)
    q, k, v, do = (x.to(acc) for x in (query, key, value, grad_out))
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    out = probs @ v
    ds = probs * (do @ v.transpose(-1, -2) - (do * out).sum(-1, keepdim=True))
    return (ds @ k) * scale, _grouped(ds.transpose(-1, -2) @ q, group) * scale, \
        _grouped(probs.transpose(-1, -2) @ do, group)


def _cpu_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    if dropout_p != 0.0:
        raise RuntimeError("tessel's SDPA provider: dropout_p > 0 does not take the flash path (torch routes "
                           "it to its math kernel)")
    scale = _scale(query, scale)
    if attn_mask is not None:
        probs, lse = _masked_probs(query, key, attn_mask, is_causal, scale)
        out = probs @ value.to(probs.dtype).repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    else:
        out, lse = _attention_fwd(query, key, value, scale, *_band(is_causal), "cpp")
    # torch's layouts for this kernel: out like query, lse (B, H, Nq) over a (B, Nq, H) buffer.
    b, h, nq, _ = query.shape
    lse_out = torch.empty(b, nq, h, dtype=acc_dtype(query.dtype)).transpose(1, 2)
    return torch.empty_like(query).copy_(out), lse_out.copy_(lse)


def _cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                  scale=None):
    scale = _scale(query, scale)
    if attn_mask is not None:
        grads = _masked_backward(grad_out, query, key, value, attn_mask, is_causal, scale)
    else:
        grads = _attention_bwd(grad_out, query, key, value, out, logsumexp, None, scale,
                                          *_band(is_causal), "cpp")
    # torch's layout for these gradients: (B, N, H, D) buffers seen as (B, H, N, D).
    return tuple(torch.empty_permuted(x.shape, (0, 2, 1, 3), dtype=x.dtype).copy_(g)
                 for x, g in zip((query, key, value), grads))


def _cuda_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    if dropout_p != 0.0 or return_debug_mask:
        raise RuntimeError("tessel's SDPA provider: the flash path with dropout or a debug mask is not supported")
    out, lse = _attention_fwd(query, key, value, _scale(query, scale), *_band(is_causal), "triton")
    seed = torch.empty(2, dtype=torch.uint64, device=query.device)
    offset = torch.empty((), dtype=torch.uint64, device=query.device)
    debug = torch.empty(0, dtype=query.dtype, device=query.device)
    return (torch.empty_like(query).copy_(out), lse, None, None, query.shape[2], key.shape[2], seed, offset,
            debug)


def _cuda_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, philox_seed, philox_offset, *, scale=None):
    grads = _attention_bwd(grad_out, query, key, value, out, logsumexp, None, _scale(query, scale),
                                      *_band(is_causal), "triton")
    return tuple(torch.empty_like(x).copy_(g) for x, g in zip((query, key, value), grads))
