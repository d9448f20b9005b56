"""tessel as a Hugging Face transformers attention implementation:
`register()`, then `from_pretrained(..., attn_implementation="tessel")` (or
`model.set_attn_implementation("tessel")`).

The mask function hands the attention function what FlashAttention-2's
integration gets: None when nothing is padded, else the (batch, kv_length)
boolean padding mask; the attention pattern itself comes from the module's
is_causal and the layer's sliding_window, as for FlashAttention-2. The
attention function then runs
- no padding: tessel.attention (GQA without repeat_kv, causal bottom-right
  as a KV cache needs, sliding_window W as window (W - 1, None));
- a padding mask: tessel.attention_varlen on the real tokens only (packed,
  computed, scattered back; padded query rows are zero);
- packed sequences (batch 1 with cu_seq_lens_q / cu_seq_lens_k kwargs, or
  position_ids that restart, as DataCollatorWithFlattening makes them):
  tessel.attention_varlen;
- dropout, or a 4-D mask a caller prepared: torch's SDPA for that call.
transformers stays optional: tessel imports without it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import attention, attention_varlen, band_mask

NAME = "tessel"


def register() -> None:
    """Register "tessel" with transformers' AttentionInterface and AttentionMaskInterface."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise ImportError(f"tessel.integrations.huggingface.register needs transformers >= 5 ({err})") from None
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                   attention_mask=None, **kwargs):
    """The (batch, kv_length) boolean padding mask, or None when no token is padded."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers' attention-function contract: q (B, H, Sq, D), k and v
    (B, Hkv, Sk, D) -> (out (B, Sq, H, D), None)."""
    if softcap is not None or s_aux is not None:
        raise NotImplementedError("attn_implementation='tessel' has no logit soft-capping or attention sinks; "
                                  "use 'sdpa' or 'eager' for this model")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = None
    if sliding_window:  # W keys up to the query itself, as transformers' sliding masks
        window = (sliding_window - 1, None if is_causal else sliding_window - 1)
    args = dict(causal=is_causal, scale=scaling, window=window)
    if dropout or (attention_mask is not None and attention_mask.dim() != 2):
        return _sdpa(query, key, value, attention_mask, dropout, args), None
    if attention_mask is not None:
        return _padded(query, key, value, attention_mask, args), None
    packed = _packed_bounds(query, kwargs)
    if packed is not None:
        (cu_q, cu_k), (max_q, max_k) = packed
        out = attention_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q,
                               cu_k, int(max_q), int(max_k), **args)
        return out[None], None
    return attention(query, key, value, **args).transpose(1, 2), None


def _packed_bounds(query, kwargs):
    """((cu_q, cu_k), (max_q, max_k)) of packed sequences in a batch of one, or None."""
    if query.shape[0] != 1:
        return None
    if kwargs.get("cu_seq_lens_q") is not None:
        return ((kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]),
                (kwargs["max_length_q"], kwargs["max_length_k"]))
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] != query.shape[2]:
        return None
    position_ids = position_ids.reshape(-1)
    starts = (position_ids == position_ids.min()).nonzero().view(-1)
    if starts.numel() <= 1:  # one sequence: the dense path
        return None
    cu = torch.cat([starts, starts.new_tensor([position_ids.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    return (cu, cu), (longest, longest)


def _padded(query, key, value, padding, args):
    """Attention over the real tokens of a padded batch: gathered into packed
    sequences, run, scattered back (padded query rows are zero)."""
    b, h, sq, d = query.shape
    valid_k = padding.to(torch.bool)
    valid_q = valid_k[:, -sq:]
    rows_q, rows_k = valid_q.reshape(-1).nonzero().view(-1), valid_k.reshape(-1).nonzero().view(-1)
    lengths_q, lengths_k = valid_q.sum(1), valid_k.sum(1)
    cu_q, cu_k = (F.pad(n.cumsum(0), (1, 0)).to(torch.int32) for n in (lengths_q, lengths_k))
    packed = [x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])[rows]
              for x, rows in ((query, rows_q), (key, rows_k), (value, rows_k))]
    out = attention_varlen(*packed, cu_q, cu_k, int(lengths_q.max()), int(lengths_k.max()), **args)
    full = out.new_zeros(b * sq, h, d).index_copy(0, rows_q, out)
    return full.view(b, sq, h, d)


def _sdpa(query, key, value, mask, dropout, args):
    """torch's SDPA with the same pattern as a boolean mask: for dropout, or a prepared 4-D mask."""
    sk = key.shape[2]
    if mask is None or mask.dim() == 2:
        pattern = band_mask(query.shape[2], sk, args["causal"], args["window"], query.device)
        mask = pattern if mask is None else pattern & mask[:, None, None, -sk:].to(torch.bool)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=args["scale"],
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)
