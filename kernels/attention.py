"""Triton flash attention (FlashAttention-2): forward, split-K decode, backward.

The math (Dao, "FlashAttention-2", 2023): per block of queries, stream key
blocks through an online softmax in fp32, using exp2 with scale * log2(e)
folded into the scores; save lse = m + log(l) per row. Backward recomputes
P = exp(S - lse) block by block: dV += P^T dO, dS = P * (dP - delta) with
delta = rowsum(dO * O) - dlse, dK += dS^T Q (one program per key block, all
q heads of its GQA group: no atomics, deterministic), dQ += dS K (one program
per query block).

Masks are a band: query i sees key j iff i + band_lo <= j <= i + band_hi
(causal, sliding windows and torch's top-left causal all reduce to it). The
forward visits only key blocks that touch the band, and runs the blocks
entirely inside it without any score mask.

Packed variable-length sequences (VARLEN) run the same kernels on batch 1:
the program's batch index picks a sequence, whose rows (q_start, len_q,
k_start, len_k, band_lo, band_hi) come from the segments tensor; programs
past their sequence's length return at once, so no work is spent on padding.

Limits: head_dim <= 256 (padded inside to a power of two, at least 16);
float16, bfloat16, float32 (float32 dots in IEEE precision unless
torch.backends.cuda.matmul.allow_tf32 is set); the last dim of q, k, v, dO
must have stride 1 (the caller copies otherwise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BAND_INF, DTYPES, dot_precision, fma_dots, last_dim_contiguous, least_bad, measured_at,
                      packed_as_batch, pow2_block, strides3, triton_interpreting)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
MAX_HEAD_DIM = 256
# Decode (few queries, long KV cache): keys are split across programs in
# multiples of this many keys, each split writing a partial result.
SPLIT_ALIGN = 256
DECODE_MAX_QUERIES = 16


def _configs(block_pairs, warps_stages):
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n in block_pairs
        for w, s in warps_stages
    ]


# Configs that spill registers or overflow shared memory on sm_80, sm_90 or sm_100, by kernel, BLOCK_D and
# input kind ("half": tensor-core dots; "fp32": IEEE dots on FMA units, tiles in registers), from
# python -m bench gpu-static: (BLOCK_M, BLOCK_N, warps, stages) -> spilled bytes (0: shared memory).
# An unmeasured BLOCK_D uses the next measured one up.
_SPILLING = {
    ("fwd", 16, "half"): {(64, 64, 8, 3): 8, (128, 128, 4, 2): 16, (128, 128, 4, 3): 16},
    ("fwd", 64, "half"): {(128, 128, 4, 2): 3504, (128, 128, 4, 3): 2336},
    ("fwd", 128, "half"): {(128, 64, 4, 2): 1196, (128, 64, 4, 3): 1356, (128, 128, 4, 2): 126944,
                           (128, 128, 4, 3): 121920, (128, 128, 8, 2): 8, (128, 128, 8, 3): 100},
    ("fwd", 256, "half"): {(64, 32, 4, 2): 48, (64, 32, 4, 3): 40, (64, 32, 8, 2): 12, (64, 64, 4, 2): 280,
                           (64, 64, 4, 3): 232, (64, 64, 8, 2): 8, (64, 64, 8, 3): 0},
    ("dkdv", 16, "half"): {},
    ("dkdv", 64, "half"): {(64, 64, 4, 2): 16},
    ("dkdv", 128, "half"): {(32, 64, 4, 2): 8, (32, 64, 8, 2): 8, (64, 32, 4, 2): 16, (64, 32, 8, 2): 16,
                            (64, 64, 4, 2): 148, (64, 64, 8, 2): 16},
    ("dkdv", 256, "half"): {(32, 32, 4, 2): 96, (32, 64, 4, 2): 20984, (32, 64, 8, 2): 48, (64, 32, 4, 2): 208,
                            (64, 32, 8, 2): 224, (64, 64, 4, 2): 4124, (64, 64, 8, 2): 168},
    ("dq", 16, "half"): {},
    ("dq", 64, "half"): {},
    ("dq", 128, "half"): {(32, 64, 8, 2): 16, (64, 64, 4, 2): 28, (128, 32, 4, 2): 436},
    ("dq", 256, "half"): {(32, 32, 8, 2): 32, (32, 64, 4, 2): 36, (64, 32, 4, 2): 128, (64, 64, 4, 2): 164,
                          (64, 64, 8, 2): 16, (128, 32, 4, 2): 5416, (128, 32, 8, 2): 800},
    ("fwd", 16, "fp32"): {(32, 32, 4, 2): 8, (64, 32, 4, 2): 16},
    ("fwd", 64, "fp32"): {(32, 16, 8, 2): 8, (32, 32, 4, 3): 16, (64, 32, 4, 2): 2380, (64, 32, 4, 3): 2312,
                          (64, 32, 8, 2): 48, (64, 32, 8, 3): 32, (64, 64, 8, 2): 1384, (64, 64, 8, 3): 1420},
    ("fwd", 128, "fp32"): {(16, 16, 4, 2): 8, (16, 16, 4, 3): 8, (32, 16, 4, 2): 1828, (32, 16, 4, 3): 1640,
                           (32, 32, 8, 2): 1876, (32, 32, 8, 3): 2464, (64, 32, 8, 2): 5456, (64, 32, 8, 3): 5332},
    ("fwd", 256, "fp32"): {(16, 16, 8, 3): 24, (32, 16, 8, 2): 56, (32, 16, 8, 3): 56},
    ("dkdv", 16, "fp32"): {(64, 64, 8, 2): 24},
    ("dkdv", 64, "fp32"): {(32, 32, 4, 2): 32, (32, 64, 4, 2): 3560, (64, 32, 4, 2): 35016, (64, 64, 8, 2): 7212},
    ("dkdv", 128, "fp32"): {(32, 32, 8, 2): 16, (32, 64, 8, 2): 2512, (64, 32, 8, 2): 2792},
    ("dkdv", 256, "fp32"): {},
    ("dq", 16, "fp32"): {(32, 64, 4, 2): 8, (64, 64, 4, 2): 44, (64, 64, 8, 2): 8},
    ("dq", 64, "fp32"): {(32, 64, 4, 2): 100, (32, 64, 8, 2): 8, (64, 32, 4, 2): 452, (64, 64, 8, 2): 124},
    ("dq", 128, "fp32"): {(64, 32, 8, 2): 8},
    ("dq", 256, "fp32"): {},
}
_SPILLING_BY_KIND = {kind: {(k, d): v for (k, d, i), v in _SPILLING.items() if i == kind} for kind in ("half", "fp32")}
# FMA dots also get a budget of fp32 values per thread (score tile and q / k / v tiles): the configs
# above it spill far more and take minutes to compile, so they are never measured.
_FMA_FLOATS_PER_THREAD = 64


def _config_key(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _fma_floats(c, block_d: int) -> float:
    m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    return (m * n + (m + n) * block_d) / (32 * c.num_warps)


def _pruner(kernel: str):
    """early_config_prune for `kernel`: drops the configs that spill or do not fit (see _SPILLING);
    where every config does, keeps the one that spills least."""

    def prune(configs, named_args, **kwargs):
        block_d = kwargs["BLOCK_D"]
        kind = "fp32" if fma_dots(named_args["Q"].dtype, kwargs["DOT_PRECISION"]) else "half"
        pairs = _block_pairs(kernel, kind)
        configs = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) in pairs] or configs[:1]
        if block_d >= 256:  # large head dims: at most 64 x 64 score tiles (the rest was never measured)
            configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64] or configs[:1]
        if kind == "fp32":
            floats = {c: _fma_floats(c, block_d) for c in configs}
            configs = [c for c in configs if floats[c] <= _FMA_FLOATS_PER_THREAD] or least_bad(configs, floats)
        bad = measured_at(_SPILLING_BY_KIND[kind], kernel, block_d)
        cost = {c: bad.get(_config_key(c), -1) for c in configs}
        kept = [c for c in configs if _config_key(c) not in bad]
        return kept or least_bad(configs, cost)

    return prune


_FWD_PAIRS = [(128, 64), (128, 128), (64, 64), (64, 32)]
_BWD_PAIRS = [(64, 64), (32, 64), (64, 32), (32, 32)]
# (BLOCK_M, BLOCK_N) only FMA dots take: their tiles live in registers, and from head dim 128 (64 for the
# split-K decode) only these small shapes fit without spilling (python -m bench gpu-static; the forward at
# head dim 256: 16 x 16 alone); tensor-core dots would waste them.
_FMA_PAIRS = {"fwd": [(32, 32), (32, 16), (16, 16)], "dkdv": [(16, 16)], "dq": []}
# The dQ tile of Triton's fused-attention tutorial on Hopper (128 queries x 32 keys), for tensor-core dots:
# no spills at head dims 16-128 with 8 warps on sm_80 / sm_90 / sm_100 (python -m bench gpu-static). Its
# dK/dV tile (32 x 128) spilled at head dims 64 and 128 on sm_80 with 4 and 8 warps: not offered.
_DQ_TUTORIAL_PAIRS = [(128, 32)]
# (8, 2): 8 warps without the third stage's buffers, the one config that fits every target at head dim
# 256 in fp32 (python -m bench gpu-static).
_FWD_CONFIGS = _configs(_FWD_PAIRS + _FMA_PAIRS["fwd"], [(4, 3), (8, 3), (4, 2), (8, 2)])
_BWD_CONFIGS = _configs(_BWD_PAIRS + _FMA_PAIRS["dkdv"] + _DQ_TUTORIAL_PAIRS, [(4, 2), (8, 2)])


def _block_pairs(kernel: str, kind: str) -> list:
    """The block shapes `kernel` may run with for dots of `kind`."""
    extra = _FMA_PAIRS[kernel] if kind == "fp32" else (_DQ_TUTORIAL_PAIRS if kernel == "dq" else [])
    return (_FWD_PAIRS if kernel == "fwd" else _BWD_PAIRS) + extra


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (as torch's max and logsumexp do)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _segment(SEG, i_b, NQ, NK, band_lo, band_hi, VARLEN: tl.constexpr):
    """(batch, q_start, len_q, k_start, len_k, band_lo, band_hi) of batch index i_b: a dense batch element
    spans both axes; a packed sequence is row i_b of SEG, in batch 0."""
    if VARLEN:
        row = SEG + i_b * 6
        return (0, tl.load(row), tl.load(row + 1).to(tl.int32), tl.load(row + 2), tl.load(row + 3).to(tl.int32),
                tl.load(row + 4).to(tl.int32), tl.load(row + 5).to(tl.int32))
    else:
        return i_b, 0, NQ, 0, NK, band_lo, band_hi


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, skn, svn, offs_m, offs_n, offs_d, start, end,
               NK, D, qk_scale, band_lo, band_hi,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        # [BLOCK_D, BLOCK_N]: K^T
        k = tl.load(k_base + cols[None, :] * skn + offs_d[:, None],
                    mask=(cols[None, :] < NK) & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            seen = (cols[None, :] < NK) & (cols[None, :] >= offs_m[:, None] + band_lo) \
                & (cols[None, :] <= offs_m[:, None] + band_hi)
            s = tl.where(seen, s, float("-inf"))
        m_new = _max_nan(m_i, tl.reduce(s, 1, _max_nan))
        # A row that has seen no key yet keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :],
                    mask=(cols[:, None] < NK) & (offs_d[None, :] < D), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=["BLOCK_D", "seq_bucket", "band_kind", "split_len"],
                 prune_configs_by={"early_config_prune": _pruner("fwd")})
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEG,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                sob, soh, sos, son, slb, slh, sls,
                H, GROUP, NQ, NK, D, qk_scale, band_lo, band_hi, split_len,
                seq_bucket, band_kind,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr = False):
    """One program: BLOCK_M queries of one (batch or sequence, head) against the keys of one split."""
    tl.static_assert(BLOCK_D >= 16)
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_split = tl.program_id(2)
    b, q_start, NQ, k_start, NK, band_lo, band_hi = _segment(SEG, (i_bh // H).to(tl.int64), NQ, NK, band_lo,
                                                             band_hi, VARLEN)
    if i_m * BLOCK_M >= NQ:
        return
    h = (i_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = tl.load(Q + b * sqb + h * sqh + (q_start + offs_m[:, None]) * sqn + offs_d[None, :],
                mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    row_lo = i_m * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, NQ) - 1
    key_lo = i_split * split_len
    key_hi = tl.minimum(NK, key_lo + split_len)
    start = tl.maximum(key_lo, row_lo + band_lo) // BLOCK_N * BLOCK_N
    end = tl.maximum(tl.minimum(key_hi, row_hi + band_hi + 1), start)
    # Key blocks in [mid_lo, mid_hi) are inside the band for every row: no mask.
    mid_lo = tl.minimum(tl.cdiv(tl.maximum(start, row_hi + band_lo), BLOCK_N) * BLOCK_N, end)
    mid_hi = tl.maximum(tl.maximum(tl.minimum(end, row_lo + band_hi + 1), mid_lo) // BLOCK_N * BLOCK_N, mid_lo)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, skn, svn, offs_m, offs_n, offs_d,
                               start, mid_lo, NK, D, qk_scale, band_lo, band_hi, True, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, skn, svn, offs_m, offs_n, offs_d,
                               mid_lo, mid_hi, NK, D, qk_scale, band_lo, band_hi, False, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, skn, svn, offs_m, offs_n, offs_d,
                               mid_hi, end, NK, D, qk_scale, band_lo, band_hi, True, BLOCK_N, DOT_PRECISION)

    # Empty by the band (within this split), never by the sum: NaN and inf propagate as in the reference,
    # whose logsumexp is +inf where a score is +inf.
    first = tl.maximum(tl.maximum(offs_m + band_lo, 0), key_lo)
    last = tl.minimum(tl.minimum(offs_m + band_hi, NK - 1), key_hi - 1)
    seen_any = first <= last
    out = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    lse = tl.where(seen_any, (m_i + tl.math.log2(tl.where(seen_any, l_i, 1.0))) / LOG2E, float("-inf"))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    o_base = O + b * sob + h * soh + i_split * sos + q_start * son
    tl.store(o_base + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < NQ) & (offs_d[None, :] < D))
    tl.store(LSE + b * slb + h * slh + i_split * sls + q_start + offs_m, lse, mask=offs_m < NQ)


@triton.jit
def _decode_combine_kernel(OP, LSEP, O, LSE, n_splits, NQ, D,
                           BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (batch*head, query row): merge the splits' partial
    (normalised output, lse) pairs into the row's output and lse."""
    i_row = tl.program_id(0).to(tl.int64)
    bh = i_row // NQ
    n = i_row % NQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LSEP + (bh * n_splits + offs_s) * NQ + n, mask=offs_s < n_splits, other=float("-inf"))
    m = tl.reduce(lse_s, 0, _max_nan)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp(lse_s - m_shift)
    total = tl.sum(w, 0)
    o_s = tl.load(OP + ((bh * n_splits + offs_s[:, None]) * NQ + n) * D + offs_d[None, :],
                  mask=(offs_s[:, None] < n_splits) & (offs_d[None, :] < D), other=0.0)
    # A row saw keys if any split did (lse -inf only for a split without keys; NaN stays NaN).
    seen = tl.sum((lse_s != float("-inf")).to(tl.int32), 0) > 0
    out = tl.sum(o_s * w[:, None], 0) / tl.where(seen, total, 1.0)
    tl.store(O + i_row * D + offs_d, out.to(O.dtype.element_ty), mask=offs_d < D)
    lse = tl.where(seen, m_shift + tl.math.log(total), float("-inf"))
    tl.store(LSE + i_row, tl.where(m == float("inf"), float("inf"), lse))


@triton.jit
def _bwd_preprocess_kernel(O, DO, DLSE, DELTA, LSE, LSE2, SEG, sob, soh, son, sdb, sdh, sdn,
                           H, NQ_ALL, NQ, NK, D, band_lo, band_hi,
                           HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           VARLEN: tl.constexpr = False):
    """delta = rowsum(dO * O) - dlse, and lse in log2 units (+inf where the
    band gives a row no key, so that exp2(S - lse2) is 0 there). Row
    statistics are (batch, H, NQ_ALL) contiguous."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b, q_start, NQ, _, NK, band_lo, band_hi = _segment(SEG, i_bh // H, NQ, NK, band_lo, band_hi, VARLEN)
    if i_m * BLOCK_M >= NQ:
        return
    h = i_bh % H
    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < NQ) & (offs_d[None, :] < D)
    rows = q_start + offs_m
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats = (b * H + h) * NQ_ALL + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + stats, mask=offs_m < NQ, other=0.0)
    tl.store(DELTA + stats, delta, mask=offs_m < NQ)
    lse = tl.load(LSE + stats, mask=offs_m < NQ, other=0.0)
    empty = tl.maximum(offs_m + band_lo, 0) > tl.minimum(offs_m + band_hi, NK - 1)
    tl.store(LSE2 + stats, tl.where(empty, float("inf"), lse * LOG2E), mask=offs_m < NQ)


@triton.jit
def _seen(rows, cols, NQ, NK, band_lo, band_hi):
    """Which (query, key) pairs of a tile are scored: rows and cols broadcast to the tile's shape."""
    return (rows < NQ) & (cols < NK) & (cols >= rows + band_lo) & (cols <= rows + band_hi)


@triton.jit
def _recompute_p_ds(q, k, v, do, lse2, delta, rows, cols, NQ, NK, qk_scale, band_lo, band_hi,
                    DOT_PRECISION: tl.constexpr):
    """P = exp(S - lse) and dS = P * (dP - delta) for one [BLOCK_M, BLOCK_N] tile."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.where(_seen(rows[:, None], cols[None, :], NQ, NK, band_lo, band_hi), tl.math.exp2(s - lse2[:, None]),
                 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p, p * (dp - delta[:, None])


@triton.autotune(configs=_BWD_CONFIGS, key=["BLOCK_D", "seq_bucket", "band_kind"],
                 prune_configs_by={"early_config_prune": _pruner("dkdv")})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, SEG,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                     H, HK, GROUP, NQ_ALL, NQ, NK, D, scale, qk_scale, band_lo, band_hi,
                     seq_bucket, band_kind,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr = False):
    """One program: dK, dV of BLOCK_N keys of one (batch or sequence, kv head),
    summed over the q heads of its group and every query block that sees
    them. dK and dV share their strides (sg*)."""
    i_n = tl.program_id(0)
    i_bhk = tl.program_id(1).to(tl.int64)
    b, q_start, NQ, k_start, NK, band_lo, band_hi = _segment(SEG, i_bhk // HK, NQ, NK, band_lo, band_hi, VARLEN)
    if i_n * BLOCK_N >= NK:
        return
    hk = i_bhk % HK
    cols = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < NK) & (offs_d[None, :] < D)
    k = tl.load(K + b * skb + hk * skh + (k_start + cols[:, None]) * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + (k_start + cols[:, None]) * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    col_lo = i_n * BLOCK_N
    col_hi = tl.minimum(col_lo + BLOCK_N, NK) - 1
    # Queries that see any of these keys.
    start = tl.maximum(0, col_lo - band_hi) // BLOCK_M * BLOCK_M
    end = tl.maximum(tl.minimum(NQ, col_hi - band_lo + 1), start)
    for h in range(hk * GROUP, hk * GROUP + GROUP):
        q_base = Q + b * sqb + h * sqh + q_start * sqn
        do_base = DO + b * sdb + h * sdh + q_start * sdn
        row_base = (b * H + h) * NQ_ALL + q_start
        for start_m in range(start, end, BLOCK_M):
            rows = start_m + offs_m
            # Each branch loads lse2 and delta after its tiles: loaded first, they turned configs the spill
            # table keeps into 8-16 byte spills.
            if DOT_PRECISION == "ieee" and Q.dtype.element_ty == tl.float32:
                # FMA dots: transposed tiles, as in Triton's fused-attention tutorial. S^T = K Q^T and
                # dP^T = V dO^T give P^T and dS^T, the left operands of dV and dK, with no score tile
                # transposed (the other way spilled 0.6-1.2 KB per thread at head dim 256). Tensor-core dots
                # keep the layout below: transposed, they spill in more configs at head dims 16 and 64
                # (python -m bench gpu-static).
                q_t_mask = (rows[None, :] < NQ) & (offs_d[:, None] < D)
                q_t = tl.load(q_base + rows[None, :] * sqn + offs_d[:, None], mask=q_t_mask, other=0.0)
                do_t = tl.load(do_base + rows[None, :] * sdn + offs_d[:, None], mask=q_t_mask, other=0.0)
                lse2 = tl.load(LSE2 + row_base + rows, mask=rows < NQ, other=float("inf"))
                delta = tl.load(DELTA + row_base + rows, mask=rows < NQ, other=0.0)
                s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
                p_t = tl.where(_seen(rows[None, :], cols[:, None], NQ, NK, band_lo, band_hi),
                               tl.math.exp2(s_t - lse2[None, :]), 0.0)
                ds_t = p_t * (tl.dot(v, do_t, input_precision=DOT_PRECISION) - delta[None, :])
                dv += tl.dot(p_t, tl.trans(do_t), input_precision=DOT_PRECISION)
                dk += tl.dot(ds_t, tl.trans(q_t), input_precision=DOT_PRECISION)
            else:
                q_mask = (rows[:, None] < NQ) & (offs_d[None, :] < D)
                q = tl.load(q_base + rows[:, None] * sqn + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(do_base + rows[:, None] * sdn + offs_d[None, :], mask=q_mask, other=0.0)
                lse2 = tl.load(LSE2 + row_base + rows, mask=rows < NQ, other=float("inf"))
                delta = tl.load(DELTA + row_base + rows, mask=rows < NQ, other=0.0)
                p, ds = _recompute_p_ds(q, k, v, do, lse2, delta, rows, cols, NQ, NK, qk_scale, band_lo, band_hi,
                                        DOT_PRECISION)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    out = b * sgb + hk * sgh + (k_start + cols[:, None]) * sgn + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_BWD_CONFIGS, key=["BLOCK_D", "seq_bucket", "band_kind"],
                 prune_configs_by={"early_config_prune": _pruner("dq")})
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, SEG,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                   H, GROUP, NQ_ALL, NQ, NK, D, scale, qk_scale, band_lo, band_hi,
                   seq_bucket, band_kind,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr = False):
    """One program: dQ (strides sg*) of BLOCK_M queries of one (batch or sequence, head)."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    b, q_start, NQ, k_start, NK, band_lo, band_hi = _segment(SEG, i_bh // H, NQ, NK, band_lo, band_hi, VARLEN)
    if i_m * BLOCK_M >= NQ:
        return
    h = i_bh % H
    hk = h // GROUP
    rows = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < NQ) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + (q_start + rows[:, None]) * sqn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + (q_start + rows[:, None]) * sdn + offs_d[None, :], mask=q_mask,
                 other=0.0)
    stats = (b * H + h) * NQ_ALL + q_start + rows
    lse2 = tl.load(LSE2 + stats, mask=rows < NQ, other=float("inf"))
    delta = tl.load(DELTA + stats, mask=rows < NQ, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    row_lo = i_m * BLOCK_M
    row_hi = tl.minimum(row_lo + BLOCK_M, NQ) - 1
    start = tl.maximum(0, row_lo + band_lo) // BLOCK_N * BLOCK_N
    end = tl.maximum(tl.minimum(NK, row_hi + band_hi + 1), start)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < NK) & (offs_d[None, :] < D)
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        _, ds = _recompute_p_ds(q, k, v, do, lse2, delta, rows, cols, NQ, NK, qk_scale, band_lo, band_hi,
                                DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + b * sgb + h * sgh + (q_start + rows[:, None]) * sgn + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------- host side


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in DTYPES and head_dim <= MAX_HEAD_DIM


def _block_d(dtype: torch.dtype, d: int) -> int:
    if dtype not in DTYPES:
        raise TypeError(f"the Triton attention kernel runs float16, bfloat16 and float32, got {dtype}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel supports head_dim <= {MAX_HEAD_DIM}, got {d}")
    return pow2_block(d)


def _seq_bucket(n: int) -> int:
    """Autotuning key: lengths grouped by powers of two (from 1k), not exact values."""
    return pow2_block(n, 1024)


def _band_kind(band_lo: int, band_hi: int) -> int:
    return int(band_lo > -BAND_INF) * 2 + int(band_hi < BAND_INF)


def _clamp_band(band_lo: int, band_hi: int, nq: int, nk: int) -> tuple[int, int]:
    """The same band with both sides within [-nq, nk]: beyond that every key
    (or none) is in range, and the kernels' index math stays int32."""
    return min(max(band_lo, -nq), nk + 1), min(max(band_hi, -nq - 1), nk)


def _num_decode_splits(batch_heads: int, nq: int, nk: int, device: torch.device) -> int:
    """Splits so that few queries against a long KV cache still fill the GPU."""
    if nq > DECODE_MAX_QUERIES or nk < 2 * SPLIT_ALIGN or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(nk, SPLIT_ALIGN), triton.cdiv(2 * sms, batch_heads), 128))


def attention_forward(q, k, v, scale: float, band_lo: int, band_hi: int, num_splits: int | None = None):
    """out (B, H, Nq, D) in q's dtype and lse (B, H, Nq) in float32.

    num_splits: key splits for the split-K decode path; None picks it (more
    than one only for at most 16 queries against a long KV cache).
    """
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    block_d = _block_d(q.dtype, d)
    band_kind = _band_kind(band_lo, band_hi)
    band_lo, band_hi = _clamp_band(band_lo, band_hi, nq, nk)
    if num_splits is None:
        num_splits = _num_decode_splits(b * h, nq, nk, q.device)
    split_len = triton.cdiv(triton.cdiv(nk, num_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    num_splits = triton.cdiv(nk, split_len)
    out = torch.empty(b, h, nq, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, nq, device=q.device, dtype=torch.float32)
    if num_splits == 1:
        o_part, lse_part = out, lse
        o_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        l_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        o_part = torch.empty(b, h, num_splits, nq, d, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(b, h, num_splits, nq, device=q.device, dtype=torch.float32)
        o_strides = (o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3))
        l_strides = (lse_part.stride(0), lse_part.stride(1), lse_part.stride(2))

    def grid(meta):
        return triton.cdiv(nq, meta["BLOCK_M"]), b * h, num_splits

    _fwd_kernel[grid](
        q, k, v, o_part, lse_part, None, *strides3(q), *strides3(k), *strides3(v), *o_strides, *l_strides,
        h, h // hk, nq, nk, d, scale * LOG2E.value, band_lo, band_hi, split_len,
        _seq_bucket(max(nq, nk)), band_kind,
        BLOCK_D=block_d, DOT_PRECISION=dot_precision(q.dtype),
    )
    if num_splits > 1:
        _decode_combine_kernel[(b * h * nq,)](
            o_part, lse_part, out, lse, num_splits, nq, d,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out, lse


# Packed sequences (total, heads, D) are launched as (1, heads, total, D) views
# with one segment per sequence: batch strides never matter (batch 0), and the
# grid covers the longest sequence's blocks for every sequence.
_VARLEN_BAND_KIND = -1  # an autotuning key of its own: the bands vary by sequence


def attention_varlen_forward(q, k, v, segments, max_seqlen_q: int, max_seqlen_k: int, scale: float):
    """out (total_q, H, D) in q's dtype and lse (H, total_q) in float32 for
    packed sequences; segments: int64 (batch, 6) on q's device (see
    tessel.attention's _segments)."""
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    total_q, h, d = q.shape
    total_k, hk, _ = k.shape
    out = torch.empty(total_q, h, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(h, total_q, device=q.device, dtype=torch.float32)
    qb, kb, vb, ob = (packed_as_batch(x) for x in (q, k, v, out))
    _fwd_kernel[lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), segments.shape[0] * h, 1)](
        q, k, v, out, lse, segments, *strides3(qb), *strides3(kb), *strides3(vb),
        ob.stride(0), ob.stride(1), 0, ob.stride(2), 0, lse.stride(0), 0,
        h, h // hk, total_q, total_k, d, scale * LOG2E.value, 0, 0, max(total_k, 1),
        _seq_bucket(max(max_seqlen_q, max_seqlen_k)), _VARLEN_BAND_KIND,
        BLOCK_D=_block_d(q.dtype, d), DOT_PRECISION=dot_precision(q.dtype), VARLEN=True,
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, dlse, dq, dk, dv, scale, band, segments, batches, rows, keys, tuning_keys):
    """The three backward kernels on (B, H, N, D) views (dk and dv share
    strides); lse and dlse are (B, H, Nq) contiguous. Dense: segments None,
    `batches` the batch, `rows`/`keys` Nq/Nk; packed: one batch of segments,
    `rows`/`keys` the longest sequence's lengths."""
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    varlen = segments is not None
    stats = dict(device=q.device, dtype=torch.float32)
    delta, lse2 = torch.empty(b, h, nq, **stats), torch.empty(b, h, nq, **stats)
    block_d = _block_d(q.dtype, d)
    # Two (rows x BLOCK_D) fp32 tiles per program: 2048 elements each keep them in registers.
    pre_block = 16 if triton_interpreting() else max(16, min(64, 2048 // block_d))
    _bwd_preprocess_kernel[(triton.cdiv(rows, pre_block), batches * h)](
        out, dout, dlse.contiguous() if dlse is not None else lse, delta, lse, lse2, segments,
        *strides3(out), *strides3(dout), h, nq, nq, nk, d, *band,
        HAS_DLSE=dlse is not None, BLOCK_M=pre_block, BLOCK_D=block_d, VARLEN=varlen,
    )
    common = (*strides3(q), *strides3(k), *strides3(v), *strides3(dout))
    tuning = dict(BLOCK_D=block_d, DOT_PRECISION=dot_precision(q.dtype), VARLEN=varlen)
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(keys, meta["BLOCK_N"]), batches * hk)](
        q, k, v, dout, lse2, delta, dk, dv, segments, *common, *strides3(dk),
        h, hk, h // hk, nq, nq, nk, d, scale, scale * LOG2E.value, *band, *tuning_keys, **tuning,
    )
    _bwd_dq_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), batches * h)](
        q, k, v, dout, lse2, delta, dq, segments, *common, *strides3(dq),
        h, h // hk, nq, nq, nk, d, scale, scale * LOG2E.value, *band, *tuning_keys, **tuning,
    )


def attention_backward(dout, q, k, v, out, lse, dlse, scale: float, band_lo: int, band_hi: int):
    """(dq, dk, dv) in the inputs' dtypes; deterministic (no atomics)."""
    q, k, v, dout = (last_dim_contiguous(x) for x in (q, k, v, dout))
    b, _, nq, _ = q.shape
    nk = k.shape[2]
    keys = (_seq_bucket(max(nq, nk)), _band_kind(band_lo, band_hi))
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    _backward(dout, q, k, v, last_dim_contiguous(out), lse.contiguous(), dlse, dq, dk, dv, scale,
              _clamp_band(band_lo, band_hi, nq, nk), None, b, nq, nk, keys)
    return dq, dk, dv


def attention_varlen_backward(dout, q, k, v, out, lse, dlse, segments, max_seqlen_q: int, max_seqlen_k: int,
                              scale: float):
    """(dq, dk, dv) of packed sequences, (total, heads, D) in the inputs' dtypes."""
    q, k, v, dout, out = (last_dim_contiguous(x) for x in (q, k, v, dout, out))
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    keys = (_seq_bucket(max(max_seqlen_q, max_seqlen_k)), _VARLEN_BAND_KIND)
    _backward(*(packed_as_batch(x) for x in (dout, q, k, v, out)), lse.contiguous()[None],
              None if dlse is None else dlse[None], *(packed_as_batch(x) for x in (dq, dk, dv)), scale, (0, 0),
              segments, segments.shape[0], max_seqlen_q, max_seqlen_k, keys)
    return dq, dk, dv
