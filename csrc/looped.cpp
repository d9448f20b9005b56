// Looped linear self-attention, fused over all loops.
//
// A prompt is small (dim = d + 1 ~ 6..21 rows, n + 1 ~ 20..40 columns): SIMD
// inside one prompt would be all tails and reduction chains. Instead a task
// holds W prompts side by side, one per vector lane ("lane layout": element
// e of the group is a vector of W prompts' element e), so every step of the
// per-prompt algorithm is one full-width vector operation. OpenMP spreads the
// groups over threads. By associativity a loop costs O(n dim^2 + heads dim^3)
// and never forms the (n+1) x (n+1) attention matrix.
//
// Backward walks the loops in reverse. Z before each loop comes from the
// saved copies; with checkpoints every k loops, the k states of a segment are
// recomputed from its checkpoint first. dP and dQ are summed per lane and
// thread, then over both in a fixed order.
#include "looped.h"

#include "common.h"

namespace tessel {
namespace {

template <typename T>
using Vec = typename Simd<T>::vec;

// Group element e of prompts [b0, b0 + count) <-> lane layout (lanes past count are zero).
template <typename T>
void gather(const T* x, int64_t b0, int64_t count, int64_t size, Vec<T>* out) {
  for (int64_t e = 0; e < size; ++e) {
    Vec<T> v{};
    for (int64_t l = 0; l < count; ++l) v[l] = x[(b0 + l) * size + e];
    out[e] = v;
  }
}

template <typename T>
void scatter(const Vec<T>* x, int64_t b0, int64_t count, int64_t size, T* out) {
  for (int64_t e = 0; e < size; ++e)
    for (int64_t l = 0; l < count; ++l) out[(b0 + l) * size + e] = x[e][l];
}

// c[i][j] (+)= sum_k a[i * a_row + k * a_col] * b[k * b_row + j * b_col] for
// i < m, j < n, k < kc, where a and b hold lane vectors or scalars shared by
// every lane. Four outputs at a time stay in registers across the k loop.
template <typename V, typename TA, typename TB>
void lane_matmul(const TA* a, int64_t a_row, int64_t a_col, const TB* b, int64_t b_row, int64_t b_col, V* c,
                 int64_t ldc, int64_t m, int64_t n, int64_t kc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    V* ci = c + i * ldc;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      V acc0 = accumulate ? ci[j] : V{}, acc1 = accumulate ? ci[j + 1] : V{};
      V acc2 = accumulate ? ci[j + 2] : V{}, acc3 = accumulate ? ci[j + 3] : V{};
      for (int64_t k = 0; k < kc; ++k) {
        const auto aik = a[i * a_row + k * a_col];
        const TB* bk = b + k * b_row + j * b_col;
        acc0 += aik * bk[0];
        acc1 += aik * bk[b_col];
        acc2 += aik * bk[2 * b_col];
        acc3 += aik * bk[3 * b_col];
      }
      ci[j] = acc0;
      ci[j + 1] = acc1;
      ci[j + 2] = acc2;
      ci[j + 3] = acc3;
    }
    for (; j < n; ++j) {
      V acc = accumulate ? ci[j] : V{};
      for (int64_t k = 0; k < kc; ++k) acc += a[i * a_row + k * a_col] * b[k * b_row + j * b_col];
      ci[j] = acc;
    }
  }
}

template <typename T>
const T* loop_weights(const LoopedProblem& p, const T* w, int64_t loop) {
  return w + (p.weight_loops == 1 ? 0 : loop) * p.heads * p.dim * p.dim;
}

template <typename T>
struct LaneScratch {
  Buffer<Vec<T>> a, w, t, t2, dw, da, g, g_prev, segment, dp, dq;
};

// A = Z M Z^T and W = sum_h P_h A Q_h for a group's Z (all in lane layout;
// P, Q are the same for every lane).
template <typename T>
void attention_matrices(const LoopedProblem& p, const Vec<T>* z, const T* wp, const T* wq, Vec<T>* a, Vec<T>* w,
                        Vec<T>* t) {
  const int64_t D = p.dim, C = p.cols;
  for (int64_t i = 0; i < D; ++i)  // row i of A up to the diagonal: z_i . z_j over the key columns
    lane_matmul(z + i * C, 0, 1, z, 1, C, a + i * D, D, 1, i + 1, p.key_cols, false);
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = i + 1; j < D; ++j) a[i * D + j] = a[j * D + i];
  for (int64_t h = 0; h < p.heads; ++h) {
    lane_matmul(a, D, 1, wq + h * D * D, D, 1, t, D, D, D, D, false);     // t = A Q_h
    lane_matmul(wp + h * D * D, D, 1, t, D, 1, w, D, D, D, D, h > 0);  // w (+)= P_h t
  }
}

// next = z + inv_n * W z
template <typename T>
void loop_step(const LoopedProblem& p, const Vec<T>* z, const T* wp, const T* wq, Vec<T>* next, LaneScratch<T>& ws) {
  const int64_t D = p.dim, C = p.cols;
  Vec<T>* a = ws.a.grow(D * D);
  Vec<T>* w = ws.w.grow(D * D);
  Vec<T>* t = ws.t.grow(D * D);
  attention_matrices(p, z, wp, wq, a, w, t);
  const T inv_n = T(p.inv_n);
  for (int64_t i = 0; i < D * D; ++i) w[i] *= inv_n;
  std::copy(z, z + D * C, next);
  lane_matmul(w, D, 1, z, C, 1, next, C, D, C, D, true);
}

// One loop backward for a group of prompts (lane layout): z is Z before loop
// l, g the gradient of Z after it; dP_h, dQ_h accumulate into dp_acc, dq_acc
// (this loop's slice), and g_prev gets the gradient of Z before the loop.
template <typename T>
void loop_backward(const LoopedProblem& p, const Vec<T>* z, const T* pl, const T* ql, const Vec<T>* g,
                   Vec<T>* g_prev, Vec<T>* dp_acc, Vec<T>* dq_acc, LaneScratch<T>& ws) {
  const int64_t D = p.dim, C = p.cols, DD = D * D;
  const T inv_n = T(p.inv_n);
  Vec<T>* a = ws.a.grow(DD);
  Vec<T>* w = ws.w.grow(DD);
  Vec<T>* t = ws.t.grow(DD);
  Vec<T>* t2 = ws.t2.grow(DD);
  Vec<T>* dw = ws.dw.grow(DD);
  Vec<T>* da = ws.da.grow(DD);
  attention_matrices(p, z, pl, ql, a, w, t);
  // dW = inv_n * G Z^T
  lane_matmul(g, C, 1, z, 1, C, dw, D, D, D, C, false);
  for (int64_t i = 0; i < DD; ++i) dw[i] *= inv_n;
  for (int64_t h = 0; h < p.heads; ++h) {
    const T* ph = pl + h * DD;
    const T* qh = ql + h * DD;
    lane_matmul(dw, D, 1, qh, 1, D, t, D, D, D, D, false);            // t = dW Q_h^T
    lane_matmul(t, D, 1, a, D, 1, dp_acc + h * DD, D, D, D, D, true);   // dP_h += t A
    lane_matmul(ph, 1, D, dw, D, 1, t2, D, D, D, D, false);           // t2 = P_h^T dW
    lane_matmul(a, D, 1, t2, D, 1, dq_acc + h * DD, D, D, D, D, true);  // dQ_h += A t2
    lane_matmul(t2, D, 1, qh, 1, D, da, D, D, D, D, h > 0);           // dA (+)= t2 Q_h^T
  }
  // G_prev = G + inv_n W^T G + (dA + dA^T) Z M
  for (int64_t i = 0; i < DD; ++i) w[i] *= inv_n;
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = 0; j < D; ++j) t[i * D + j] = da[i * D + j] + da[j * D + i];
  std::copy(g, g + D * C, g_prev);
  lane_matmul(w, 1, D, g, C, 1, g_prev, C, D, C, D, true);
  lane_matmul(t, D, 1, z, C, 1, g_prev, C, D, p.key_cols, D, true);
}

// out[i] = the sum of acc[i] over its lanes, in lane order.
template <typename T>
void sum_lanes(const Vec<T>* acc, int64_t size, T* out) {
  for (int64_t i = 0; i < size; ++i) {
    T total = 0;
    for (int l = 0; l < Simd<T>::width; ++l) total += acc[i][l];
    out[i] = total;
  }
}

}  // namespace

template <typename T>
int64_t looped_forward_cpu(const LoopedProblem& p, const T* z, const T* wp, const T* wq, T* out, T* saved) {
  constexpr int W = Simd<T>::width;
  const int64_t zsize = p.dim * p.cols, groups = ceil_div(p.batch, W);
  int64_t nonfinite = 0;
  parallel_region(p.num_threads, [&] {
    LaneScratch<T> ws;
    int64_t thread_nonfinite = 0;  // summed once per thread
    Buffer<Vec<T>> buf(2 * zsize);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b0 = g * W, count = std::min<int64_t>(W, p.batch - b0);
      Vec<T>* cur = buf.data();
      Vec<T>* next = buf.data() + zsize;
      gather(z, b0, count, zsize, cur);
      for (int64_t l = 0; l < p.loops; ++l) {
        if (l % p.checkpoint_every == 0)
          scatter(cur, b0, count, zsize, saved + (l / p.checkpoint_every) * p.batch * zsize);
        loop_step(p, cur, loop_weights(p, wp, l), loop_weights(p, wq, l), next, ws);
        std::swap(cur, next);
      }
      scatter(cur, b0, count, zsize, out);
      for (int64_t l = 0; l < count; ++l)
        for (int64_t e = 0; e < zsize; ++e)
          if (!std::isfinite(cur[e][l])) {
            ++thread_nonfinite;
            break;
          }
    }
#pragma omp atomic
    nonfinite += thread_nonfinite;
  });
  return nonfinite;
}

template <typename T>
void looped_backward_cpu(const LoopedProblem& p, const T* saved, const T* wp, const T* wq, const T* dout, T* dz,
                         T* dp, T* dq) {
  constexpr int W = Simd<T>::width;
  const int64_t DD = p.dim * p.dim, zsize = p.dim * p.cols, every = p.checkpoint_every;
  const int64_t wsize = p.weight_loops * p.heads * DD, groups = ceil_div(p.batch, W);
  std::vector<T> dp_threads(p.num_threads * wsize, T(0)), dq_threads(p.num_threads * wsize, T(0));
  parallel_region(p.num_threads, [&] {
    LaneScratch<T> ws;
    Vec<T>* g = ws.g.grow(zsize);
    Vec<T>* g_prev = ws.g_prev.grow(zsize);
    Vec<T>* seg = ws.segment.grow(every * zsize);
    Vec<T>* dp_acc = ws.dp.grow(wsize);
    Vec<T>* dq_acc = ws.dq.grow(wsize);
    std::fill(dp_acc, dp_acc + wsize, Vec<T>{});
    std::fill(dq_acc, dq_acc + wsize, Vec<T>{});
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const int64_t b0 = grp * W, count = std::min<int64_t>(W, p.batch - b0);
      gather(dout, b0, count, zsize, g);
      for (int64_t first = (p.loops - 1) / every * every; first >= 0; first -= every) {
        // Z before loops first .. last of this segment, recomputed from its checkpoint.
        const int64_t last = std::min(first + every, p.loops) - 1;
        gather(saved + (first / every) * p.batch * zsize, b0, count, zsize, seg);
        for (int64_t l = first; l < last; ++l)
          loop_step(p, seg + (l - first) * zsize, loop_weights(p, wp, l), loop_weights(p, wq, l),
                    seg + (l - first + 1) * zsize, ws);
        for (int64_t l = last; l >= first; --l) {
          const int64_t woff = (p.weight_loops == 1 ? 0 : l) * p.heads * DD;
          loop_backward(p, seg + (l - first) * zsize, loop_weights(p, wp, l), loop_weights(p, wq, l), g, g_prev,
                        dp_acc + woff, dq_acc + woff, ws);
          std::swap(g, g_prev);
        }
      }
      scatter(g, b0, count, zsize, dz);
    }
    const int tid = omp_get_thread_num();
    sum_lanes(dp_acc, wsize, dp_threads.data() + tid * wsize);
    sum_lanes(dq_acc, wsize, dq_threads.data() + tid * wsize);
  });
  for (int64_t i = 0; i < wsize; ++i) {  // over threads in a fixed order: deterministic
    T sp = 0, sq = 0;
    for (int t = 0; t < p.num_threads; ++t) {
      sp += dp_threads[t * wsize + i];
      sq += dq_threads[t * wsize + i];
    }
    dp[i] = sp;
    dq[i] = sq;
  }
}

template int64_t looped_forward_cpu<float>(const LoopedProblem&, const float*, const float*, const float*, float*,
                                           float*);
template int64_t looped_forward_cpu<double>(const LoopedProblem&, const double*, const double*, const double*,
                                            double*, double*);
template void looped_backward_cpu<float>(const LoopedProblem&, const float*, const float*, const float*,
                                         const float*, float*, float*, float*);
template void looped_backward_cpu<double>(const LoopedProblem&, const double*, const double*, const double*,
                                          const double*, double*, double*, double*);

}  // namespace tessel
