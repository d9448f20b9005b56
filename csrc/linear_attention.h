// Linear attention on the CPU: chunked, causal and non-causal.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace tessel {

// Linear attention with the feature maps already applied (in Python):
//   causal:     o_t = scale * q_t S_t,  S_t = S_0 + sum_{s <= t} k_s^T v_s
//   non-causal: o_t = scale * q_t S,    S   = S_0 + sum_s k_s^T v_s
// q: (B, H, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), last dims
// contiguous; q head h reads kv head h / (H / Hkv). Causal needs Nq == Nk.
// Packed sequences (`bounds`, flash-linear-attention's cu_seqlens: B = 1,
// Nq == Nk): sequence s is rows [bounds[s], bounds[s + 1]) with a state of
// its own. States (S_0, the final S and their gradients): (B * sequences,
// Hkv, D, Dv) contiguous.
struct LinearProblem {
  int64_t batch, heads, kv_heads, len_q, len_k, dim, dim_v;
  double scale;
  bool causal;
  Strides4 q, k, v;
  int num_threads;
  std::vector<int64_t> bounds;  // empty: one sequence per batch element

  int64_t sequences() const { return bounds.empty() ? 1 : static_cast<int64_t>(bounds.size()) - 1; }
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

}  // namespace tessel
