// Flash attention (FlashAttention-2 algorithm) on the CPU, forward and backward.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace tessel {

// A segment is one attention problem inside the sequence axis: queries
// [q_start, q_start + len_q) attend to keys [k_start, k_start + len_k) only.
// Local query i may attend to local key j iff i + band_lo <= j <= i + band_hi.
// Causal, sliding windows and torch's top-left causal all reduce to this
// band; an unbounded side is any value beyond +-(len_q + len_k). A dense
// batch is one segment spanning both axes; packed variable-length sequences
// (FlashAttention-2's varlen layout, batch 1) are one segment per sequence.
struct Segment {
  int64_t q_start, len_q, k_start, len_k, band_lo, band_hi;
};

struct AttentionProblem {
  int64_t batch, heads, kv_heads, len_q, len_k, head_dim;  // len_q, len_k: whole axes
  double scale;
  std::vector<Segment> segments;  // disjoint, in order, covering both axes
  Strides4 q, k, v;
  int num_threads;
  Strides4 o{}, g{};  // out and dq (B, H, Nq, D); dk and dv (B, Hkv, Nk, D)
};

// Inputs In (float, double, Bf16, Half) are computed in acc_t<In> (common.h), the
// type of every output.
// out: (B, H, Nq, D) with strides p.o; lse: (B, H, Nq) contiguous, natural
// log, -inf for rows without keys (their out rows are zero).
template <typename In>
void attention_forward_cpu(const AttentionProblem& p, const In* q, const In* k, const In* v, acc_t<In>* out,
                           acc_t<In>* lse);

// dout, out: (B, H, Nq, D) with strides `dout_strides` and p.o. dlse
// (nullable): gradient flowing into lse. dq: (B, H, Nq, D) with strides p.o,
// dk, dv: (B, Hkv, Nk, D) with strides p.g, fully overwritten.
template <typename In, typename T = acc_t<In>>
void attention_backward_cpu(const AttentionProblem& p, const In* q, const In* k, const In* v, const T* out,
                            const In* dout, Strides4 dout_strides, const T* lse, const T* dlse, T* dq, T* dk,
                            T* dv);

}  // namespace tessel
