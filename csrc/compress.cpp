// PowerSGD passes over a bucket of gradient matrices, memory-bound: each pass
// reads every gradient (and error) element once, forming M = grad + error on
// the fly, and all matrices of a bucket go in one call. OpenMP spreads
// (matrix, block) tasks; every output element is written by one task in a
// fixed order (the Q projection's row blocks write partial sums, added in
// block order), so results do not depend on the thread count.
#include "compress.h"

#include <cmath>
#include <limits>
#include <type_traits>

#include "common.h"

namespace tessel {
namespace {

template <typename T>
using S = Simd<T>;

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

// Blocks of `block` rows of each item.
template <typename T>
std::vector<Task> tasks_of(const CompressItem<T>* items, int64_t count, int64_t block) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < count; ++i)
    for (int64_t b = 0; b < items[i].n; b += block) tasks.push_back({i, b, std::min(items[i].n, b + block)});
  return tasks;
}

constexpr int64_t kRowBlock = 32;
// Rows per task of the Q projection: each sums its rows into a partial Q of its own.
constexpr int64_t kSumRows = 256;
// Ranks a pass handles at once: that many accumulators stay in registers over one read of M.
constexpr int64_t kRankGroup = 4;
// Factor lines beyond this many bytes leave L1 (32 KB on the CPUs measured) over a row, so two rows
// share each load of them; below it one row at a time keeps each pass one sequential stream (two
// interleaved short rows measured up to 25% slower at m = 768, pairs 25% faster at m = 3072).
constexpr int64_t kFactorL1Bytes = 16 << 10;

// Each pass asks for the line this far ahead of its reads into L2 (prefetcht2): the hardware prefetchers
// alone left the passes 1.3-1.6x under a two-stream dot product's rate over the same bytes; the software
// prefetch took the three from 168-175 to 131-134 ms on GPT-2 small's matrices (one core; 8 and 16 KB
// measured alike, a closer or an L1 prefetch did not help). Addresses past the end are harmless: a
// prefetch never faults.
constexpr uintptr_t kPrefetchBytes = 16 << 10;

template <int Write = 0, typename T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchBytes), Write, 1);
}

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

// f(std::integral_constant<int, N>{}, row) for the groups of N rows in [begin, end) when `grouped`, then
// f(std::integral_constant<int, 1>{}, row) for each row left: the group size as a template argument.
template <int N, typename F>
void by_rows(int64_t begin, int64_t end, bool grouped, F&& f) {
  int64_t row = begin;
  if (grouped)
    for (; row + N <= end; row += N) f(std::integral_constant<int, N>{}, row);
  for (; row < end; ++row) f(std::integral_constant<int, 1>{}, row);
}

// P[k][row + i] = M[row + i] . Q[k] for the R rows from `row` and the C ranks from k0, M = grad + error
// formed in registers: each line of M read once for the group, each line of Q once for the R rows.
template <typename T, int R, int C>
void row_dots(const CompressItem<T>& it, int64_t row, const T* q, T* p, int64_t k0) {
  constexpr int W = S<T>::width;
  const int64_t m = it.m;
  const T* qk = q + it.q_offset + k0 * m;
  const T* g = it.grad + row * m;
  const T* e = it.error ? it.error + row * m : nullptr;
  typename S<T>::vec acc[R][C] = {};
  int64_t c = 0;
  for (; c + W <= m; c += W) {
    typename S<T>::vec mv[R];
    for (int i = 0; i < R; ++i) {
      prefetch_ahead(g + i * m + c);
      mv[i] = S<T>::load(g + i * m + c);
      if (e) {
        prefetch_ahead(e + i * m + c);
        mv[i] += S<T>::load(e + i * m + c);
      }
    }
    for (int j = 0; j < C; ++j) {
      const auto qv = S<T>::load(qk + j * m + c);
      for (int i = 0; i < R; ++i) acc[i][j] += mv[i] * qv;
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) {
      T total = S<T>::hsum(acc[i][j]);
      for (int64_t cc = c; cc < m; ++cc) total += (e ? g[i * m + cc] + e[i * m + cc] : g[i * m + cc]) * qk[j * m + cc];
      p[it.p_offset + (k0 + j) * it.n + row + i] = total;
    }
}

// part[k0 + j] += sum over the R rows from `row` of P[k0 + j][row + i] M[row + i], for the C ranks from k0
// (part: rank x m, in cache): each row read as one contiguous line, its P values in registers, the
// partial sums loaded and stored once per R rows; every column's sum runs over the rows in order.
template <typename T, int R, int C>
void column_sums(const CompressItem<T>& it, int64_t row, const T* p, T* part, int64_t k0) {
  constexpr int W = S<T>::width;
  using vec = typename S<T>::vec;
  const int64_t m = it.m;
  const T* pk = p + it.p_offset + k0 * it.n + row;
  T* qk = part + k0 * m;
  T pv[R][C];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) pv[i][j] = pk[j * it.n + i];
  const T* g = it.grad + row * m;
  const T* e = it.error ? it.error + row * m : nullptr;
  int64_t c = 0;
  for (; c + W <= m; c += W) {
    vec acc[C];
    for (int j = 0; j < C; ++j) acc[j] = S<T>::load(qk + j * m + c);
    for (int i = 0; i < R; ++i) {
      prefetch_ahead(g + i * m + c);
      vec mv = S<T>::load(g + i * m + c);
      if (e) {
        prefetch_ahead(e + i * m + c);
        mv += S<T>::load(e + i * m + c);
      }
      for (int j = 0; j < C; ++j) acc[j] += S<T>::splat(pv[i][j]) * mv;
    }
    for (int j = 0; j < C; ++j) S<T>::store(qk + j * m + c, acc[j]);
  }
  for (; c < m; ++c)
    for (int i = 0; i < R; ++i) {
      const T mv = e ? g[i * m + c] + e[i * m + c] : g[i * m + c];
      for (int j = 0; j < C; ++j) qk[j * m + c] += pv[i][j] * mv;
    }
}

// The reconstruction of the R rows from `row`: grad = sum_k p_out[k][row] q_out[k] and, with an error
// buffer, error = M - sum_k p_err[k][row] q_err[k], each vector of the sums formed in registers, so each
// line of grad and error is read and written once (the factor lines once for the R rows). coef: 2 R rank.
template <typename T, int R>
void reconstruct_rows(const CompressItem<T>& it, int64_t row, int64_t rank, const T* p_out, const T* q_out,
                      const T* p_err, const T* q_err, bool same, T* coef) {
  constexpr int W = S<T>::width;
  using vec = typename S<T>::vec;
  const int64_t m = it.m;
  T* coef_err = same ? coef : coef + R * rank;
  for (int64_t k = 0; k < rank; ++k)
    for (int i = 0; i < R; ++i) {
      coef[k * R + i] = p_out[it.p_offset + k * it.n + row + i];
      coef_err[k * R + i] = p_err[it.p_offset + k * it.n + row + i];
    }
  const T* qo = q_out + it.q_offset;
  const T* qe = q_err + it.q_offset;
  T* g = it.grad + row * m;
  T* e = it.error ? it.error + row * m : nullptr;
  auto sums = [&](const T* cf, const T* qs, int64_t c, vec* out) {
    for (int i = 0; i < R; ++i) out[i] = vec{};
    for (int64_t k = 0; k < rank; ++k) {
      const vec qv = S<T>::load(qs + k * m + c);
      for (int i = 0; i < R; ++i) out[i] += S<T>::splat(cf[k * R + i]) * qv;
    }
  };
  int64_t c = 0;
  for (; c + W <= m; c += W) {
    vec out[R], sent[R];
    for (int i = 0; i < R; ++i) {  // both lines are written: fetched for writing
      prefetch_ahead<1>(g + i * m + c);
      if (e) prefetch_ahead<1>(e + i * m + c);
    }
    sums(coef, qo, c, out);
    if (e) {
      if (same)
        std::copy_n(out, R, sent);
      else
        sums(coef_err, qe, c, sent);
      for (int i = 0; i < R; ++i)
        S<T>::store(e + i * m + c, S<T>::load(g + i * m + c) + S<T>::load(e + i * m + c) - sent[i]);
    }
    for (int i = 0; i < R; ++i) S<T>::store(g + i * m + c, out[i]);
  }
  for (; c < m; ++c)
    for (int i = 0; i < R; ++i) {
      T out = 0, sent = 0;
      for (int64_t k = 0; k < rank; ++k) out += coef[k * R + i] * qo[k * m + c];
      for (int64_t k = 0; k < rank; ++k) sent += coef_err[k * R + i] * qe[k * m + c];
      if (e) e[i * m + c] = g[i * m + c] + e[i * m + c] - sent;
      g[i * m + c] = out;
    }
}

}  // namespace

template <typename T>
void compress_project_p(const CompressItem<T>* items, int64_t count, int64_t rank, T* p, const T* q, int num_threads) {
  const auto tasks = tasks_of(items, count, kRowBlock);
  parallel_region(num_threads, [&] {
#pragma omp for schedule(dynamic)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto& it = items[tasks[t].item];
      for (int64_t k0 = 0; k0 < rank; k0 += kRankGroup)
        by_group(rank - k0, [&](auto group) {
          constexpr int C = decltype(group)::value;
          const bool pairs = C * it.m * static_cast<int64_t>(sizeof(T)) > kFactorL1Bytes;
          by_rows<2>(tasks[t].begin, tasks[t].end, pairs, [&](auto rows, int64_t row) {
            row_dots<T, decltype(rows)::value, C>(it, row, q, p, k0);
          });
        });
    }
  });
}

template <typename T>
void compress_project_q(const CompressItem<T>* items, int64_t count, int64_t rank, const T* p, T* q,
                       int num_threads) {
  // Each block of rows sums into a partial Q of its own (in cache: rank x m); the partials are then added
  // in block order, so the result does not depend on the thread count.
  const auto tasks = tasks_of(items, count, kSumRows);
  std::vector<int64_t> part_offset(tasks.size() + 1, 0), first_task(count + 1, 0);
  for (size_t t = 0; t < tasks.size(); ++t) {
    part_offset[t + 1] = part_offset[t] + rank * items[tasks[t].item].m;
    ++first_task[tasks[t].item + 1];
  }
  for (int64_t i = 0; i < count; ++i) first_task[i + 1] += first_task[i];
  Buffer<T> parts_buf;
  T* parts = parts_buf.grow(part_offset.back());
  parallel_region(num_threads, [&] {
#pragma omp for schedule(dynamic)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto& it = items[tasks[t].item];
      T* part = parts + part_offset[t];
      std::fill_n(part, rank * it.m, T(0));
      for (int64_t k0 = 0; k0 < rank; k0 += kRankGroup)
        by_group(rank - k0, [&](auto group) {
          by_rows<4>(tasks[t].begin, tasks[t].end, true, [&](auto rows, int64_t row) {
            column_sums<T, decltype(rows)::value, decltype(group)::value>(it, row, p, part, k0);
          });
        });
    }
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < count; ++i) {
      const int64_t len = rank * items[i].m;
      T* out = q + items[i].q_offset;
      std::fill_n(out, len, T(0));  // a matrix without rows has no partial
      for (int64_t t = first_task[i]; t < first_task[i + 1]; ++t) axpy(T(1), parts + part_offset[t], out, len);
    }
  });
}

template <typename T>
void compress_reconstruct(const CompressItem<T>* items, int64_t count, int64_t rank, const T* p_out, const T* q_out,
                         const T* p_err, const T* q_err, int num_threads) {
  const auto tasks = tasks_of(items, count, kRowBlock);
  const bool same = p_err == p_out && q_err == q_out;
  parallel_region(num_threads, [&] {
    Buffer<T> coef_buf;
    T* coef = coef_buf.grow(4 * rank);
#pragma omp for schedule(dynamic)
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto& it = items[tasks[t].item];
      const bool pairs = (same ? 1 : 2) * rank * it.m * static_cast<int64_t>(sizeof(T)) > kFactorL1Bytes;
      by_rows<2>(tasks[t].begin, tasks[t].end, pairs, [&](auto rows, int64_t row) {
        reconstruct_rows<T, decltype(rows)::value>(it, row, rank, p_out, q_out, p_err, q_err, same, coef);
      });
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
