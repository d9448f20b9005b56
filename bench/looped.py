"""Looped suite: the looped linear transformer's training step (forward, and
forward+backward in both backward modes) vs the literal reference, the same
model in eager PyTorch (batched matmuls, autograd) and that under
torch.compile."""
from __future__ import annotations

import torch

import tessel
from tessel.looped import looped_linear_attention_reference

from ._harness import Case, forward_backward_call, forward_call

# (batch, d, n, loops): the papers' training-step workloads.
FULL = [(1024, 5, 20, 10), (4096, 10, 20, 10), (4096, 10, 20, 1), (4096, 10, 40, 20), (8192, 20, 40, 10)]
QUICK = [(1024, 5, 20, 10), (4096, 10, 20, 10)]


def eager(Z, P, Q, loops):
    """The model as a PyTorch user writes it: associativity, batched matmuls."""
    n = Z.shape[-1] - 1
    for _ in range(loops):
        keys = Z[:, :, :n]
        A = keys @ keys.mT
        Z = Z + (P @ A @ Q) @ Z / n
    return Z


_compiled = torch.compile(eager)


def cases(device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for b, d, n, loops in QUICK if quick else FULL:
        Z = torch.randn(b, d + 1, n + 1, device=device, dtype=dtype, generator=gen)
        # Small enough that the cubic update stays bounded over the loops.
        P, Q = (torch.randn(d + 1, d + 1, device=device, dtype=dtype, generator=gen) * 0.2 / (d + 1) for _ in range(2))
        leaves = [x.clone().requires_grad_() for x in (Z, P, Q)]
        grad = torch.randn(Z.shape, device=device, dtype=dtype, generator=gen)
        name = f"B{b}-d{d}-n{n}-L{loops}"
        # A loop: A = Z M Z^T (2 d1^2 n), P A Q (4 d1^3), (PAQ) Z (2 d1^2 (n+1)).
        d1 = d + 1
        flops = loops * b * (2 * d1 * d1 * n + 4 * d1**3 + 2 * d1 * d1 * (n + 1))
        ours = lambda z, p, q, L=loops: tessel.looped_linear_attention(z, p, q, L)
        ours_rc = lambda z, p, q, L=loops: tessel.looped_linear_attention(z, p, q, L, recompute=True)
        ref = lambda z, p, q, L=loops: looped_linear_attention_reference(z, p, q, L)
        peers = {"eager": lambda z, p, q, L=loops: eager(z, p, q, L),
                 "compiled": lambda z, p, q, L=loops: _compiled(z, p, q, L)}

        def err(o=ours, r=ref, x=(Z, P, Q)):
            with torch.no_grad():
                return (o(*x) - r(*x)).abs().max().item()

        x = (Z, P, Q)
        out.append(Case("looped", name, "fwd", dtype, device, flops, forward_call(ours, x), forward_call(ref, x),
                        {k: forward_call(f, x) for k, f in peers.items()}, err))
        for label, fn in (("fwd+bwd", ours), ("fwd+bwd recompute", ours_rc)):
            out.append(Case("looped", name, label, dtype, device, 3 * flops,
                            forward_backward_call(fn, leaves, grad), forward_backward_call(ref, leaves, grad),
                            {k: forward_backward_call(f, leaves, grad) for k, f in peers.items()}))
    return out
