// Linear attention on the CPU: chunked causal / non-causal linear attention,
// and looped linear self-attention (the looped linear transformer).
#pragma once

#include <cstdint>

#include "common.h"

namespace tessel {

// Linear attention with the feature maps already applied (in Python):
//   causal:     o_t = scale * q_t S_t,  S_t = S_0 + sum_{s <= t} k_s^T v_s
//   non-causal: o_t = scale * q_t S,    S   = S_0 + sum_s k_s^T v_s
// q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), last dims
// contiguous; q head h reads kv head h / (H / Hkv). Causal needs Nq == Nk.
// States (S_0, the final S and their gradients): (B, Hkv, D, Dv) contiguous.
struct LinearProblem {
  int64_t batch, heads, kv_heads, len_q, len_k, dim, dim_v;
  double scale;
  bool causal;
  Strides4 q, k, v;
  int num_threads;
};

// out: (B, H, Nq, Dv) contiguous. state0 may be null (zero). state_out: the
// final state.
template <typename T>
void linear_forward_cpu(const LinearProblem& p, const T* q, const T* k, const T* v, const T* state0, T* out,
                        T* state_out);

// state_final: the forward's final state (read when non-causal only). dout:
// (B, H, Nq, Dv) with strides dout_strides; dstate (nullable): gradient of the
// final state. dq, dk, dv: contiguous, fully overwritten; dstate0 (nullable):
// gradient of state0.
template <typename T>
void linear_backward_cpu(const LinearProblem& p, const T* q, const T* k, const T* v, const T* state0,
                         const T* state_final, const T* dout, Strides4 dout_strides, const T* dstate, T* dq, T* dk,
                         T* dv, T* dstate0);

// Z: (batch, dim, cols) prompt matrices, dim = d + 1, cols = n + 1.
// P, Q: (weight_loops, heads, dim, dim); weight_loops is 1 (shared by every
// loop) or loops (one pair per loop).
// Loop l: A = Z M Z^T, W = sum_h P_h A Q_h, Z <- Z + inv_n * W Z, where M
// keeps the first key_cols columns (the query column is not a key).
struct LoopedProblem {
  int64_t batch, dim, cols, key_cols, loops, heads, weight_loops;
  double inv_n;
  // Z before loop l is kept for l = 0, every, 2 * every, ... (every = 1 keeps all).
  int64_t checkpoint_every;
  int num_threads;
};

// out: Z after all loops; saved: (ceil(loops / every), batch, dim, cols).
// Returns how many prompts ended with a non-finite value.
template <typename T>
int64_t looped_forward_cpu(const LoopedProblem& p, const T* z, const T* wp, const T* wq, T* out, T* saved);

// dout: gradient of the final Z. dz (batch, dim, cols), dp, dq (weight_loops,
// heads, dim, dim): fully overwritten; dp, dq summed over the batch (in a
// fixed order: deterministic for a given thread count).
template <typename T>
void looped_backward_cpu(const LoopedProblem& p, const T* saved, const T* wp, const T* wq, const T* dout, T* dz,
                         T* dp, T* dq);

}  // namespace tessel
