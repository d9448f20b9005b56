"""Linear suite: chunked linear attention, causal and not, forward and
forward+backward, vs the chunked PyTorch reference (batched matmuls over
chunks), the token-by-token recurrence, and flash-linear-attention's chunk
kernel on CUDA when installed."""
from __future__ import annotations

import torch

import tessel
from tessel._ops import acc_dtype
from tessel.linear_attention import CHUNK, linear_attention_reference

from ._harness import Case, forward_backward_call, forward_call

# (batch, heads, seq, dim): the workload.
FULL = [(4, 8, n, 64) for n in (1024, 2048, 4096, 8192)]
QUICK = [(4, 8, 1024, 64), (4, 8, 4096, 64)]
CUDA_FULL = [(4, 16, n, d) for d in (64, 128) for n in (4096, 8192, 16384)]
# A decoder's step: one token against the state of those before it (the state in and out), where what a call
# costs beyond its arithmetic decides; (batch, heads, dim).
STEPS = [(1, 1, 8), (1, 16, 64), (8, 16, 128)]
STEPS_QUICK = [(1, 16, 64)]
# The recurrence runs one Python step per token: timed where it fits.
RECURRENT_MAX_LEN = {"fwd": 4096, "fwd+bwd": 1024}


def _fla_peer():
    """flash-linear-attention's chunk kernel, (B, H, N, D) in and out, or None."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None

    def run(q, k, v, causal):
        o, _ = chunk_linear_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), normalize=False)
        return o.transpose(1, 2)

    return run


def _flops(b, h, n, d, causal):
    """q S and k^T v (4 n d^2 per head), plus the masked half of the
    intra-chunk products (2 n C d) when causal."""
    return b * h * (4 * n * d * d + (2 * n * CHUNK * d if causal else 0))


def _step_cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Decoding steps: q, k, v of one token and the state (B, H, D, D), the new state returned; the peer is
    the recurrence's step in PyTorch."""
    out = []
    gen = torch.Generator(device=device).manual_seed(1)
    for b, h, d in STEPS_QUICK if quick else STEPS:
        q, k, v = (torch.randn(b, h, 1, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
        state = torch.randn(b, h, d, d, device=device, generator=gen).to(acc_dtype(dtype))
        kw = dict(initial_state=state, return_state=True)
        ours = lambda q, k, v, kw=kw: tessel.linear_attention(q, k, v, **kw)
        ref = lambda q, k, v, kw=kw: linear_attention_reference(q, k, v, **kw)
        rec = lambda q, k, v, kw=kw: linear_attention_reference(q, k, v, method="recurrent", **kw)

        def err(o=ours, r=ref, x=(q, k, v)):
            with torch.no_grad():
                return max((a.float() - e.float()).abs().max().item() for a, e in zip(o(*x), r(*x)))

        x = (q, k, v)
        out.append(Case("linear_attention", f"B{b}-H{h}-N1-D{d}-step", "fwd", dtype, device,
                        _flops(b, h, 1, d, False), forward_call(ours, x), forward_call(ref, x),
                        {"recurrent": forward_call(rec, x)}, err))
    return out


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    out = _step_cases(device, dtype, quick)
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = QUICK if quick else (CUDA_FULL if device == "cuda" else FULL)
    fla = _fla_peer() if device == "cuda" else None
    for b, h, n, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        grad = torch.randn(q.shape, device=device, dtype=dtype, generator=gen)
        for causal in (True, False):
            name = f"B{b}-H{h}-N{n}-D{d}" + ("-causal" if causal else "")
            ours = lambda q, k, v, c=causal: tessel.linear_attention(q, k, v, causal=c)
            ref = lambda q, k, v, c=causal: linear_attention_reference(q, k, v, causal=c)
            rec = lambda q, k, v, c=causal: linear_attention_reference(q, k, v, causal=c, method="recurrent")
            peers = {"fla": lambda q, k, v, c=causal, f=fla: f(q, k, v, c)} if fla and causal else {}

            def err(o=ours, r=ref, x=(q, k, v)):
                with torch.no_grad():
                    return (o(*x).float() - r(*x).float()).abs().max().item()

            flops = _flops(b, h, n, d, causal)
            x = (q, k, v)
            fwd_peers = {name_: forward_call(f, x) for name_, f in peers.items()}
            if device == "cpu" and n <= RECURRENT_MAX_LEN["fwd"]:
                fwd_peers["recurrent"] = forward_call(rec, x)
            out.append(Case("linear_attention", name, "fwd", dtype, device, flops, forward_call(ours, x),
                            forward_call(ref, x), fwd_peers, err))
            bwd_peers = {name_: forward_backward_call(f, leaves, grad) for name_, f in peers.items()}
            if device == "cpu" and n <= RECURRENT_MAX_LEN["fwd+bwd"]:
                bwd_peers["recurrent"] = forward_backward_call(rec, leaves, grad)
            out.append(Case("linear_attention", name, "fwd+bwd", dtype, device, 3 * flops,
                            forward_backward_call(ours, leaves, grad), forward_backward_call(ref, leaves, grad),
                            bwd_peers))
    return out
