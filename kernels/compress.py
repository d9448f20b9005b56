"""Triton passes of low-rank gradient compression (see tessel.compress): the
projections P = M Q and Q = M^T P, the reconstruction (gradient = P Q^T,
error = M - P' Q'^T) and Gram-Schmidt on the factors.

M = grad + error is formed on the fly in every pass, so each pass reads each
gradient (and error) element once. Factors are stored transposed, Pt (r, n)
and Qt (r, m), and padded in registers to 16 vectors (the smallest tl.dot);
the passes are memory-bound, so the padding costs no bandwidth. fp32 with
IEEE dots (factors are tiny; tf32 would cost accuracy, not time). One launch
per matrix and pass; Gram-Schmidt does every matrix of a buffer in one launch.
The reconstruction reads a device flag (keep) and stores nothing when it is
false, so a non-finite average never reaches the error buffers and the host
never waits for the flag.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import pow2_block, triton_interpreting
from ._tiles import load_tile


@triton.jit
def _m_tile(G, E, rows, cols, n, m, HAS_E: tl.constexpr):
    """A tile of M = grad (+ error), zero outside."""
    tile = load_tile(G, rows, cols, m, n, m)
    if HAS_E:
        tile += load_tile(E, rows, cols, m, n, m)
    return tile


@triton.jit
def _factor_tile(F, ks, idx, rank, length):
    """[len(ks), len(idx)] block of a (rank, length) factor, zero outside."""
    return load_tile(F, ks, idx, length, rank, length)


@triton.jit
def _project_kernel(G, E, SRC, DST, n_out, n_red, s_out, s_red, rank, HAS_E: tl.constexpr, BO: tl.constexpr,
                    BRED: tl.constexpr, BR: tl.constexpr):
    """DST (rank, n_out) = SRC (rank, n_red) @ X, X = M^T (s_out = m, s_red = 1: P from Q) or X = M
    (s_out = 1, s_red = m: Q from P); one program per BO outputs, looping over the reduced dim."""
    outs = tl.program_id(0) * BO + tl.arange(0, BO)
    ks = tl.arange(0, BR)
    acc = tl.zeros([BR, BO], dtype=tl.float32)
    for r0 in range(0, n_red, BRED):
        red = r0 + tl.arange(0, BRED)
        at = red[:, None] * s_red + outs[None, :] * s_out
        inside = (red[:, None] < n_red) & (outs[None, :] < n_out)
        tile = tl.load(G + at, mask=inside, other=0.0)  # [BRED, BO]
        if HAS_E:
            tile += tl.load(E + at, mask=inside, other=0.0)
        acc += tl.dot(_factor_tile(SRC, ks, red, rank, n_red), tile, input_precision="ieee")
    tl.store(DST + ks[:, None] * n_out + outs[None, :], acc, mask=(ks[:, None] < rank) & (outs[None, :] < n_out))


@triton.jit
def _reconstruct_kernel(G, E, PO, QO, PE, QE, KEEP, n, m, rank, HAS_E: tl.constexpr, SAME: tl.constexpr,
                        BN: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BM + tl.arange(0, BM)
    ks = tl.arange(0, BR)
    keep = tl.load(KEEP) != 0
    inside = (rows[:, None] < n) & (cols[None, :] < m) & keep
    offs = rows[:, None] * m + cols[None, :]
    # [BN, BR] @ [BR, BM]
    out = tl.dot(tl.trans(_factor_tile(PO, ks, rows, rank, n)), _factor_tile(QO, ks, cols, rank, m),
                 input_precision="ieee")
    if HAS_E:
        M = _m_tile(G, E, rows, cols, n, m, True)
        sent = out
        if not SAME:
            sent = tl.dot(tl.trans(_factor_tile(PE, ks, rows, rank, n)), _factor_tile(QE, ks, cols, rank, m),
                          input_precision="ieee")
        tl.store(E + offs, M - sent, mask=inside)
    tl.store(G + offs, out, mask=inside)


@triton.jit
def _dot_rows(A, B, length, BL: tl.constexpr):
    acc = tl.zeros([BL], dtype=tl.float32)
    for s in range(0, length, BL):
        idx = s + tl.arange(0, BL)
        acc += tl.load(A + idx, mask=idx < length, other=0.0) * tl.load(B + idx, mask=idx < length, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _axpy_rows(alpha, X, Y, length, BL: tl.constexpr):
    """Y += alpha * X."""
    for s in range(0, length, BL):
        idx = s + tl.arange(0, BL)
        y = tl.load(Y + idx, mask=idx < length, other=0.0)
        tl.store(Y + idx, y + alpha * tl.load(X + idx, mask=idx < length, other=0.0), mask=idx < length)


@triton.jit
def _safe_norm(V, length, BL: tl.constexpr):
    """|v| without overflow or underflow: max|v| * |v / max|v||."""
    peak = tl.zeros([BL], dtype=tl.float32)
    for s in range(0, length, BL):
        idx = s + tl.arange(0, BL)
        peak = tl.maximum(peak, tl.abs(tl.load(V + idx, mask=idx < length, other=0.0)))
    top = tl.max(peak, axis=0)
    safe = tl.where(top > 0, top, 1.0)
    sq = tl.zeros([BL], dtype=tl.float32)
    for s in range(0, length, BL):
        idx = s + tl.arange(0, BL)
        x = tl.load(V + idx, mask=idx < length, other=0.0) / safe
        sq += x * x
    return tl.sqrt(tl.sum(sq, axis=0)) * safe


@triton.jit
def _orthonormalize_kernel(BUF, OFFSETS, LENGTHS, rank, eps, BL: tl.constexpr):
    """Gram-Schmidt with reorthogonalisation (each vector loses its projections
    on the earlier ones twice), as csrc/compress.cpp."""
    i = tl.program_id(0)
    base = BUF + tl.load(OFFSETS + i)
    length = tl.load(LENGTHS + i)
    for j in range(rank):
        vj = base + j * length
        for _ in range(2):
            for l in range(j):
                vl = base + l * length
                _axpy_rows(-_dot_rows(vl, vj, length, BL), vl, vj, length, BL)
        norm = _safe_norm(vj, length, BL) + eps
        # Divided, not multiplied by 1 / norm: that overflows for a subnormal norm.
        div = tl.where(norm == 0, 1.0, norm)
        for s in range(0, length, BL):
            idx = s + tl.arange(0, BL)
            x = tl.load(vj + idx, mask=idx < length, other=0.0)
            tl.store(vj + idx, x / div, mask=idx < length)


def _blocks():
    return (16, 16) if triton_interpreting() else (64, 128)


# The fp32 passes use FMA dots (no tensor cores for IEEE fp32): with 4 warps or a pipelined
# loop (num_stages > 1) their tiles spill registers on sm_80 and sm_90 (python -m bench gpu-static);
# 8 warps and one stage do not.
_PASS_OPTIONS = {"num_warps": 8, "num_stages": 1}


def _rank_block(rank: int) -> int:
    return pow2_block(rank)


def orthogonalize_(M, eps: float) -> None:
    """Gram-Schmidt on the columns of M (m, r) or of each (b, m, r), in place, computed in fp32."""
    m, r = M.shape[-2:]
    count = M.numel() // (m * r)
    vectors = M.reshape(-1, m, r).mT.float().contiguous()  # (b, r, m): the columns as rows
    CompressOps().orthonormalize(vectors.view(-1), [i * m * r for i in range(count)], [m] * count, r, eps)
    M.copy_(vectors.mT.reshape(M.shape))


class CompressOps:
    """The passes of tessel.compress on CUDA (or the interpreter): fp32 work
    tensors, one launch per matrix (see pymod/_compress_passes.py's Group)."""

    def project(self, group, P, Q, onto_p: bool):
        bn, bm = _blocks()
        for g, e, pt, qt in zip(group.grads, group.errors, group.p_parts(P), group.q_parts(Q)):
            n, m = g.shape
            # P = Q M^T: outputs along M's rows, reduced over its columns; Q = P M the other way round.
            src, dst, n_out, n_red, s_out, s_red, bo, bred = (qt, pt, n, m, m, 1, bn, bm) if onto_p else \
                (pt, qt, m, n, 1, m, bm, bn)
            _project_kernel[(triton.cdiv(n_out, bo),)](g, g if e is None else e, src, dst, n_out, n_red, s_out,
                                                       s_red, group.rank, HAS_E=e is not None, BO=bo, BRED=bred,
                                                       BR=_rank_block(group.rank), **_PASS_OPTIONS)

    def reconstruct(self, group, p_out, q_out, p_err, q_err, keep):
        bn, bm = _blocks()
        same = p_err.data_ptr() == p_out.data_ptr() and q_err.data_ptr() == q_out.data_ptr()
        parts = zip(group.grads, group.errors, group.p_parts(p_out), group.q_parts(q_out), group.p_parts(p_err),
                    group.q_parts(q_err))
        for g, e, po, qo, pe, qe in parts:
            n, m = g.shape
            _reconstruct_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm))](
                g, g if e is None else e, po, qo, pe, qe, keep, n, m, group.rank, HAS_E=e is not None, SAME=same,
                BN=bn, BM=bm, BR=_rank_block(group.rank), **_PASS_OPTIONS)

    def orthonormalize(self, buf, offsets, lengths, rank, eps):
        if buf.dtype != torch.float32:
            raise TypeError(f"the Triton Gram-Schmidt runs float32, got {buf.dtype}")
        offsets = torch.tensor(offsets, dtype=torch.int64, device=buf.device)
        lengths = torch.tensor(lengths, dtype=torch.int64, device=buf.device)
        _orthonormalize_kernel[(len(offsets),)](buf, offsets, lengths, rank, eps,
                                                BL=64 if triton_interpreting() else 1024)
