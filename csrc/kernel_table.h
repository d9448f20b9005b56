// The C ABI between a SIMD level's module, tessel._C_<level> (which fills a
// KernelTable), and tessel._C_ops (torch's ops, built once without -march,
// which calls through it). Plain data and function pointers only: no C++
// library type crosses the two shared objects, so neither can run code that
// the other compiled for another instruction set.
#pragma once

#include <cstdint>

namespace tessel {

// Bumped whenever a struct below changes: _C_ops refuses a table of another version.
constexpr uint32_t kKernelTableVersion = 3;

// One attention problem, as AttentionProblem (attention.h) holds it.
struct AttentionCall {
  int64_t batch, heads, kv_heads, len_q, len_k, head_dim;
  double scale;
  const int64_t* segments;  // num_segments rows of Segment's six fields
  int64_t num_segments;
  // Element strides (batch, head, row) of operands whose last dim is contiguous: q, k, v; out, dq and the
  // backward's out; dk and dv; dout.
  int64_t q[3], k[3], v[3], o[3], g[3], dout[3];
  int num_threads;
};

// Inputs In, computed in and written as T.
template <typename In, typename T>
struct AttentionKernels {
  // out (B, H, Nq, D) with strides o; lse (B, H, Nq) contiguous.
  void (*forward)(const AttentionCall* call, const In* q, const In* k, const In* v, T* out, T* lse);
  // dlse may be null; dq with strides o, dk and dv with strides g.
  void (*backward)(const AttentionCall* call, const In* q, const In* k, const In* v, const T* out, const In* dout,
                   const T* lse, const T* dlse, T* dq, T* dk, T* dv);
};

// One linear-attention problem, as LinearProblem (linear_attention.h) holds it.
struct LinearCall {
  int64_t batch, heads, kv_heads, len_q, len_k, dim, dim_v;
  double scale;
  int causal;
  const int64_t* bounds;  // packed sequences' cu_seqlens (num_bounds values), or null
  int64_t num_bounds;
  // Element strides (batch, head, row) of operands whose last dim is contiguous: q, k, v; dout.
  int64_t q[3], k[3], v[3], dout[3];
  int num_threads;
};

template <typename T>
struct LinearKernels {
  // out (B, H, Nq, Dv) and state_out (states, Hkv, D, Dv) contiguous; state0 may be null (zero).
  void (*forward)(const LinearCall* call, const T* q, const T* k, const T* v, const T* state0, T* out,
                  T* state_out);
  // state_final: the forward's final state; dstate and dstate0 may be null; dq, dk, dv contiguous.
  void (*backward)(const LinearCall* call, const T* q, const T* k, const T* v, const T* state0,
                   const T* state_final, const T* dout, const T* dstate, T* dq, T* dk, T* dv, T* dstate0);
};

struct KernelTable {
  uint32_t version;
  const char* level;
  AttentionKernels<float, float> attention_f32;
  AttentionKernels<double, double> attention_f64;
  AttentionKernels<uint16_t, float> attention_bf16;  // bfloat16 bits in, float out
  AttentionKernels<uint16_t, float> attention_f16;   // float16 bits in, float out
  LinearKernels<float> linear_f32;
  LinearKernels<double> linear_f64;
};

}  // namespace tessel
