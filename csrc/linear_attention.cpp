// Chunked linear attention (causal and non-causal), forward and backward.
//
// One task per (batch, sequence, kv head), OpenMP over tasks; the q heads of a GQA
// group run inside their kv head's task, so the running state S (D x Dv) is
// built once and stays in cache. A chunk of kChunk tokens costs one masked
// kChunk x kChunk product (intra-chunk) plus products with the state
// (inter-chunk): O(N (kChunk + D) Dv) in all, never the N x N matrix. Every
// product goes through the register-blocked GEMM micro-kernel of common.h,
// on operands packed once per chunk: "T" packs hold a chunk transposed
// ([cols][kChunk], the rows past the chunk zero) and serve as the A operand
// (ATrans) or as B panels; "R" packs hold it row-major padded to whole panels.
//
// Backward: dq in a forward pass over chunks (carrying S^T), dk and dv in a
// reverse pass (carrying dS, the gradient of the state after the chunk).
#include "common.h"
#include "linear_attention.h"

namespace tessel {
namespace {

constexpr int64_t kChunk = 64;
// Keys per step when summing the whole non-causal state: longer GEMM depth,
// fewer passes over the state.
constexpr int64_t kKeyBlock = 256;

template <typename T>
struct Operand {
  const T* base;
  Strides4 st;
  const T* rows(int64_t b, int64_t h, int64_t r0) const { return base + b * st.b + h * st.h + r0 * st.n; }
};

// The rows a task works on: its sequence's queries [q0, q0 + nq) and keys
// [k0, k0 + nk), and the index of its state in (B * sequences, Hkv).
struct TaskRows {
  int64_t q0, nq, k0, nk, state;
};

inline TaskRows task_rows(const LinearProblem& p, int64_t b, int64_t s, int64_t hk) {
  const int64_t state = (b * p.sequences() + s) * p.kv_heads + hk;
  if (p.bounds.empty()) return {0, p.len_q, 0, p.len_k, state};
  const int64_t start = p.bounds[s], len = p.bounds[s + 1] - start;
  return {start, len, start, len, state};
}

// dst[r * ld_dst + c] = factor * src[r * ld_src + c] for r < rows, c < cols.
template <typename T>
void copy_rows(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T factor, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * ld_dst + c] = factor * src[r * ld_src + c];
}

// dst (cols x ld_dst) = src^T for src (rows x ld_src), the padding of dst zero.
template <typename T>
void transpose_padded(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst, int64_t ld_dst) {
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[c * ld_dst + r] = src[r * ld_src + c];
    std::fill(dst + c * ld_dst + rows, dst + (c + 1) * ld_dst, T(0));
  }
}

// Zeroes s[i][j] for j > i (keep_lower) or j < i (keep upper), j < len, and
// multiplies what is kept by factor.
template <typename T>
void mask_chunk(T* s, int64_t len, bool keep_lower, T factor) {
  for (int64_t i = 0; i < len; ++i) {
    T* row = s + i * kChunk;
    for (int64_t j = 0; j < len; ++j) row[j] = (keep_lower ? j <= i : j >= i) ? row[j] * factor : T(0);
  }
}

// The per-thread working set of a task.
template <typename T>
struct Work {
  static constexpr int64_t NR = Simd<T>::panel;
  int64_t dp, dvp;  // D and Dv padded to whole panels
  Buffer<T> qT, kT, vT, oT, qR, kR, vR, oR, s1, s2, acc1, acc2, state, stateT, valuesR;
  Work(int64_t d, int64_t dv)
      : dp(round_up(d, NR)),
        dvp(round_up(dv, NR)),
        qT(d * kChunk), kT(d * kChunk), vT(dv * kChunk), oT(dv * kChunk),
        qR(kChunk * dp), kR(kChunk * dp), vR(kChunk * dvp), oR(kChunk * dvp),
        s1(kChunk * kChunk), s2(kChunk * kChunk),
        acc1(kChunk * std::max(dp, dvp)), acc2(kChunk * std::max(dp, dvp)),
        state(std::max(d * dvp, dv * dp)), stateT(std::max(d * dvp, dv * dp)),
        valuesR(kKeyBlock * dvp) {}
};

// C (m x w) (+)= A B with A transposed-packed ([k][kChunk]) or row-major
// (m x kChunk), B row-major with row stride w (a multiple of the panel).
template <typename T>
void mm_at(int64_t m, int64_t w, int64_t k, const T* a, const T* b, T* c, bool acc) {
  gemm_panels<T, true, kChunk>(m, w / Simd<T>::panel, k, a, b, w, Simd<T>::panel, c, w, acc);
}
template <typename T>
void mm_a(int64_t m, int64_t w, int64_t k, const T* a, const T* b, T* c, bool acc,
          Triangle tri = Triangle::kNone) {
  gemm_panels<T, false, kChunk>(m, w / Simd<T>::panel, k, a, b, w, Simd<T>::panel, c, w, acc, tri);
}
// C (m x w) (+)= A B with A row-major as it lies (rows lda apart).
template <typename T>
void mm_rows(int64_t m, int64_t w, int64_t k, const T* a, int64_t lda, const T* b, T* c, bool acc) {
  gemm_panels<T, false, 0>(m, w / Simd<T>::panel, k, a, b, w, Simd<T>::panel, c, w, acc, Triangle::kNone, lda);
}
// S (m x kChunk) = A B^T with A and B transposed-packed ([k][kChunk]); only
// the triangle `tri` (kOutLower or kOutUpper) is computed.
template <typename T>
void mm_abt(int64_t m, int64_t k, const T* a, const T* b, T* s, Triangle tri) {
  gemm_panels<T, true, kChunk>(m, ceil_div(m, Simd<T>::panel), k, a, b, kChunk, Simd<T>::panel, s, kChunk, false,
                               tri);
}

// Rows [0, len) of x (row stride *ld, `cols` values) as a row-major B operand of `padded` columns: x as it
// lies when cols is that, else a zero-padded copy in buf (and *ld becomes padded).
template <typename T>
const T* rows_padded_to(const T* x, int64_t len, int64_t cols, int64_t* ld, T* buf, int64_t padded) {
  if (cols == padded) return x;
  pack_rows_padded(x, len, cols, *ld, buf, padded);
  *ld = padded;
  return buf;
}

template <typename T>
void load_state(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  if (src)
    pack_rows_padded(src, rows, cols, cols, dst, ld);
  else
    std::fill(dst, dst + rows * ld, T(0));
}

// q, k, v and out start at the task's first rows (t.q0, t.k0).
template <typename T>
void forward_task(const LinearProblem& p, Operand<T> q, Operand<T> k, Operand<T> v, const T* state0, T* out,
                  T* state_out, int64_t b, int64_t hk, const TaskRows& t, Work<T>& w) {
  const int64_t D = p.dim, Dv = p.dim_v, group = p.heads / p.kv_heads;
  const T scale = static_cast<T>(p.scale);
  const int64_t state_off = t.state * D * Dv;
  T* S = w.state.data();
  load_state(state0 ? state0 + state_off : nullptr, D, Dv, S, w.dvp);
  auto emit = [&](int64_t h, int64_t r0, int64_t len) {  // out rows = acc1 rows
    copy_rows(w.acc1.data(), w.dvp, len, Dv, T(1), out + ((b * p.heads + h) * p.len_q + r0) * Dv, Dv);
  };
  auto add_chunk_to_state = [&](int64_t len) { mm_a(D, w.dvp, len, w.kT.data(), w.vR.data(), S, true); };
  auto pack_kv = [&](int64_t r0, int64_t len) {
    pack_transposed_scaled(k.rows(b, hk, r0), len, D, k.st.n, T(1), w.kT.data(), kChunk);
    pack_rows_padded(v.rows(b, hk, r0), len, Dv, v.st.n, w.vR.data(), w.dvp);
  };
  if (!p.causal) {
    // S += k^T v over all keys: k's rows are the transposed A operand as they lie, and v's rows the B
    // operand when Dv is whole panels (else padded copies).
    for (int64_t r0 = 0; r0 < t.nk; r0 += kKeyBlock) {
      const int64_t len = std::min(kKeyBlock, t.nk - r0);
      int64_t ldv = v.st.n;
      const T* vr = rows_padded_to(v.rows(b, hk, r0), len, Dv, &ldv, w.valuesR.data(), w.dvp);
      gemm_panels<T, true, 0>(D, w.dvp / Work<T>::NR, len, k.rows(b, hk, r0), vr, ldv, Work<T>::NR, S, w.dvp, true,
                              Triangle::kNone, k.st.n);
    }
  }
  if (!p.causal && Dv == w.dvp) {
    // o = q (scale S): q read in place, o written in place.
    if (state_out) copy_rows(S, w.dvp, D, Dv, T(1), state_out + state_off, Dv);
    scale_inplace(S, D * w.dvp, scale);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      for (int64_t r0 = 0; r0 < t.nq; r0 += kChunk)  // a chunk of q stays in L1 across the panels
        gemm_panels<T, false, 0>(std::min(kChunk, t.nq - r0), w.dvp / Work<T>::NR, D, q.rows(b, h, r0), S,
                                 w.dvp, Work<T>::NR, out + ((b * p.heads + h) * p.len_q + r0) * Dv, Dv, false,
                                 Triangle::kNone, q.st.n);
    }
    return;
  }
  for (int64_t r0 = 0; r0 < t.nq; r0 += kChunk) {
    const int64_t len = std::min(kChunk, t.nq - r0);
    if (p.causal) pack_kv(r0, len);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      pack_transposed_scaled(q.rows(b, h, r0), len, D, q.st.n, scale, w.qT.data(), kChunk);
      mm_at(len, w.dvp, D, w.qT.data(), S, w.acc1.data(), false);  // inter-chunk: q S
      if (p.causal) {
        mm_abt(len, D, w.qT.data(), w.kT.data(), w.s1.data(), Triangle::kOutLower);
        mask_chunk(w.s1.data(), len, true, T(1));
        mm_a(len, w.dvp, len, w.s1.data(), w.vR.data(), w.acc1.data(), true, Triangle::kALower);
      }
      emit(h, r0, len);
    }
    if (p.causal) add_chunk_to_state(len);
  }
  if (state_out) copy_rows(S, w.dvp, D, Dv, T(1), state_out + state_off, Dv);
}

// The backward of one (batch, sequence, kv head): packing helpers and the
// passes over chunks, as named steps that share the task's operands and work
// buffers. Operands and gradients start at the task's first rows.
template <typename T>
struct BackwardTask {
  const LinearProblem& p;
  Operand<T> q, k, v, dout;
  T *dq, *dk, *dv;
  int64_t b, hk;
  const TaskRows& t;
  Work<T>& w;
  int64_t D = p.dim, Dv = p.dim_v, group = p.heads / p.kv_heads, dp = w.dp, dvp = w.dvp;
  T scale = static_cast<T>(p.scale);
  int64_t state_off = t.state * D * Dv;
  T* ST = w.stateT.data();  // S^T (Dv x Dp), the state dq reads
  T* dS = w.state.data();   // dS (D x Dvp), the gradient of the state after a chunk

  void pack_k(int64_t r0, int64_t len) {
    pack_transposed_scaled(k.rows(b, hk, r0), len, D, k.st.n, T(1), w.kT.data(), kChunk);
    pack_rows_padded(k.rows(b, hk, r0), len, D, k.st.n, w.kR.data(), dp);
  }
  void pack_v(int64_t r0, int64_t len) {
    pack_transposed_scaled(v.rows(b, hk, r0), len, Dv, v.st.n, T(1), w.vT.data(), kChunk);
    pack_rows_padded(v.rows(b, hk, r0), len, Dv, v.st.n, w.vR.data(), dvp);
  }
  void pack_q(int64_t h, int64_t r0, int64_t len) {
    pack_transposed_scaled(q.rows(b, h, r0), len, D, q.st.n, scale, w.qT.data(), kChunk);
    pack_rows_padded(q.rows(b, h, r0), len, D, q.st.n, w.qR.data(), dp);
  }
  void pack_do(int64_t h, int64_t r0, int64_t len) {
    pack_transposed_scaled(dout.rows(b, h, r0), len, Dv, dout.st.n, T(1), w.oT.data(), kChunk);
    pack_rows_padded(dout.rows(b, h, r0), len, Dv, dout.st.n, w.oR.data(), dvp);
  }
  void load_state_t(const T* src) {
    if (src)
      transpose_padded(src + state_off, D, Dv, Dv, ST, dp);
    else
      std::fill(ST, ST + Dv * dp, T(0));
  }
  void emit_dq(int64_t h, int64_t r0, int64_t len) {
    copy_rows(w.acc1.data(), dp, len, D, scale, dq + ((b * p.heads + h) * p.len_q + r0) * D, D);
  }
  void add_q_do_to_ds(int64_t len) { mm_a(D, dvp, len, w.qT.data(), w.oR.data(), dS, true); }
  void inter_dk_dv(int64_t len) {  // dk = v dS^T, dv = k dS
    transpose_padded(dS, D, Dv, dvp, ST, dp);
    mm_at(len, dp, Dv, w.vT.data(), ST, w.acc1.data(), false);
    mm_at(len, dvp, D, w.kT.data(), dS, w.acc2.data(), false);
  }
  void emit_dk_dv(int64_t r0, int64_t len) {
    copy_rows(w.acc1.data(), dp, len, D, T(1), dk + ((b * p.kv_heads + hk) * p.len_k + r0) * D, D);
    copy_rows(w.acc2.data(), dvp, len, Dv, T(1), dv + ((b * p.kv_heads + hk) * p.len_k + r0) * Dv, Dv);
  }

  // Non-causal, S the forward's final state: dq = dO (scale S^T) and dS += qs^T dO
  // over all queries, then dk = v dS^T, dv = k dS over all keys. dO, k and v
  // are read as they lie (row-major A operands); only qs is packed.
  void non_causal(const T* state_final) {
    load_state_t(state_final);
    scale_inplace(ST, Dv * dp, scale);
    for (int64_t r0 = 0; r0 < t.nq; r0 += kChunk) {
      const int64_t len = std::min(kChunk, t.nq - r0);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const T* d_o = dout.rows(b, h, r0);
        mm_rows(len, dp, Dv, d_o, dout.st.n, ST, w.acc1.data(), false);
        copy_rows(w.acc1.data(), dp, len, D, T(1), dq + ((b * p.heads + h) * p.len_q + r0) * D, D);
        pack_transposed_scaled(q.rows(b, h, r0), len, D, q.st.n, scale, w.qT.data(), kChunk);
        int64_t ldo = dout.st.n;
        const T* o_rows = rows_padded_to(d_o, len, Dv, &ldo, w.oR.data(), dvp);
        gemm_panels<T, false, kChunk>(D, dvp / Simd<T>::panel, len, w.qT.data(), o_rows, ldo, Simd<T>::panel, dS,
                                      dvp, true);
      }
    }
    transpose_padded(dS, D, Dv, dvp, ST, dp);
    for (int64_t r0 = 0; r0 < t.nk; r0 += kChunk) {
      const int64_t len = std::min(kChunk, t.nk - r0);
      mm_rows(len, dp, Dv, v.rows(b, hk, r0), v.st.n, ST, w.acc1.data(), false);   // dk = v dS^T
      mm_rows(len, dvp, D, k.rows(b, hk, r0), k.st.n, dS, w.acc2.data(), false);  // dv = k dS
      emit_dk_dv(r0, len);
    }
  }

  // Causal, forward over chunks: dq = scale (dO S_before^T + tril(dO v^T) k).
  void causal_dq(const T* state0) {
    load_state_t(state0);
    for (int64_t r0 = 0; r0 < t.nq; r0 += kChunk) {
      const int64_t len = std::min(kChunk, t.nq - r0);
      pack_k(r0, len);
      pack_v(r0, len);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        pack_do(h, r0, len);
        mm_at(len, dp, Dv, w.oT.data(), ST, w.acc1.data(), false);
        mm_abt(len, Dv, w.oT.data(), w.vT.data(), w.s1.data(), Triangle::kOutLower);
        mask_chunk(w.s1.data(), len, true, T(1));
        mm_a(len, dp, len, w.s1.data(), w.kR.data(), w.acc1.data(), true, Triangle::kALower);
        emit_dq(h, r0, len);
      }
      mm_a(Dv, dp, len, w.vT.data(), w.kR.data(), ST, true);  // S^T += v^T k
    }
  }

  // Causal, reverse over chunks: dv = triu(k qs^T) dO + k dS, dk = scale
  // triu(v dO^T) q + v dS^T, then dS += qs^T dO.
  void causal_dk_dv() {
    for (int64_t c = ceil_div(t.nk, kChunk) - 1; c >= 0; --c) {
      const int64_t r0 = c * kChunk, len = std::min(kChunk, t.nk - r0);
      pack_k(r0, len);
      pack_v(r0, len);
      inter_dk_dv(len);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        pack_q(h, r0, len);
        pack_do(h, r0, len);
        mm_abt(len, D, w.kT.data(), w.qT.data(), w.s1.data(), Triangle::kOutUpper);
        mask_chunk(w.s1.data(), len, false, T(1));
        mm_a(len, dvp, len, w.s1.data(), w.oR.data(), w.acc2.data(), true, Triangle::kAUpper);
        mm_abt(len, Dv, w.vT.data(), w.oT.data(), w.s2.data(), Triangle::kOutUpper);
        mask_chunk(w.s2.data(), len, false, scale);
        mm_a(len, dp, len, w.s2.data(), w.qR.data(), w.acc1.data(), true, Triangle::kAUpper);
        add_q_do_to_ds(len);
      }
      emit_dk_dv(r0, len);
    }
  }
};

template <typename T>
void backward_task(const LinearProblem& p, Operand<T> q, Operand<T> k, Operand<T> v, const T* state0,
                   const T* state_final, Operand<T> dout, const T* dstate, T* dq, T* dk, T* dv, T* dstate0,
                   int64_t b, int64_t hk, const TaskRows& t, Work<T>& w) {
  BackwardTask<T> task{p, q, k, v, dout, dq, dk, dv, b, hk, t, w};
  load_state(dstate ? dstate + task.state_off : nullptr, task.D, task.Dv, task.dS, task.dvp);
  if (p.causal) {
    task.causal_dq(state0);
    task.causal_dk_dv();
  } else {
    task.non_causal(state_final);
  }
  if (dstate0) copy_rows(task.dS, task.dvp, task.D, task.Dv, T(1), dstate0 + task.state_off, task.Dv);
}

}  // namespace

template <typename T>
void linear_forward_cpu(const LinearProblem& p, const T* q, const T* k, const T* v, const T* state0, T* out,
                        T* state_out) {
  parallel_region(p.num_threads, [&] {
    Work<T> w(p.dim, p.dim_v);
#pragma omp for collapse(3) schedule(dynamic)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t s = 0; s < p.sequences(); ++s)
        for (int64_t hk = 0; hk < p.kv_heads; ++hk) {
          const TaskRows t = task_rows(p, b, s, hk);
          forward_task<T>(p, {q + t.q0 * p.q.n, p.q}, {k + t.k0 * p.k.n, p.k}, {v + t.k0 * p.v.n, p.v}, state0,
                          out + t.q0 * p.dim_v, state_out, b, hk, t, w);
        }
  });
}

template <typename T>
void linear_backward_cpu(const LinearProblem& p, const T* q, const T* k, const T* v, const T* state0,
                         const T* state_final, const T* dout, Strides4 dout_strides, const T* dstate, T* dq, T* dk,
                         T* dv, T* dstate0) {
  parallel_region(p.num_threads, [&] {
    Work<T> w(p.dim, p.dim_v);
#pragma omp for collapse(3) schedule(dynamic)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t s = 0; s < p.sequences(); ++s)
        for (int64_t hk = 0; hk < p.kv_heads; ++hk) {
          const TaskRows t = task_rows(p, b, s, hk);
          backward_task<T>(p, {q + t.q0 * p.q.n, p.q}, {k + t.k0 * p.k.n, p.k}, {v + t.k0 * p.v.n, p.v}, state0,
                           state_final, {dout + t.q0 * dout_strides.n, dout_strides}, dstate, dq + t.q0 * p.dim,
                           dk + t.k0 * p.dim, dv + t.k0 * p.dim_v, dstate0, b, hk, t, w);
        }
  });
}

template void linear_forward_cpu<float>(const LinearProblem&, const float*, const float*, const float*, const float*,
                                        float*, float*);
template void linear_forward_cpu<double>(const LinearProblem&, const double*, const double*, const double*,
                                         const double*, double*, double*);
template void linear_backward_cpu<float>(const LinearProblem&, const float*, const float*, const float*,
                                         const float*, const float*, const float*, Strides4, const float*, float*,
                                         float*, float*, float*);
template void linear_backward_cpu<double>(const LinearProblem&, const double*, const double*, const double*,
                                          const double*, const double*, const double*, Strides4, const double*,
                                          double*, double*, double*, double*);

}  // namespace tessel
