// The looped linear transformer on the CPU: one linear self-attention layer
// applied `loops` times, fused.
#pragma once

#include <cstdint>

namespace tessel {

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
