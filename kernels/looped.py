"""Triton looped linear transformer, forward and backward, fused over the loops.

One program per prompt, in fp32 with IEEE dots: A = (Z M)(Z M)^T, U = sum_h
P_h A Q_h, Z += U Z / n. The forward keeps Z (padded to powers of two) in
registers through all loops. The backward walks the loops in reverse from
the saved checkpoints (recomputing the states of a segment into scratch
memory first), its states and gradient in memory, read in chunks of columns,
and writes per-prompt dP, dQ partials that are summed after (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pow2_block
from ._tiles import load_tile as _load_tile


@triton.jit
def _mix(P, Q, A, wl_base, HEADS, D1, offs_r):
    """U = sum_h P_h A Q_h."""
    U = tl.zeros_like(A)
    for hh in range(HEADS):
        base = wl_base + hh * D1 * D1
        p = _load_tile(P + base, offs_r, offs_r, D1, D1, D1)
        q = _load_tile(Q + base, offs_r, offs_r, D1, D1, D1)
        U += tl.dot(tl.dot(p, A, input_precision="ieee"), q, input_precision="ieee")
    return U


@triton.jit
def _looped_step(Z, P, Q, wl_base, HEADS, D1, inv_n, key_cols, offs_r, offs_c):
    """Z + inv_n (sum_h P_h A Q_h) Z with A = (Z M)(Z M)^T, Z whole in registers."""
    keys = tl.where(offs_c[None, :] < key_cols, Z, 0.0)
    A = tl.dot(keys, tl.trans(keys), input_precision="ieee")
    U = _mix(P, Q, A, wl_base, HEADS, D1, offs_r)
    return Z + inv_n * tl.dot(U, Z, input_precision="ieee")


@triton.jit
def _looped_fwd_kernel(ZIN, P, Q, ZOUT, SAVED, NONFINITE, B, D1, N1, key_cols, inv_n, LOOPS, EVERY, HEADS,
                       WEIGHT_LOOPS, BD: tl.constexpr, BN: tl.constexpr):
    b = tl.program_id(0)
    offs_r = tl.arange(0, BD)
    offs_c = tl.arange(0, BN)
    tile = offs_r[:, None] * N1 + offs_c[None, :]
    inside = (offs_r[:, None] < D1) & (offs_c[None, :] < N1)
    Z = tl.load(ZIN + b * D1 * N1 + tile, mask=inside, other=0.0).to(tl.float32)
    for loop in range(LOOPS):
        if loop % EVERY == 0:
            tl.store(SAVED + ((loop // EVERY) * B + b) * D1 * N1 + tile, Z, mask=inside)
        wl = 0 if WEIGHT_LOOPS == 1 else loop
        Z = _looped_step(Z, P, Q, wl * HEADS * D1 * D1, HEADS, D1, inv_n, key_cols, offs_r, offs_c)
    tl.store(ZOUT + b * D1 * N1 + tile, Z, mask=inside)
    finite = (Z == Z) & (tl.abs(Z) < float("inf"))
    bad = tl.where(finite | ~inside, 0, 1)
    tl.store(NONFINITE + b, tl.sum(tl.sum(bad, axis=1), axis=0))


@triton.jit
def _chunk(c0, N1, offs_r, offs_c, D1):
    """Columns [c0, c0 + BC) of a (D1, N1) state: offsets and mask."""
    cols = c0 + offs_c
    return offs_r[:, None] * N1 + cols[None, :], (offs_r[:, None] < D1) & (cols[None, :] < N1)


@triton.jit
def _key_gram(Z, D1, N1, key_cols, offs_r, offs_c, BD: tl.constexpr, BC: tl.constexpr):
    """A = (Z M)(Z M)^T of the state at Z, summed over column chunks. (Keys masked by _chunk's mask and
    key_cols, not by _tiles.load_tile: with it the backward spilled 352-384 B at d + 1 = 21, not 304-320.)"""
    A = tl.zeros([BD, BD], dtype=tl.float32)
    for c0 in range(0, key_cols, BC):
        offs, inside = _chunk(c0, N1, offs_r, offs_c, D1)
        keys = tl.load(Z + offs, mask=inside & (c0 + offs_c[None, :] < key_cols), other=0.0)
        A += tl.dot(keys, tl.trans(keys), input_precision="ieee")
    return A


@triton.jit
def _looped_bwd_kernel(SAVED, P, Q, DOUT, DZ, DPP, DQP, SCRATCH, B, D1, N1, key_cols, inv_n, LOOPS, EVERY,
                       HEADS, WEIGHT_LOOPS, BD: tl.constexpr, BC: tl.constexpr):
    # One program per prompt, its states and gradient in global memory (L2), walked in chunks of BC
    # columns: the tiles a thread holds do not grow with the prompt. G, the gradient, lives in DZ.
    # Barriers separate a pass that writes a state from the next that reads it in another layout.
    b = tl.program_id(0)
    offs_r = tl.arange(0, BD)
    offs_c = tl.arange(0, BC)
    wtile = offs_r[:, None] * D1 + offs_r[None, :]
    winside = (offs_r[:, None] < D1) & (offs_r[None, :] < D1)
    G = DZ + b * D1 * N1
    for c0 in range(0, N1, BC):
        offs, inside = _chunk(c0, N1, offs_r, offs_c, D1)
        tl.store(G + offs, tl.load(DOUT + b * D1 * N1 + offs, mask=inside, other=0.0).to(tl.float32), mask=inside)
    for i in range(WEIGHT_LOOPS * HEADS):  # this prompt's partials start at zero
        zero = tl.zeros([BD, BD], dtype=tl.float32)
        tl.store(DPP + (b * WEIGHT_LOOPS * HEADS + i) * D1 * D1 + wtile, zero, mask=winside)
        tl.store(DQP + (b * WEIGHT_LOOPS * HEADS + i) * D1 * D1 + wtile, zero, mask=winside)
    n_ckpt = tl.cdiv(LOOPS, EVERY)
    scratch = SCRATCH + b * EVERY * D1 * N1
    for j in range(n_ckpt):
        seg = n_ckpt - 1 - j
        first = seg * EVERY
        count = tl.minimum(EVERY, LOOPS - first)
        # The segment's states, from its checkpoint, into scratch[0 .. count).
        saved = SAVED + (seg * B + b) * D1 * N1
        for c0 in range(0, N1, BC):
            offs, inside = _chunk(c0, N1, offs_r, offs_c, D1)
            tl.store(scratch + offs, tl.load(saved + offs, mask=inside, other=0.0), mask=inside)
        tl.debug_barrier()
        for i in range(count - 1):
            wl = 0 if WEIGHT_LOOPS == 1 else first + i
            Z = scratch + i * D1 * N1
            A = _key_gram(Z, D1, N1, key_cols, offs_r, offs_c, BD, BC)
            U = _mix(P, Q, A, wl * HEADS * D1 * D1, HEADS, D1, offs_r)
            for c0 in range(0, N1, BC):
                offs, inside = _chunk(c0, N1, offs_r, offs_c, D1)
                z = tl.load(Z + offs, mask=inside, other=0.0)
                tl.store(Z + D1 * N1 + offs, z + inv_n * tl.dot(U, z, input_precision="ieee"), mask=inside)
            tl.debug_barrier()
        for i2 in range(count):
            i = count - 1 - i2
            wl = 0 if WEIGHT_LOOPS == 1 else first + i
            Z = scratch + i * D1 * N1
            A = _key_gram(Z, D1, N1, key_cols, offs_r, offs_c, BD, BC)
            U = _mix(P, Q, A, wl * HEADS * D1 * D1, HEADS, D1, offs_r)
            dU = tl.zeros([BD, BD], dtype=tl.float32)
            for c0 in range(0, N1, BC):
                offs, inside = _chunk(c0, N1, offs_r, offs_c, D1)
                z = tl.load(Z + offs, mask=inside, other=0.0)
                g = tl.load(G + offs, mask=inside, other=0.0)
                dU += tl.dot(g, tl.trans(z), input_precision="ieee")
            dU = inv_n * dU
            dA = tl.zeros_like(A)
            for hh in range(HEADS):
                base = (wl * HEADS + hh) * D1 * D1
                qt = tl.trans(_load_tile(Q + base, offs_r, offs_r, D1, D1, D1))
                # P^T: read transposed from memory at 32-wide tiles, where transposing P in registers
                # spilled ~300 B; transposed in registers below (read so, ptxas settled on 64 registers
                # and spilled 84 B on sm_80).
                if BD >= 32:
                    pt = tl.load(P + base + offs_r[None, :] * D1 + offs_r[:, None], mask=winside, other=0.0)
                else:
                    pt = tl.trans(_load_tile(P + base, offs_r, offs_r, D1, D1, D1))
                dp = tl.dot(tl.dot(dU, qt, input_precision="ieee"), A, input_precision="ieee")
                dq = tl.dot(tl.dot(A, pt, input_precision="ieee"), dU, input_precision="ieee")
                part = (b * WEIGHT_LOOPS * HEADS + wl * HEADS + hh) * D1 * D1 + wtile
                tl.store(DPP + part, tl.load(DPP + part, mask=winside, other=0.0) + dp, mask=winside)
                tl.store(DQP + part, tl.load(DQP + part, mask=winside, other=0.0) + dq, mask=winside)
                dA += tl.dot(tl.dot(pt, dU, input_precision="ieee"), qt, input_precision="ieee")
            dA = dA + tl.trans(dA)
            tl.debug_barrier()  # every read of G above is done before G is overwritten
            # G <- G + inv_n U^T G + (dA + dA^T) Z M, chunk by chunk.
            for c0 in range(0, N1, BC):
                offs, inside = _chunk(c0, N1, offs_r, offs_c, D1)
                keys = tl.load(Z + offs, mask=inside & (c0 + offs_c[None, :] < key_cols), other=0.0)
                g = tl.load(G + offs, mask=inside, other=0.0)
                g += inv_n * tl.dot(tl.trans(U), g, input_precision="ieee")
                tl.store(G + offs, g + tl.dot(dA, keys, input_precision="ieee"), mask=inside)
            tl.debug_barrier()


def _looped_blocks(Z):
    return pow2_block(Z.shape[1]), pow2_block(Z.shape[2])


# FMA dots, IEEE fp32. The forward keeps a prompt's tiles in registers through every loop; the
# backward walks them in chunks of _BWD_CHUNK columns. Options the static report favours
# (python -m bench gpu-static).
_FWD_OPTIONS = {"num_warps": 8, "num_stages": 1}
# 64 columns: at d + 1 = 21 (32-wide tiles) chunks of 32 spilled 32 bytes on sm_80 with 16 warps and 16
# bytes with 8 (8 warps and 16 columns: 72 on sm_100); 64 spills on no target at d + 1 = 6, 11, 21.
_BWD_CHUNK = 64
_BWD_OPTIONS = {"num_warps": 16, "num_stages": 1}


def looped_forward(Z, P, Q, loops: int, key_cols: int, every: int):
    """(Z after the loops in fp32, saved states (ceil(loops/every), B, d+1, n+1)
    fp32, how many prompts ended non-finite)."""
    b, d1, n1 = Z.shape
    wl, heads = P.shape[0], P.shape[1]
    z = Z.contiguous()
    p, q = (w.float().contiguous() for w in (P, Q))
    out = torch.empty(b, d1, n1, device=Z.device, dtype=torch.float32)
    saved = torch.empty(triton.cdiv(loops, every), b, d1, n1, device=Z.device, dtype=torch.float32)
    nonfinite = torch.empty(b, device=Z.device, dtype=torch.int32)
    bd, bn = _looped_blocks(Z)
    _looped_fwd_kernel[(b,)](z, p, q, out, saved, nonfinite, b, d1, n1, key_cols, 1.0 / (n1 - 1), loops, every,
                             heads, wl, BD=bd, BN=bn, **_FWD_OPTIONS)
    return out, saved, int((nonfinite > 0).sum())


def looped_backward(saved, P, Q, dout, loops: int, key_cols: int, every: int):
    """dZ (B, d+1, n+1), dP, dQ (weight_loops, heads, d+1, d+1), fp32."""
    b, d1, n1 = dout.shape
    wl, heads = P.shape[0], P.shape[1]
    p, q = (w.float().contiguous() for w in (P, Q))
    g = dout.contiguous()
    dz = torch.empty(b, d1, n1, device=dout.device, dtype=torch.float32)
    dpp = torch.empty(b, wl, heads, d1, d1, device=dout.device, dtype=torch.float32)
    dqp = torch.empty_like(dpp)
    scratch = torch.empty(b, every, d1, n1, device=dout.device, dtype=torch.float32)
    bd, _ = _looped_blocks(dout)
    _looped_bwd_kernel[(b,)](saved.contiguous(), p, q, g, dz, dpp, dqp, scratch, b, d1, n1, key_cols,
                             1.0 / (n1 - 1), loops, every, heads, wl, BD=bd, BC=_BWD_CHUNK, **_BWD_OPTIONS)
    return dz, dpp.sum(0), dqp.sum(0)
