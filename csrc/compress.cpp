// PowerSGD passes over a bucket of gradient matrices, memory-bound: each pass
// reads every gradient (and error) element once, forming M = grad + error on
// the fly, and all matrices of a bucket go in one call. OpenMP spreads
// (matrix, block) tasks; every output element is written by one task in a
// fixed order, so results do not depend on the thread count.
#include "compress.h"

#include <cmath>
#include <limits>
#include <type_traits>

#include "common.h"

namespace tessel {
namespace {

template <typename T>
using S = Simd<T>;

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  constexpr int W = S<T>::width;
  typename S<T>::vec acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 += S<T>::load(a + i) * S<T>::load(b + i);
    acc1 += S<T>::load(a + i + W) * S<T>::load(b + i + W);
  }
  T total = S<T>::hsum(acc0 + acc1);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// y += alpha * x
template <typename T>
void axpy(T alpha, const T* x, T* y, int64_t n) {
  constexpr int W = S<T>::width;
  int64_t i = 0;
  for (; i + W <= n; i += W) S<T>::store(y + i, S<T>::load(y + i) + alpha * S<T>::load(x + i));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// |v| without overflow or underflow: the plain sum of squares, or, where
// it leaves the normal range, the sum of (v / max|v|)^2 scaled back.
template <typename T>
T safe_norm(const T* v, int64_t n) {
  const T sq = dot(v, v, n);
  constexpr T tiny = std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();
  if (sq > tiny && sq <= std::numeric_limits<T>::max()) return std::sqrt(sq);
  T peak = 0;
  for (int64_t i = 0; i < n; ++i) peak = std::fmax(peak, std::fabs(v[i]));
  if (!(peak > T(0)) || !std::isfinite(peak)) return std::isnan(sq) ? sq : peak;
  T scaled = 0;
  for (int64_t i = 0; i < n; ++i) scaled += (v[i] / peak) * (v[i] / peak);
  return peak * std::sqrt(scaled);
}

struct Task {
  int64_t item, begin, end;
};

// Blocks of `block` along each item's rows (by_rows) or columns.
template <typename T>
std::vector<Task> tasks_of(const CompressItem<T>* items, int64_t count, bool by_rows, int64_t block) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t len = by_rows ? items[i].n : items[i].m;
    for (int64_t b = 0; b < len; b += block) tasks.push_back({i, b, std::min(len, b + block)});
  }
  return tasks;
}

constexpr int64_t kRowBlock = 32;
// Columns per projection task, and rows per tile of it (the tile's M lines are read once per rank group).
constexpr int64_t kColBlock = 128;
constexpr int64_t kRowTile = 64;
// Ranks a pass handles at once: that many accumulators stay in registers over one read of M.
constexpr int64_t kRankGroup = 4;

// f(std::integral_constant<int, min(left, kRankGroup)>{}): the rank group's size as a template argument.
template <typename F>
void by_group(int64_t left, F&& f) {
  switch (left >= kRankGroup ? kRankGroup : left) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// P[k][row] = M[row] . Q[k] for the C ranks from k0, M = grad + error formed in registers: one read
// of the row for the group.
template <typename T, int C>
void row_dots(const CompressItem<T>& it, int64_t row, const T* q, T* p, int64_t k0) {
  constexpr int W = S<T>::width;
  const T* g = it.grad + row * it.m;
  const T* e = it.error ? it.error + row * it.m : nullptr;
  const T* qk = q + it.q_offset + k0 * it.m;
  typename S<T>::vec acc[C] = {};
  int64_t c = 0;
  for (; c + W <= it.m; c += W) {
    auto mv = S<T>::load(g + c);
    if (e) mv += S<T>::load(e + c);
    for (int j = 0; j < C; ++j) acc[j] += mv * S<T>::load(qk + j * it.m + c);
  }
  for (int j = 0; j < C; ++j) {
    T total = S<T>::hsum(acc[j]);
    for (int64_t cc = c; cc < it.m; ++cc) total += (e ? g[cc] + e[cc] : g[cc]) * qk[j * it.m + cc];
    p[it.p_offset + (k0 + j) * it.n + row] = total;
  }
}

// Q[k][c0, c1) = sum over rows of P[k][row] M[row][c0, c1) for the C ranks from k0: rows in tiles,
// two vectors of columns at a time with C x 2 accumulators, each line of M read once per group; every
// sum runs over the rows in order.
template <typename T, int C>
void column_sums(const CompressItem<T>& it, const T* p, T* q, int64_t k0, int64_t c0, int64_t c1) {
  constexpr int W = S<T>::width;
  using vec = typename S<T>::vec;
  const T* pk = p + it.p_offset + k0 * it.n;
  T* qk = q + it.q_offset + k0 * it.m;
  for (int j = 0; j < C; ++j) std::fill(qk + j * it.m + c0, qk + j * it.m + c1, T(0));
  for (int64_t r0 = 0; r0 < it.n; r0 += kRowTile) {
    const int64_t r1 = std::min(it.n, r0 + kRowTile);
    int64_t c = c0;
    for (; c + 2 * W <= c1; c += 2 * W) {
      vec acc[C][2];
      for (int j = 0; j < C; ++j) {
        acc[j][0] = S<T>::load(qk + j * it.m + c);
        acc[j][1] = S<T>::load(qk + j * it.m + c + W);
      }
      for (int64_t row = r0; row < r1; ++row) {
        const T* g = it.grad + row * it.m + c;
        vec m0 = S<T>::load(g), m1 = S<T>::load(g + W);
        if (it.error) {
          const T* e = it.error + row * it.m + c;
          m0 += S<T>::load(e);
          m1 += S<T>::load(e + W);
        }
        for (int j = 0; j < C; ++j) {
          const vec pv = S<T>::splat(pk[j * it.n + row]);
          acc[j][0] += pv * m0;
          acc[j][1] += pv * m1;
        }
      }
      for (int j = 0; j < C; ++j) {
        S<T>::store(qk + j * it.m + c, acc[j][0]);
        S<T>::store(qk + j * it.m + c + W, acc[j][1]);
      }
    }
    for (; c < c1; ++c)  // the columns past the last two vectors
      for (int64_t row = r0; row < r1; ++row) {
        const T mv = it.error ? it.grad[row * it.m + c] + it.error[row * it.m + c] : it.grad[row * it.m + c];
        for (int j = 0; j < C; ++j) qk[j * it.m + c] += pk[j * it.n + row] * mv;
      }
  }
}

}  // namespace

template <typename T>
void compress_project_p(const CompressItem<T>* items, int64_t count, int64_t rank, T* p, const T* q, int num_threads) {
  const auto tasks = tasks_of(items, count, true, kRowBlock);
  parallel_region(num_threads, [&] {
#pragma omp for schedule(dynamic)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto& it = items[tasks[t].item];
      for (int64_t row = tasks[t].begin; row < tasks[t].end; ++row)
        for (int64_t k0 = 0; k0 < rank; k0 += kRankGroup)
          by_group(rank - k0, [&](auto group) { row_dots<T, decltype(group)::value>(it, row, q, p, k0); });
    }
  });
}

template <typename T>
void compress_project_q(const CompressItem<T>* items, int64_t count, int64_t rank, const T* p, T* q,
                       int num_threads) {
  const auto tasks = tasks_of(items, count, false, kColBlock);
  parallel_region(num_threads, [&] {
#pragma omp for schedule(dynamic)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto& it = items[tasks[t].item];
      for (int64_t k0 = 0; k0 < rank; k0 += kRankGroup)
        by_group(rank - k0, [&](auto group) {
          column_sums<T, decltype(group)::value>(it, p, q, k0, tasks[t].begin, tasks[t].end);
        });
    }
  });
}

template <typename T>
void compress_reconstruct(const CompressItem<T>* items, int64_t count, int64_t rank, const T* p_out, const T* q_out,
                         const T* p_err, const T* q_err, int num_threads) {
  const auto tasks = tasks_of(items, count, true, kRowBlock);
  const bool same = p_err == p_out && q_err == q_out;
  parallel_region(num_threads, [&] {
    Buffer<T> out_buf, local_buf;
#pragma omp for schedule(dynamic)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto& it = items[tasks[t].item];
      T* out = out_buf.grow(it.m);
      T* local = local_buf.grow(it.m);
      for (int64_t row = tasks[t].begin; row < tasks[t].end; ++row) {
        std::fill_n(out, it.m, T(0));
        for (int64_t k = 0; k < rank; ++k)
          axpy(p_out[it.p_offset + k * it.n + row], q_out + it.q_offset + k * it.m, out, it.m);
        T* g = it.grad + row * it.m;
        if (it.error) {
          const T* sent = out;
          if (!same) {
            std::fill_n(local, it.m, T(0));
            for (int64_t k = 0; k < rank; ++k)
              axpy(p_err[it.p_offset + k * it.n + row], q_err + it.q_offset + k * it.m, local, it.m);
            sent = local;
          }
          T* e = it.error + row * it.m;
          for (int64_t c = 0; c < it.m; ++c) e[c] = g[c] + e[c] - sent[c];
        }
        std::copy_n(out, it.m, g);
      }
    }
  });
}

template <typename T>
void orthonormalize(T* buf, const int64_t* offsets, const int64_t* lengths, int64_t count, int64_t rank,
                    int64_t vector_stride, int64_t element_stride, double eps, int num_threads) {
  parallel_region(num_threads, [&] {
    Buffer<T> rows_buf;
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < count; ++i) {
      const int64_t len = lengths[i];
      const int64_t vs = vector_stride > 0 ? vector_stride : len;
      T* v = buf + offsets[i];
      // Vectors not stored contiguously are gathered into rows (in cache) first.
      const bool gathered = element_stride != 1 || vs != len;
      T* rows = gathered ? rows_buf.grow(rank * len) : v;
      if (gathered)
        for (int64_t e = 0; e < len; ++e)
          for (int64_t j = 0; j < rank; ++j) rows[j * len + e] = v[j * vs + e * element_stride];
      for (int64_t j = 0; j < rank; ++j) {
        T* vj = rows + j * len;
        for (int pass = 0; pass < 2; ++pass)
          for (int64_t l = 0; l < j; ++l) {
            const T* vl = rows + l * len;
            axpy(-dot(vl, vj, len), vl, vj, len);
          }
        const T norm = safe_norm(vj, len) + static_cast<T>(eps);
        if (norm != T(0)) {  // NaN included: it spreads over the vector, as in torch
          if (std::isfinite(T(1) / norm))
            scale_inplace(vj, len, T(1) / norm);
          else  // a subnormal norm, whose reciprocal overflows
            for (int64_t e = 0; e < len; ++e) vj[e] /= norm;
        }
      }
      if (gathered)
        for (int64_t e = 0; e < len; ++e)
          for (int64_t j = 0; j < rank; ++j) v[j * vs + e * element_stride] = rows[j * len + e];
    }
  });
}

#define TESSEL_COMPRESS(T)                                                                                      \
  template void compress_project_p<T>(const CompressItem<T>*, int64_t, int64_t, T*, const T*, int);              \
  template void compress_project_q<T>(const CompressItem<T>*, int64_t, int64_t, const T*, T*, int);              \
  template void compress_reconstruct<T>(const CompressItem<T>*, int64_t, int64_t, const T*, const T*, const T*, \
                                       const T*, int);                                                         \
  template void orthonormalize<T>(T*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, double, \
                                  int);
TESSEL_COMPRESS(float)
TESSEL_COMPRESS(double)
#undef TESSEL_COMPRESS

}  // namespace tessel
