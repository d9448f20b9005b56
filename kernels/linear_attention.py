"""Triton chunked linear attention, forward and backward.

Chunked linear attention (flash-linear-attention's fused-chunk scheme), with
the feature maps already applied and s = scale:
- forward: one program per (batch * head, block of value columns) walks the
  chunks in order, the state S[:, block] (D x BV, fp32) in registers: per
  chunk o = s q S + tril(s q k^T) v, then S += k^T v. Non-causal: S over all
  keys first, then o = s q S.
- dq: one program per (batch * head, block of key dims) walks forward
  carrying S^T: dq = s (dO S^T + tril(dO v^T) k).
- dk, dv: one program per (batch * kv head, block of value columns, block of
  key dims) walks backward carrying dS (the gradient of the state after the
  chunk), summing the q heads of its GQA group: dv = triu(k qs^T) dO + k dS,
  dk = triu(v dO^T) qs + v dS^T, dS += qs^T dO; dk is a partial sum per value
  block and dv per key-dim block (one block but for FMA dots at dims from
  128), added up after. No atomics: deterministic.
Packed sequences (VARLEN, cu_seqlens, batch 1): the program's batch index
picks a sequence, whose tokens it walks with its own state.
Dots take the input dtype with fp32 accumulation; states are fp32 (cast to
the input dtype as dot operands, as fla does). Dims pad to powers of two, at
least 16 (the smallest tl.dot).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (DTYPES, dot_precision, fma_dots, last_dim_contiguous, least_bad, measured_at, pow2_block,
                      strides3, triton_interpreting)
from ._tiles import load_tile as _load_tile

MAX_DIM = 256
# Elements of a state tile one program keeps in registers.
STATE_TILE = 4096
# dK/dV keeps more tiles live beside its state block (q, k, v, dO of a chunk, two chunk products):
# with 4096-element blocks it spills on sm_80 at dims >= 64 in every config; 1024 (16 columns at
# dims 64 and 128) does not (python -m bench gpu-static).
DKDV_STATE_TILE = 1024
# FMA dots (fp32) split dK/dV's key dims into blocks of this many (dS rows): with whole 128-dim tiles
# dK/dV spilled up to 24 bytes (python -m bench gpu-static); a 64-dim block is the dim-64 kernel.
FMA_DKDV_DIM_BLOCK = 64


# fp32 inputs take FMA dots (IEEE fp32 has no tensor cores), their tiles in registers: 16-token chunks on
# 8 warps, 1 stage, the one config that does not spill at dim 64 and spills least at 128 (python -m bench
# gpu-static); tensor-core dots never take it.
_FMA_CONFIG = (16, 8, 1)


def _chunk_configs():
    if triton_interpreting():
        return [triton.Config({"BT": 16}, num_warps=1, num_stages=1)]
    # No 2-warp configs: Hopper's wgmma needs a warpgroup (4 warps), and at dims of 128 they spill
    # registers on sm_80 and sm_90 (python -m bench gpu-static).
    shapes = [(bt, w, s) for bt in (32, 64) for w in (4, 8) for s in (1, 2, 3)] + [_FMA_CONFIG]
    return [triton.Config({"BT": bt}, num_warps=w, num_stages=s) for bt, w, s in shapes]


_KEY = ["BD", "BV", "CAUSAL"]
# Chunk configs that spill registers or overflow shared memory on sm_80, sm_90 or sm_100 with half-precision
# inputs, by kernel and dim (BD; BVF for dq), from python -m bench gpu-static: (BT, warps, stages) ->
# spilled bytes.
_SPILLING = {
    ("fwd", 16): {(64, 8, 3): 24},
    ("fwd", 64): {(64, 4, 1): 64, (64, 4, 3): 12},
    ("fwd", 128): {(32, 4, 1): 32, (32, 8, 3): 12, (64, 4, 1): 24, (64, 8, 1): 24},
    ("dq", 16): {},
    ("dq", 64): {(32, 8, 2): 8, (32, 8, 3): 8},
    ("dq", 128): {(64, 4, 1): 24},
    ("dkdv", 16): {},
    ("dkdv", 64): {(64, 8, 2): 64, (64, 8, 3): 56},
    ("dkdv", 128): {(32, 4, 1): 128, (32, 4, 2): 36, (32, 4, 3): 36, (64, 4, 1): 208, (64, 4, 2): 164,
                    (64, 4, 3): 164, (64, 8, 1): 36, (64, 8, 2): 72, (64, 8, 3): 64},
}


def _pruner(kernel: str, dim_key: str):
    """early_config_prune for `kernel`: drops the configs that spill or do not fit (see _SPILLING)."""

    def prune(configs, named_args, **kwargs):
        key = {c: (c.kwargs["BT"], c.num_warps, c.num_stages) for c in configs}
        if fma_dots(named_args["K"].dtype, kwargs["DOT_PRECISION"]):
            return [c for c in configs if key[c] == _FMA_CONFIG] or configs[:1]
        configs = [c for c in configs if key[c] != _FMA_CONFIG] or configs[:1]
        bad = measured_at(_SPILLING, kernel, kwargs[dim_key])
        kept = [c for c in configs if key[c] not in bad]
        return kept or least_bad(configs, {c: bad.get(key[c], -1) for c in configs})

    return prune


@triton.jit
def _sequence(CU, i_b, NQ, NK, VARLEN: tl.constexpr):
    """(batch, first token, NQ, NK) of batch index i_b: a dense batch element, or packed sequence i_b
    (CU: its cu_seqlens) in batch 0."""
    if VARLEN:
        start = tl.load(CU + i_b)
        n = (tl.load(CU + i_b + 1) - start).to(tl.int32)
        return 0, start.to(tl.int64), n, n
    else:
        return i_b, 0, NQ, NK


@triton.jit
def _intra_chunk(x, a, b, offs_t, DOT_PRECISION: tl.constexpr):
    """tril(x a^T) b, [BT, cols of b]: the part of a causal chunk's result that comes from the chunk
    itself (forward: x = q, a = k, b = v; dq: x = dO, a = v, b = k)."""
    s = tl.dot(x, tl.trans(a), input_precision=DOT_PRECISION)  # [BT, BT]
    s = tl.where(offs_t[:, None] >= offs_t[None, :], s, 0.0)
    return tl.dot(s.to(x.dtype), b, input_precision=DOT_PRECISION)


@triton.autotune(configs=_chunk_configs(), key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("fwd", "BD")})
@triton.jit
def _fwd_kernel(Q, K, V, S0, O, SF, CU, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                H, G, NQ, NK, D, DV, scale,
                HAS_S0: tl.constexpr, CAUSAL: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                BT: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr = False):
    iv, bh = tl.program_id(0), tl.program_id(1)
    i_b, h = bh // H, bh % H
    out_rows = NQ  # O is (batch, H, NQ, DV) contiguous
    b, start, NQ, NK = _sequence(CU, i_b, NQ, NK, VARLEN)
    hk = h // G
    HK = H // G
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    q_base = Q + b * sqb + h * sqh + start * sqn
    k_base = K + b * skb + hk * skh + start * skn
    v_base = V + b * svb + hk * svh + start * svn
    state_base = (i_b * HK + hk) * D * DV
    if HAS_S0:
        S = _load_tile(S0 + state_base, offs_d, offs_v, DV, D, DV)
    else:
        S = tl.zeros([BD, BV], dtype=tl.float32)
    dt = Q.dtype.element_ty
    if not CAUSAL:
        for t0 in range(0, NK, BT):
            rows = t0 + offs_t
            k = _load_tile(k_base, rows, offs_d, skn, NK, D)
            v = _load_tile(v_base, rows, offs_v, svn, NK, DV)
            S += tl.dot(tl.trans(k), v, input_precision=DOT_PRECISION)
    for t0 in range(0, NQ, BT):
        rows = t0 + offs_t
        q = (_load_tile(q_base, rows, offs_d, sqn, NQ, D) * scale).to(dt)
        o = tl.dot(q, S.to(dt), input_precision=DOT_PRECISION)
        if CAUSAL:
            k = _load_tile(k_base, rows, offs_d, skn, NK, D)
            v = _load_tile(v_base, rows, offs_v, svn, NK, DV)
            o += _intra_chunk(q, k, v, offs_t, DOT_PRECISION)
            S += tl.dot(tl.trans(k), v, input_precision=DOT_PRECISION)
        tl.store(O + ((b * H + h) * out_rows + start + rows[:, None]) * DV + offs_v[None, :],
                 o.to(O.dtype.element_ty), mask=(rows[:, None] < NQ) & (offs_v[None, :] < DV))
    if h % G == 0:
        tl.store(SF + state_base + offs_d[:, None] * DV + offs_v[None, :], S,
                 mask=(offs_d[:, None] < D) & (offs_v[None, :] < DV))


@triton.autotune(configs=_chunk_configs(), key=["BK", "BVF", "CAUSAL"],
                 prune_configs_by={"early_config_prune": _pruner("dq", "BVF")})
@triton.jit
def _bwd_dq_kernel(K, V, DO, ST0, DQ, CU, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                   H, G, NQ, NK, D, DV, scale,
                   HAS_S0: tl.constexpr, CAUSAL: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
                   BT: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr = False):
    ik, bh = tl.program_id(0), tl.program_id(1)
    i_b, h = bh // H, bh % H
    out_rows = NQ  # DQ is (batch, H, NQ, D) contiguous
    b, start, NQ, NK = _sequence(CU, i_b, NQ, NK, VARLEN)
    hk = h // G
    HK = H // G
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BVF)
    offs_t = tl.arange(0, BT)
    k_base = K + b * skb + hk * skh + start * skn
    v_base = V + b * svb + hk * svh + start * svn
    do_base = DO + b * sdb + h * sdh + start * sdn
    dt = K.dtype.element_ty
    # S^T[:, key block] (Dv x BK): the state before the chunk (causal) or the final state.
    if HAS_S0:
        ST = tl.load(ST0 + (i_b * HK + hk) * D * DV + offs_k[None, :] * DV + offs_v[:, None],
                     mask=(offs_k[None, :] < D) & (offs_v[:, None] < DV), other=0.0)
    else:
        ST = tl.zeros([BVF, BK], dtype=tl.float32)
    for t0 in range(0, NQ, BT):
        rows = t0 + offs_t
        do = _load_tile(do_base, rows, offs_v, sdn, NQ, DV).to(dt)
        dq = tl.dot(do, ST.to(dt), input_precision=DOT_PRECISION)
        if CAUSAL:
            k = _load_tile(k_base, rows, offs_k, skn, NK, D)
            v = _load_tile(v_base, rows, offs_v, svn, NK, DV)
            dq += _intra_chunk(do, v, k, offs_t, DOT_PRECISION)
            ST += tl.dot(tl.trans(v), k, input_precision=DOT_PRECISION)
        tl.store(DQ + ((b * H + h) * out_rows + start + rows[:, None]) * D + offs_k[None, :], dq * scale,
                 mask=(rows[:, None] < NQ) & (offs_k[None, :] < D))


@triton.jit
def _dkdv_chunk(dS, q_base, do_base, sqn, sdn, k, v, rows, offs_t, offs_d, offs_v, NQ, D, DV, scale, dv, dk,
                CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One q head's share of a chunk: the intra-chunk dv, dk and dS += qs^T dO."""
    dt = k.dtype
    qs = (_load_tile(q_base, rows, offs_d, sqn, NQ, D) * scale).to(dt)
    do = _load_tile(do_base, rows, offs_v, sdn, NQ, DV).to(dt)
    if CAUSAL:
        upper = offs_t[:, None] <= offs_t[None, :]
        s = tl.where(upper, tl.dot(k, tl.trans(qs), input_precision=DOT_PRECISION), 0.0)
        dv += tl.dot(s.to(dt), do, input_precision=DOT_PRECISION)
        p = tl.where(upper, tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION), 0.0)
        dk += tl.dot(p.to(dt), qs, input_precision=DOT_PRECISION)
    dS += tl.dot(tl.trans(qs), do, input_precision=DOT_PRECISION)
    return dS, dv, dk


@triton.autotune(configs=_chunk_configs(), key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("dkdv", "BD")})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DSF, DS0, DKP, DVP, CU, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     sdb, sdh, sdn, H, G, NQ, NK, D, DV, scale, part_rows,
                     HAS_DS: tl.constexpr, CAUSAL: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                     BT: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr = False):
    """DKP: the value blocks' partial dK, each part_rows rows of D; DVP: the key-dim blocks' (BD wide)
    partial dV, each part_rows rows of DV."""
    block, bhk = tl.program_id(0), tl.program_id(1)
    n_db = tl.cdiv(D, BD)
    iv, idb = block // n_db, block % n_db
    HK = H // G
    i_b, hk = bhk // HK, bhk % HK
    out_rows = NK
    b, start, NQ, NK = _sequence(CU, i_b, NQ, NK, VARLEN)
    offs_d = idb * BD + tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    offs_t = tl.arange(0, BT)
    k_base = K + b * skb + hk * skh + start * skn
    v_base = V + b * svb + hk * svh + start * svn
    dt = K.dtype.element_ty
    state_base = bhk * D * DV
    if HAS_DS:
        dS = _load_tile(DSF + state_base, offs_d, offs_v, DV, D, DV)
    else:
        dS = tl.zeros([BD, BV], dtype=tl.float32)
    zero_v = tl.zeros([BT, BV], dtype=tl.float32)
    zero_d = tl.zeros([BT, BD], dtype=tl.float32)
    if not CAUSAL:
        for g in range(G):
            h = hk * G + g
            for t0 in range(0, NQ, BT):
                dS, _, _ = _dkdv_chunk(dS, Q + b * sqb + h * sqh + start * sqn, DO + b * sdb + h * sdh + start * sdn,
                                       sqn, sdn,
                                       zero_d.to(dt), zero_v.to(dt), t0 + offs_t, offs_t, offs_d, offs_v,
                                       NQ, D, DV, scale, zero_v, zero_d, False, DOT_PRECISION)
    n_chunks = tl.cdiv(NK, BT)
    for i in range(0, n_chunks):
        c = i
        if CAUSAL:
            c = n_chunks - 1 - i
        rows = c * BT + offs_t
        k = _load_tile(k_base, rows, offs_d, skn, NK, D).to(dt)
        v = _load_tile(v_base, rows, offs_v, svn, NK, DV).to(dt)
        dv = tl.dot(k, dS.to(dt), input_precision=DOT_PRECISION)
        dk = tl.dot(v, tl.trans(dS.to(dt)), input_precision=DOT_PRECISION)
        if CAUSAL:
            for g in range(G):
                h = hk * G + g
                dS, dv, dk = _dkdv_chunk(dS, Q + b * sqb + h * sqh + start * sqn,
                                         DO + b * sdb + h * sdh + start * sdn, sqn, sdn, k, v,
                                         rows, offs_t, offs_d, offs_v, NQ, D, DV, scale, dv, dk, True,
                                         DOT_PRECISION)
        out = (b * HK + hk) * out_rows + start + rows[:, None]
        tl.store(DVP + (idb * part_rows + out) * DV + offs_v[None, :], dv,
                 mask=(rows[:, None] < NK) & (offs_v[None, :] < DV))
        tl.store(DKP + (iv * part_rows + out) * D + offs_d[None, :], dk,
                 mask=(rows[:, None] < NK) & (offs_d[None, :] < D))
    tl.store(DS0 + state_base + offs_d[:, None] * DV + offs_v[None, :], dS,
             mask=(offs_d[:, None] < D) & (offs_v[None, :] < DV))


def _check(dtype, d, dv):
    if dtype not in DTYPES:
        raise TypeError(f"the Triton linear attention kernel runs float16, bfloat16 and float32, got {dtype}")
    if max(d, dv) > MAX_DIM:
        raise ValueError(f"the Triton linear attention kernel supports dims <= {MAX_DIM}, got {d} and {dv}")


def _state_block(full_rows: int, cols: int, tile: int = STATE_TILE) -> int:
    """Columns of a (full_rows x block) fp32 state tile that fits `tile` elements (at least 16)."""
    return min(pow2_block(cols), max(16, tile // full_rows))


def _state_tile(dtype, precision: str, full_rows: int) -> int:
    """STATE_TILE, or 16 columns for FMA dots (fp32) with 128 rows or more: their operand tiles sit in
    registers beside the state, and 32 columns spilled at dim 128 (python -m bench gpu-static)."""
    return 16 * full_rows if fma_dots(dtype, precision) and full_rows >= 128 else STATE_TILE


def _states(b: int, cu_seqlens) -> int:
    """States (and program rows per head): one per batch element, or per packed sequence."""
    return b if cu_seqlens is None else cu_seqlens.shape[0] - 1


def linear_forward(q, k, v, state0, cu_seqlens, scale: float, causal: bool):
    """out (B, H, Nq, Dv) in q's dtype and the final state (states, Hkv, D, Dv)
    fp32; cu_seqlens (or None): packed sequences in a batch of one."""
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    _check(q.dtype, d, dv)
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    states = _states(b, cu_seqlens)
    out = torch.empty(b, h, nq, dv, device=q.device, dtype=q.dtype)
    state = torch.empty(states, hk, d, dv, device=q.device, dtype=torch.float32)
    s0 = state if state0 is None else state0.float().contiguous()
    bd = pow2_block(d)
    bv = _state_block(bd, dv, _state_tile(q.dtype, dot_precision(q.dtype), bd))
    grid = (triton.cdiv(dv, bv), states * h)
    _fwd_kernel[grid](q, k, v, s0, out, state, cu_seqlens, *strides3(q), *strides3(k), *strides3(v), h, h // hk,
                      nq, nk, d, dv, scale, HAS_S0=state0 is not None, CAUSAL=causal, BD=bd, BV=bv,
                      DOT_PRECISION=dot_precision(q.dtype), VARLEN=cu_seqlens is not None)
    return out, state


def linear_backward(q, k, v, state0, cu_seqlens, state, dout, dstate, scale: float, causal: bool):
    """dq, dk, dv in fp32 and the gradient of state0 (states, Hkv, D, Dv) fp32.
    state: the forward's final state (the non-causal dq reads it)."""
    b, h, nq, d = q.shape
    hk, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    _check(q.dtype, d, dv)
    states, varlen = _states(b, cu_seqlens), cu_seqlens is not None
    q, k, v, dout = (last_dim_contiguous(x) for x in (q, k, v, dout))
    precision = dot_precision(q.dtype)
    bd, bvf = pow2_block(d), pow2_block(dv)

    dq = torch.empty(b, h, nq, d, device=q.device, dtype=torch.float32)
    st = (state0 if causal else state)
    has_st = st is not None
    st = st.float().contiguous() if has_st else dq
    bk = _state_block(bvf, d, _state_tile(q.dtype, precision, bvf))
    _bwd_dq_kernel[(triton.cdiv(d, bk), states * h)](
        k, v, dout, st, dq, cu_seqlens, *strides3(k), *strides3(v), *strides3(dout), h, h // hk, nq, nk, d, dv,
        scale, HAS_S0=has_st, CAUSAL=causal, BK=bk, BVF=bvf, DOT_PRECISION=precision, VARLEN=varlen)

    bdk = FMA_DKDV_DIM_BLOCK if fma_dots(q.dtype, precision) and bd > FMA_DKDV_DIM_BLOCK else bd
    bv = _state_block(bdk, dv, DKDV_STATE_TILE)
    n_vb, n_db = triton.cdiv(dv, bv), triton.cdiv(d, bdk)
    dk_parts = torch.empty(n_vb, b, hk, nk, d, device=q.device, dtype=torch.float32)
    dv_parts = torch.empty(n_db, b, hk, nk, dv, device=q.device, dtype=torch.float32)
    ds0 = torch.empty(states, hk, d, dv, device=q.device, dtype=torch.float32)
    dsf = ds0 if dstate is None else dstate.float().contiguous()
    _bwd_dkdv_kernel[(n_vb * n_db, states * hk)](
        q, k, v, dout, dsf, ds0, dk_parts, dv_parts, cu_seqlens, *strides3(q), *strides3(k), *strides3(v),
        *strides3(dout), h, h // hk, nq, nk, d, dv, scale, b * hk * nk, HAS_DS=dstate is not None, CAUSAL=causal,
        BD=bdk, BV=bv, DOT_PRECISION=precision, VARLEN=varlen)
    dk = dk_parts[0] if n_vb == 1 else dk_parts.sum(0)
    dv_ = dv_parts[0] if n_db == 1 else dv_parts.sum(0)
    return dq, dk, dv_, ds0
