"""Drop-in modules backed by tessel's kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import scaled_dot_product_attention
from .icl import icl_prompt
from .linear_attention import feature_map_fn, linear_attention
from .looped import looped_linear_attention


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs on tessel's kernel.

    Same constructor, parameters and state_dict keys as torch's module, so a
    torch checkpoint loads unchanged. forward(query, key, value, ...) keeps
    torch's signature and returns (output, weights). The fused kernel serves
    calls that need no attention weights (need_weights=False), with no
    key_padding_mask, no attn_mask other than the causal hint
    (is_causal=True), no bias_k/zero_attn and no active dropout; weights are
    then None, and is_causal means torch's top-left causal mask. Every other
    call runs torch's implementation unchanged.
    """

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        fused = (
            not need_weights
            and key_padding_mask is None
            and (attn_mask is None or is_causal)
            and self.bias_k is None
            and not self.add_zero_attn
            and (self.dropout == 0.0 or not self.training)
            and query.dim() == 3
        )
        if not fused:
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        q, k, v = self._project(query, key, value)
        # (B, N, H, D) views transposed to (B, H, N, D): the kernel reads strides.
        out = scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _project(self, query, key, value):
        e, h = self.embed_dim, self.num_heads

        def heads(y):
            return y.view(y.shape[0], y.shape[1], h, e // h).transpose(1, 2)

        if self._qkv_same_embed_dim and query is key and key is value:
            # Self-attention: one matmul against the packed weight, as torch's module does.
            return [heads(y) for y in F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)]
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return [heads(F.linear(x, w, bias)) for x, w, bias in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v))]


class LinearAttention(torch.nn.Module):
    """Multi-head linear attention layer (q/k/v/out projections around
    tessel.linear_attention), a drop-in for MultiheadAttention in models that
    want O(N) attention.

    feature_map: "elu1" (default, Katharopoulos et al.), "relu" or "identity".
    causal: each position attends to itself and earlier ones (forward's
    is_causal=True asks for it too). normalize: divide by the feature-mapped
    key sum (softmax-like rows; default True). forward(query, key, value,
    key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, None): the
    signature of MultiheadAttention; linear attention forms no weight matrix,
    so weights are always None. key_padding_mask (batch, Nk), True = ignore,
    drops those keys; attn_mask other than None is refused (no N x N matrix).
    """

    def __init__(self, embed_dim, num_heads, feature_map="elu1", causal=False, normalize=True, bias=True,
                 batch_first=False, kdim=None, vdim=None, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.phi = feature_map_fn(feature_map)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.feature_map, self.causal, self.normalize, self.batch_first = feature_map, causal, normalize, batch_first
        factory = {"device": device, "dtype": dtype}
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = torch.nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = torch.nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if attn_mask is not None:
            raise ValueError("LinearAttention takes no attn_mask (it forms no N x N matrix); use causal=True "
                             "or is_causal=True for a causal mask")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        b, nq, nk = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.phi(self.q_proj(query)).view(b, nq, h, d).transpose(1, 2)
        k = self.phi(self.k_proj(key)).view(b, nk, h, d)
        v = self.v_proj(value).view(b, nk, h, d)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, nk):
                raise ValueError(f"key_padding_mask must have shape {(b, nk)} (batch, key length), "
                                 f"got {tuple(key_padding_mask.shape)}")
            # A dropped key adds nothing to the state or the normaliser.
            keep = ~key_padding_mask.bool() if key_padding_mask.dtype == torch.bool else key_padding_mask == 0
            k = k * keep[:, :, None, None].to(k.dtype)
        out = linear_attention(q, k.transpose(1, 2), v.transpose(1, 2), causal=self.causal or is_causal,
                               normalize=self.normalize)
        out = self.out_proj(out.transpose(1, 2).reshape(b, nq, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, feature_map={self.feature_map!r}, "
                f"causal={self.causal}, normalize={self.normalize}, batch_first={self.batch_first}")


class LoopedLinearTransformer(torch.nn.Module):
    """One linear self-attention layer applied `loops` times to an in-context
    regression prompt (see tessel.looped_linear_attention).

    d: feature dimension (Z has d + 1 rows). heads: attention heads, summed.
    shared: one (P, Q) for every loop (the looped model) or one per loop.
    init: "random" (entries N(0, init_scale^2), default init_scale 0.02:
    the update is cubic in Z, so larger weights diverge within a few loops) or
    "gd" (the construction under which each loop is one gradient descent step
    of size init_scale, default 1.0, on the in-context least squares loss:
    P = e_d e_d^T, Q = -init_scale [[I_d, 0], [0, 0]], divided over heads).
    recompute: keep only O(sqrt(loops)) copies of Z for the backward.
    forward(X, y, x_query) -> y_hat, with X (batch, n, d), y (batch, n),
    x_query (batch, d); icl_prompt(X, y, x_query) builds the Z it loops on.
    """

    def __init__(self, d, loops, heads=1, shared=True, init="random", init_scale=None, recompute=False,
                 device=None, dtype=None):
        super().__init__()
        if init not in ("random", "gd"):
            raise ValueError(f"init must be 'random' or 'gd', got {init!r}")
        for name, value in (("d", d), ("loops", loops), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.d, self.loops, self.heads, self.shared = d, loops, heads, shared
        self.init, self.init_scale, self.recompute = init, init_scale, recompute
        shape = (1 if shared else loops, heads, d + 1, d + 1)
        self.P = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.Q = torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.init == "random":
            scale = 0.02 if self.init_scale is None else self.init_scale
            self.P.normal_(0.0, scale)
            self.Q.normal_(0.0, scale)
            return
        step = 1.0 if self.init_scale is None else self.init_scale
        self.P.zero_()
        self.Q.zero_()
        self.P[..., self.d, self.d] = 1.0
        self.Q[..., range(self.d), range(self.d)] = -step / self.heads

    icl_prompt = staticmethod(icl_prompt)

    def forward(self, X, y, x_query):
        Z = looped_linear_attention(icl_prompt(X, y, x_query), self.P, self.Q, self.loops, recompute=self.recompute)
        return -Z[:, self.d, -1]

    def extra_repr(self):
        return (f"d={self.d}, loops={self.loops}, heads={self.heads}, shared={self.shared}, init={self.init!r}, "
                f"recompute={self.recompute}")
