// Looped linear self-attention, fused over all loops.
//
// Every prompt is small (dim = d + 1 ~ 6..21 rows, n + 1 ~ 20..40 columns), so
// one task runs all loops of one prompt with Z, A and W in L1; OpenMP spreads
// prompts over threads. By associativity a loop costs O(n dim^2 + heads
// dim^3) and never forms the (n+1) x (n+1) attention matrix.
//
// Backward walks the loops in reverse. Z before each loop comes from the
// saved copies; with checkpoints every k loops, the k states of a segment are
// recomputed from its checkpoint first. dP and dQ are summed per thread, then
// over threads in a fixed order.
#include "linear_attention.h"

#include "common.h"

namespace tessel {
namespace {

// Small dense helpers, row-major. Sizes are tiny: plain loops that GCC vectorises.
template <typename T>
void matmul(const T* a, const T* b, T* c, int64_t m, int64_t k, int64_t n, bool accumulate) {
  if (!accumulate) std::fill(c, c + m * n, T(0));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p) {
      const T aip = a[i * k + p];
      for (int64_t j = 0; j < n; ++j) c[i * n + j] += aip * b[p * n + j];
    }
}

// c (+)= a^T b, a: (k, m), b: (k, n)
template <typename T>
void matmul_tn(const T* a, const T* b, T* c, int64_t m, int64_t k, int64_t n, bool accumulate) {
  if (!accumulate) std::fill(c, c + m * n, T(0));
  for (int64_t p = 0; p < k; ++p)
    for (int64_t i = 0; i < m; ++i) {
      const T api = a[p * m + i];
      for (int64_t j = 0; j < n; ++j) c[i * n + j] += api * b[p * n + j];
    }
}

// c (+)= a b^T over the first kc columns, a: (m, ld), b: (n, ld)
template <typename T>
void matmul_nt(const T* a, const T* b, T* c, int64_t m, int64_t n, int64_t kc, int64_t ld, bool accumulate) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      T s = 0;
      for (int64_t p = 0; p < kc; ++p) s += a[i * ld + p] * b[j * ld + p];
      c[i * n + j] = accumulate ? c[i * n + j] + s : s;
    }
}

template <typename T>
struct LoopScratch {
  std::vector<T> a, w, t, dw, da, g, segment;
};

template <typename T>
const T* loop_weights(const LoopedProblem& p, const T* w, int64_t loop) {
  return w + (p.weight_loops == 1 ? 0 : loop) * p.heads * p.dim * p.dim;
}

// A = Z M Z^T and W = sum_h P_h A Q_h for one prompt's Z.
template <typename T>
void attention_matrices(const LoopedProblem& p, const T* z, const T* wp, const T* wq, T* a, T* w, T* t) {
  const int64_t D = p.dim, DD = D * D;
  matmul_nt(z, z, a, D, D, p.key_cols, p.cols, false);
  for (int64_t h = 0; h < p.heads; ++h) {
    matmul(a, wq + h * DD, t, D, D, D, false);  // A Q_h
    matmul(wp + h * DD, t, w, D, D, D, h > 0);   // P_h A Q_h
  }
}

// next = z + inv_n * W z
template <typename T>
void loop_step(const LoopedProblem& p, const T* z, const T* wp, const T* wq, T* next, LoopScratch<T>& ws) {
  const int64_t D = p.dim, C = p.cols;
  T* a = scratch(ws.a, D * D);
  T* w = scratch(ws.w, D * D);
  T* t = scratch(ws.t, D * D);
  attention_matrices(p, z, wp, wq, a, w, t);
  const T inv_n = T(p.inv_n);
  for (int64_t i = 0; i < D * D; ++i) w[i] *= inv_n;
  std::copy(z, z + D * C, next);
  matmul(w, z, next, D, D, C, true);
}

}  // namespace

template <typename T>
int64_t looped_forward_cpu(const LoopedProblem& p, const T* z, const T* wp, const T* wq, T* out, T* saved) {
  const int64_t zsize = p.dim * p.cols;
  int64_t nonfinite = 0;
#pragma omp parallel num_threads(p.num_threads) reduction(+ : nonfinite)
  {
    LoopScratch<T> ws;
    std::vector<T> buf(2 * zsize);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.batch; ++b) {
      const T* cur = z + b * zsize;
      T* bufs[2] = {buf.data(), buf.data() + zsize};
      for (int64_t l = 0; l < p.loops; ++l) {
        if (l % p.checkpoint_every == 0)
          std::copy(cur, cur + zsize, saved + ((l / p.checkpoint_every) * p.batch + b) * zsize);
        T* next = l + 1 == p.loops ? out + b * zsize : bufs[l % 2];
        loop_step(p, cur, loop_weights(p, wp, l), loop_weights(p, wq, l), next, ws);
        cur = next;
      }
      for (int64_t i = 0; i < zsize; ++i)
        if (!std::isfinite(cur[i])) {
          ++nonfinite;
          break;
        }
    }
  }
  return nonfinite;
}

template <typename T>
void looped_backward_cpu(const LoopedProblem& p, const T* saved, const T* wp, const T* wq, const T* dout, T* dz,
                         T* dp, T* dq) {
  const int64_t D = p.dim, C = p.cols, DD = D * D, zsize = D * C, every = p.checkpoint_every;
  const int64_t wsize = p.weight_loops * p.heads * DD;
  const T inv_n = T(p.inv_n);
  std::vector<T> dp_threads(p.num_threads * wsize, T(0)), dq_threads(p.num_threads * wsize, T(0));
#pragma omp parallel num_threads(p.num_threads)
  {
    const int tid = omp_get_thread_num();
    T* dp_acc = dp_threads.data() + tid * wsize;
    T* dq_acc = dq_threads.data() + tid * wsize;
    LoopScratch<T> ws;
    T* a = scratch(ws.a, DD);
    T* w = scratch(ws.w, DD);
    T* t = scratch(ws.t, DD);
    T* dw = scratch(ws.dw, DD);
    T* da = scratch(ws.da, DD);
    T* seg = scratch(ws.segment, every * zsize);
    std::vector<T> g(zsize), g_prev(zsize);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.batch; ++b) {
      std::copy(dout + b * zsize, dout + (b + 1) * zsize, g.data());
      for (int64_t first = (p.loops - 1) / every * every; first >= 0; first -= every) {
        // Z before loops first .. last of this segment.
        const int64_t last = std::min(first + every, p.loops) - 1;
        std::copy(saved + ((first / every) * p.batch + b) * zsize, saved + ((first / every) * p.batch + b + 1) * zsize,
                  seg);
        for (int64_t l = first; l < last; ++l)
          loop_step(p, seg + (l - first) * zsize, loop_weights(p, wp, l), loop_weights(p, wq, l),
                    seg + (l - first + 1) * zsize, ws);
        for (int64_t l = last; l >= first; --l) {
          const T* zl = seg + (l - first) * zsize;
          const T* pl = loop_weights(p, wp, l);
          const T* ql = loop_weights(p, wq, l);
          const int64_t woff = (p.weight_loops == 1 ? 0 : l) * p.heads * DD;
          attention_matrices(p, zl, pl, ql, a, w, t);
          // dW = inv_n * G Z^T
          matmul_nt(g.data(), zl, dw, D, D, C, C, false);
          for (int64_t i = 0; i < DD; ++i) dw[i] *= inv_n;
          std::fill(da, da + DD, T(0));
          for (int64_t h = 0; h < p.heads; ++h) {
            const T* ph = pl + h * DD;
            const T* qh = ql + h * DD;
            matmul_nt(dw, qh, t, D, D, D, D, false);            // dW Q_h^T
            matmul(t, a, dp_acc + woff + h * DD, D, D, D, true);  // dP_h += dW Q_h^T A
            matmul_tn(ph, dw, t, D, D, D, false);               // P_h^T dW
            matmul(a, t, dq_acc + woff + h * DD, D, D, D, true);  // dQ_h += A P_h^T dW
            matmul_nt(t, qh, da, D, D, D, D, true);             // dA += P_h^T dW Q_h^T
          }
          // G_prev = G + inv_n W^T G + (dA + dA^T) Z M
          std::copy(g.begin(), g.end(), g_prev.begin());
          for (int64_t i = 0; i < DD; ++i) w[i] *= inv_n;
          matmul_tn(w, g.data(), g_prev.data(), D, D, C, true);
          for (int64_t i = 0; i < D; ++i)
            for (int64_t j = 0; j < D; ++j) t[i * D + j] = da[i * D + j] + da[j * D + i];
          for (int64_t i = 0; i < D; ++i)
            for (int64_t k = 0; k < D; ++k) {
              const T tik = t[i * D + k];
              for (int64_t c = 0; c < p.key_cols; ++c) g_prev[i * C + c] += tik * zl[k * C + c];
            }
          g.swap(g_prev);
        }
      }
      std::copy(g.begin(), g.end(), dz + b * zsize);
    }
  }
  for (int64_t i = 0; i < wsize; ++i) {
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
