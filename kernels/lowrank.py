"""Triton passes of low-rank gradient compression (see tessel.compress): the
projections P = M Q and Q = M^T P, the reconstruction (gradient = P Q^T,
error = M - P' Q'^T) and Gram-Schmidt on the factors.

M = grad + error is formed on the fly in every pass, so each pass reads each
gradient (and error) element once. Factors are stored transposed, Pt (r, n)
and Qt (r, m), and padded in registers to 16 vectors (the smallest tl.dot);
the passes are memory-bound, so the padding costs no bandwidth. fp32 with
IEEE dots (factors are tiny; tf32 would cost accuracy, not time). One launch
per matrix and pass; Gram-Schmidt does every matrix of a buffer in one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreting
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
def _project_p_kernel(G, E, PT, QT, n, m, rank, HAS_E: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                      BR: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BR)
    acc = tl.zeros([BR, BN], dtype=tl.float32)
    for c0 in range(0, m, BM):
        cols = c0 + tl.arange(0, BM)
        tile = _m_tile(G, E, rows, cols, n, m, HAS_E)
        acc += tl.dot(_factor_tile(QT, ks, cols, rank, m), tl.trans(tile), input_precision="ieee")
    tl.store(PT + ks[:, None] * n + rows[None, :], acc, mask=(ks[:, None] < rank) & (rows[None, :] < n))


@triton.jit
def _project_q_kernel(G, E, PT, QT, n, m, rank, HAS_E: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                      BR: tl.constexpr):
    cols = tl.program_id(0) * BM + tl.arange(0, BM)
    ks = tl.arange(0, BR)
    acc = tl.zeros([BR, BM], dtype=tl.float32)
    for r0 in range(0, n, BN):
        rows = r0 + tl.arange(0, BN)
        tile = _m_tile(G, E, rows, cols, n, m, HAS_E)
        acc += tl.dot(_factor_tile(PT, ks, rows, rank, n), tile, input_precision="ieee")
    tl.store(QT + ks[:, None] * m + cols[None, :], acc, mask=(ks[:, None] < rank) & (cols[None, :] < m))


@triton.jit
def _reconstruct_kernel(G, E, PO, QO, PE, QE, n, m, rank, HAS_E: tl.constexpr, SAME: tl.constexpr,
                        BN: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BM + tl.arange(0, BM)
    ks = tl.arange(0, BR)
    inside = (rows[:, None] < n) & (cols[None, :] < m)
    offs = rows[:, None] * m + cols[None, :]
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
def _orthonormalize_kernel(BUF, OFFSETS, LENGTHS, rank, eps, BL: tl.constexpr):
    i = tl.program_id(0)
    base = BUF + tl.load(OFFSETS + i)
    length = tl.load(LENGTHS + i)
    for j in range(rank):
        vj = base + j * length
        sq = tl.zeros([BL], dtype=tl.float32)
        for s in range(0, length, BL):
            idx = s + tl.arange(0, BL)
            x = tl.load(vj + idx, mask=idx < length, other=0.0)
            sq += x * x
        norm = tl.sqrt(tl.sum(sq, axis=0)) + eps
        inv = tl.where(norm > 0, 1.0 / norm, 0.0)
        for s in range(0, length, BL):
            idx = s + tl.arange(0, BL)
            x = tl.load(vj + idx, mask=idx < length, other=0.0)
            tl.store(vj + idx, x * inv, mask=idx < length)
        for l in range(j + 1, rank):
            vl = base + l * length
            d = tl.zeros([BL], dtype=tl.float32)
            for s in range(0, length, BL):
                idx = s + tl.arange(0, BL)
                d += tl.load(vj + idx, mask=idx < length, other=0.0) * tl.load(vl + idx, mask=idx < length,
                                                                              other=0.0)
            dot = tl.sum(d, axis=0)
            for s in range(0, length, BL):
                idx = s + tl.arange(0, BL)
                x = tl.load(vl + idx, mask=idx < length, other=0.0)
                y = tl.load(vj + idx, mask=idx < length, other=0.0)
                tl.store(vl + idx, x - dot * y, mask=idx < length)


def _blocks():
    return (16, 16) if triton_interpreting() else (64, 128)


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


class LowRankOps:
    """The passes of tessel.compress on CUDA (or the interpreter): fp32 work tensors."""

    @staticmethod
    def _factor(buf, offset, rank, length):
        return buf[offset:offset + rank * length]

    def project_p(self, items, p, q, rank):
        bn, bm = _blocks()
        for it in items:
            e = it.error if it.error is not None else it.grad
            _project_p_kernel[(triton.cdiv(it.n, bn),)](
                it.grad, e, self._factor(p, it.p_offset, rank, it.n), self._factor(q, it.q_offset, rank, it.m),
                it.n, it.m, rank, HAS_E=it.error is not None, BN=bn, BM=bm, BR=_rank_block(rank))

    def project_q(self, items, p, q, rank):
        bn, bm = _blocks()
        for it in items:
            e = it.error if it.error is not None else it.grad
            _project_q_kernel[(triton.cdiv(it.m, bm),)](
                it.grad, e, self._factor(p, it.p_offset, rank, it.n), self._factor(q, it.q_offset, rank, it.m),
                it.n, it.m, rank, HAS_E=it.error is not None, BN=bn, BM=bm, BR=_rank_block(rank))

    def reconstruct(self, items, p_out, q_out, p_err, q_err, rank):
        bn, bm = _blocks()
        same = p_err.data_ptr() == p_out.data_ptr() and q_err.data_ptr() == q_out.data_ptr()
        for it in items:
            e = it.error if it.error is not None else it.grad
            _reconstruct_kernel[(triton.cdiv(it.n, bn), triton.cdiv(it.m, bm))](
                it.grad, e, *(self._factor(b, it.p_offset, rank, it.n) for b in (p_out,)),
                self._factor(q_out, it.q_offset, rank, it.m), self._factor(p_err, it.p_offset, rank, it.n),
                self._factor(q_err, it.q_offset, rank, it.m), it.n, it.m, rank, HAS_E=it.error is not None,
                SAME=same, BN=bn, BM=bm, BR=_rank_block(rank))

    def orthonormalize(self, buf, offsets, lengths, rank, eps):
        if buf.dtype != torch.float32:
            raise TypeError(f"the Triton Gram-Schmidt runs float32, got {buf.dtype}")
        offsets, lengths = offsets.to(buf.device), lengths.to(buf.device)
        _orthonormalize_kernel[(len(offsets),)](buf, offsets, lengths, rank, eps,
                                                BL=64 if triton_interpreting() else 1024)
