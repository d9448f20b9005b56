// Shared CPU building blocks: portable SIMD vectors (GCC vector extensions, so
// one source serves AVX-512, AVX2 and plain SSE builds), a register-blocked
// GEMM micro-kernel for the small matmuls inside fused kernels, exp2, and
// OpenMP helpers. Everything here trusts its inputs: validation is in Python.
#pragma once

#include <omp.h>
#if defined(__SSE__)  // x86: intrinsics of whichever level this build targets
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

// GCC >= 12 and clang: extracting half a vector is one shuffle.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define TESSEL_HAS_SHUFFLEVECTOR 1
#endif
#endif

namespace tessel {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMicroRows = 12;  // 12 x 2 accumulators of 32 vector registers
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kMicroRows = 6;  // 6 x 2 accumulators of 16 vector registers
#else
constexpr int kVecBytes = 16;
constexpr int kMicroRows = 6;
#endif

// max that propagates NaN (std::max keeps its first argument when the second is NaN), of
// scalars or, lane by lane, of vectors.
template <typename T>
inline T max_nan(T a, T b) {
  return (b > a) | (b != b) ? b : a;
}

typedef float FloatVec __attribute__((vector_size(kVecBytes)));

// a where a > b, else b (b where either is NaN): x86's max, one instruction
// (max_nan takes two compares and a blend). The intrinsic for float vectors:
// given a constant a, GCC makes a compare and a blend of the generic select.
template <typename V>
inline V max_or_b(V a, V b) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<V, FloatVec>) return (V)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
  if constexpr (std::is_same_v<V, FloatVec>) return (V)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE__)
  if constexpr (std::is_same_v<V, FloatVec>) return (V)_mm_max_ps((__m128)a, (__m128)b);
#endif
  return a > b ? a : b;
}

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(kVecBytes)));
  static constexpr int width = kVecBytes / static_cast<int>(sizeof(T));
  // The micro-kernel's tile is kMicroRows x panel columns.
  static constexpr int panel = 2 * width;

  static inline vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, sizeof(vec));
    return v;
  }
  static inline void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
  static inline vec splat(T x) { return vec{} + x; }
  // Max (x86's: a NaN lane may or may not win) and sum of the lanes, by halving: log2(width) vector steps,
  // not width scalar ones.
  static inline T hmax(vec v) {
    return reduce<width>(v, [](auto a, auto b) { return max_or_b(a, b); });
  }
  static inline T hsum(vec v) {
    return reduce<width>(v, [](auto a, auto b) { return a + b; });
  }

 private:
  template <int N>
  struct Part {
    typedef T type __attribute__((vector_size(N * sizeof(T))));
  };
  // Half of a vector by shuffle, lanes [Off, Off + N/2): one extract (copied lane by lane, GCC built each
  // half from N/2 inserts).
  template <int Off, int N, int... I>
  static inline typename Part<N / 2>::type half(typename Part<N>::type v, std::integer_sequence<int, I...>) {
#if TESSEL_HAS_SHUFFLEVECTOR
    return __builtin_shufflevector(v, v, (Off + I)...);
#else
    return typename Part<N / 2>::type{v[Off + I]...};
#endif
  }
  template <int N, typename Op>
  static inline T reduce(typename Part<N>::type v, Op op) {
    if constexpr (N == 1) {
      return v[0];
    } else {
      using Lo = std::make_integer_sequence<int, N / 2>;
      return reduce<N / 2>(op(half<0, N>(v, Lo{}), half<N / 2, N>(v, Lo{})), op);
    }
  }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// bfloat16 bits (torch's layout): the high half of a float.
struct Bf16 {
  uint16_t bits;
};

// IEEE float16 bits.
struct Half {
  uint16_t bits;
};

// What the kernels accumulate inputs of type In in: float for float and the half types.
template <typename In>
using acc_t = std::conditional_t<std::is_same_v<In, double>, double, float>;

inline float to_acc(float x) { return x; }
inline double to_acc(double x) { return x; }
inline float to_acc(Bf16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_acc(Half x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  // Without F16C: exponent rebiased by hand; subnormals are m * 2^-24, inf and NaN keep their payload.
  const uint32_t sign = uint32_t(x.bits & 0x8000) << 16, exp = (x.bits >> 10) & 0x1f, mant = x.bits & 0x3ff;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(mant), -24);
  const uint32_t u = sign | (exp == 0x1f ? 0x7f800000u | mant << 13 : (exp + 112) << 23 | mant << 13);
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// A vector of In values as acc_t<In> lanes.
template <typename In>
inline typename Simd<acc_t<In>>::vec load_acc(const In* p) {
  if constexpr (std::is_same_v<In, Bf16>) {
    typedef uint16_t Bits __attribute__((vector_size(kVecBytes / 2)));
    typedef uint32_t Word __attribute__((vector_size(kVecBytes)));
    Bits h;
    std::memcpy(&h, p, sizeof h);
    const Word w = __builtin_convertvector(h, Word) << 16;
    typename Simd<float>::vec v;
    std::memcpy(&v, &w, sizeof v);
    return v;
  } else if constexpr (std::is_same_v<In, Half>) {
    typename Simd<float>::vec v;
#if defined(__AVX512F__)
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX__)
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    float f[Simd<float>::width];
    for (int i = 0; i < Simd<float>::width; ++i) f[i] = to_acc(p[i]);
#endif
    std::memcpy(&v, &f, sizeof v);
    return v;
  } else {
    return Simd<In>::load(p);
  }
}

// The operand unit of the panel GEMMs, and what one multiply-add step does with it. A unit of float or
// double is one element: inputs of other types are converted while packing.
template <typename U>
struct Unit {
  using acc = U;
  static constexpr int elems = 1;
  using vec = typename Simd<U>::vec;
  static inline vec load(const U* p) { return Simd<U>::load(p); }
  static inline vec fma(vec c, U a, vec b) { return c + a * b; }
  // Unit i of a row of `len` elements.
  template <typename In>
  static inline U of(const In* row, int64_t i, int64_t) {
    return U(to_acc(row[i]));
  }
};

#if defined(__AVX512BF16__)
// Two bfloat16 values adjacent along a product's reduction axis, the lower index in the low half: the
// operand of AVX512-BF16's dot product (vdpbf16ps), whose products are exact and summed in float.
struct Bf16Pair {
  uint32_t bits;
};

template <>
struct Unit<Bf16Pair> {
  using acc = float;
  static constexpr int elems = 2;
  using vec = Simd<float>::vec;
  static inline vec load(const Bf16Pair* p) {
    vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static inline vec fma(vec c, Bf16Pair a, vec b) {
    return (vec)_mm512_dpbf16_ps((__m512)c, (__m512bh)_mm512_set1_epi32(static_cast<int>(a.bits)),
                                 (__m512bh)(__m512i)b);
  }
  // A row's odd last element pairs with zero.
  static inline Bf16Pair of(const Bf16* row, int64_t i, int64_t len) {
    const uint32_t hi = 2 * i + 1 < len ? row[2 * i + 1].bits : 0;
    return {row[2 * i].bits | hi << 16};
  }
};
#endif

// The GEMM unit that inputs of type In are packed into: bfloat16 pairs where the CPU multiplies them.
template <typename In>
struct GemmUnitOf {
  using type = acc_t<In>;
};
#if defined(__AVX512BF16__)
template <>
struct GemmUnitOf<Bf16> {
  using type = Bf16Pair;
};
#endif
template <typename In>
using gemm_unit_t = typename GemmUnitOf<In>::type;

// Units of a row of n elements.
template <typename U>
inline int64_t units(int64_t n) {
  return ceil_div(n, Unit<U>::elems);
}

// Element strides of a (B, H, N, D) operand whose last dimension is contiguous.
struct Strides4 {
  int64_t b, h, n;
};

// Entering and leaving an OpenMP region costs microseconds: a problem of
// fewer floating-point operations than this runs on the calling thread.
constexpr double kSerialFlops = 1 << 20;
inline int threads_for(double flops, int threads) { return flops < kSerialFlops ? 1 : threads; }

// body() on `threads` OpenMP threads, its `#pragma omp for` loops shared among them; with one thread,
// body() on the calling thread without entering OpenMP at all (libgomp's region start and end cost
// four futex calls even then: most of a tiny call). Orphaned `omp for` loops run serially outside a region.
template <typename Body>
void parallel_region(int threads, Body&& body) {
  if (threads <= 1) return body();
#pragma omp parallel num_threads(threads)
  body();
}

// C tile (R x kVecs vectors) = alpha * A (R x kc) * B (kc x kVecs vectors) (+ C when accumulating), in GEMM
// units U (common.h's Unit: kc counts units, a B vector holds one unit per lane).
// A unit (r, p) is a[r * lda + p], or a[p * lda + r] when ATrans.
// B row p is the contiguous kVecs vectors at b + p * ldb.
// kLda > 0 fixes lda at compile time: A's R addresses then share one base
// register with constant offsets instead of R live row pointers. Never
// inlined: inside a large caller GCC spills the accumulators.
template <typename U, int R, bool ATrans, int64_t kLda, int kVecs>
__attribute__((noinline)) void micro_tile(int64_t kc, const U* a, int64_t lda_arg, const U* b, int64_t ldb,
                                          typename Unit<U>::acc* c, int64_t ldc, bool accumulate,
                                          typename Unit<U>::acc alpha) {
  using K = Unit<U>;
  using S = Simd<typename K::acc>;
  using V = typename S::vec;
  constexpr int W = S::width;
  const int64_t lda = kLda > 0 ? kLda : lda_arg;
  const bool scaled = alpha != 1;
  V acc[R][kVecs];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) acc[r][v] = accumulate && !scaled ? S::load(c + r * ldc + v * W) : V{};
  for (int64_t p = 0; p < kc; ++p) {
    V bv[kVecs];
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) bv[v] = K::load(b + p * ldb + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const U ar = ATrans ? a[p * lda + r] : a[r * lda + p];
#pragma GCC unroll 2
      for (int v = 0; v < kVecs; ++v) acc[r][v] = K::fma(acc[r][v], ar, bv[v]);
    }
  }
  if (scaled) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
      for (int v = 0; v < kVecs; ++v)
        acc[r][v] = acc[r][v] * alpha + (accumulate ? S::load(c + r * ldc + v * W) : V{});
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) S::store(c + r * ldc + v * W, acc[r][v]);
}

template <typename U>
using MicroFn = void (*)(int64_t, const U*, int64_t, const U*, int64_t, typename Unit<U>::acc*, int64_t, bool,
                         typename Unit<U>::acc);

template <typename U, bool ATrans, int64_t kLda, int kVecs, int... Rs>
constexpr std::array<MicroFn<U>, sizeof...(Rs)> micro_table(std::integer_sequence<int, Rs...>) {
  return {&micro_tile<U, Rs + 1, ATrans, kLda, kVecs>...};
}

// Which part of a square product a gemm may skip (causal chunks): the entries
// of C above (kOutLower) or below (kOutUpper) the diagonal are not needed, or
// A (non-transposed, m x k with k = m, one-element units) is zero above
// (kALower) or below (kAUpper) its diagonal.
enum class Triangle { kNone, kOutLower, kOutUpper, kALower, kAUpper };

// A band outside which A is zero: row i's nonzero columns lie in [i + lo, i + hi] (an
// attention mask's band, shifted to the block), so a row tile's products skip the columns no row of it has.
struct ABand {
  int64_t lo = -(int64_t(1) << 60), hi = int64_t(1) << 60;
};

// C (m x npanels*NR) = alpha * A (m x k) * B (k x npanels*NR) (+ C when accumulating), k in units of U,
// NR = kVecs vectors (by default the micro-kernel's two: Simd<acc>::panel).
// Panel j of B starts at b + j * b_panel_stride with rows ldb apart, which
// covers both a row-major matrix (stride = panel) and a panel-packed one
// (stride = k * panel, ldb = panel). Panels outer, rows inner: one B panel
// stays in L1 while every row tile of A passes over it. Entries a Triangle
// skips are left unwritten; A's columns outside `band` are not read.
// kLda = 0: A's leading dimension is the runtime `lda` (an operand read in place).
// ATrans with kLda = kMicroRows: A is laid out tile by tile (pack_transposed_tiles), the kMicroRows rows from
// row i (a multiple of kMicroRows; tri must be kNone) a contiguous k x kMicroRows block at a + i * k.
template <typename U, bool ATrans, int64_t kLda, int kVecs = 2>
void gemm_panels(int64_t m, int64_t npanels, int64_t k, const U* a, const U* b, int64_t ldb,
                 int64_t b_panel_stride, typename Unit<U>::acc* c, int64_t ldc, bool accumulate,
                 Triangle tri = Triangle::kNone, int64_t lda_arg = kLda, typename Unit<U>::acc alpha = 1,
                 ABand band = {}) {
  const int64_t lda = kLda > 0 ? kLda : lda_arg;
  static constexpr auto table = micro_table<U, ATrans, kLda, kVecs>(std::make_integer_sequence<int, kMicroRows>{});
  constexpr int NR = kVecs * Simd<typename Unit<U>::acc>::width;
  for (int64_t j = 0; j < npanels; ++j) {
    const U* bj = b + j * b_panel_stride;
    auto* cj = c + j * NR;
    const int64_t row_begin = tri == Triangle::kOutLower ? std::min(m, j * NR) : 0;
    const int64_t row_end = tri == Triangle::kOutUpper ? std::min(m, (j + 1) * NR) : m;
    for (int64_t i = row_begin; i < row_end; i += kMicroRows) {
      const int64_t rows = std::min<int64_t>(kMicroRows, row_end - i);
      // A's nonzero columns for these rows.
      const int64_t a_end = tri == Triangle::kALower ? std::min(k, i + rows) : k;
      const int64_t p0 = std::min(a_end, std::max(tri == Triangle::kAUpper ? i : 0, i + band.lo));
      const int64_t p1 = std::max(p0, std::min(a_end, i + rows + band.hi));
      constexpr bool tiled = ATrans && kLda == kMicroRows;
      const U* ai = (tiled ? a + i * k : ATrans ? a + i : a + i * lda) + (ATrans ? p0 * lda : p0);
      const U* bi = bj + p0 * ldb;
      if (rows == kMicroRows)
        micro_tile<U, kMicroRows, ATrans, kLda, kVecs>(p1 - p0, ai, lda, bi, ldb, cj + i * ldc, ldc, accumulate,
                                                       alpha);
      else
        table[rows - 1](p1 - p0, ai, lda, bi, ldb, cj + i * ldc, ldc, accumulate, alpha);
    }
  }
}

// In-register transpose of W vectors of W lanes: one butterfly stage per bit b of the lane index swaps
// the lanes whose row and column differ in that bit (log2(W) stages of W shuffles; the scalar way
// wrote one lane per instruction).
template <typename T>
struct Transpose {
  using S = Simd<T>;
  using V = typename S::vec;
  static constexpr int W = S::width;
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> Idx __attribute__((vector_size(kVecBytes)));

  // Where lane j of the new row i (bit b of i clear) and of the new row i | b come from: index j < W is
  // lane j of a = row i, W + j lane j of c = row i | b.
  static constexpr int low(int b, int j) { return j & b ? W + j - b : j; }
  static constexpr int high(int b, int j) { return j & b ? W + j : j + b; }

  template <int B, size_t... J>
  static inline void stage(V* v, std::index_sequence<J...>) {
    for (int i = 0; i < W; ++i) {
      if (i & B) continue;
      const V a = v[i], c = v[i | B];
#if defined(__clang__)
      v[i] = __builtin_shufflevector(a, c, low(B, J)...);
      v[i | B] = __builtin_shufflevector(a, c, high(B, J)...);
#else
      v[i] = __builtin_shuffle(a, c, Idx{low(B, J)...});
      v[i | B] = __builtin_shuffle(a, c, Idx{high(B, J)...});
#endif
    }
  }
  template <int B = 1>
  static inline void run(V* v) {
    if constexpr (B < W) {
      stage<B>(v, std::make_index_sequence<W>{});
      run<2 * B>(v);
    }
  }
};

// out[c * ld_out + r] = x[r * ld + c] * scale over a W x W block (W = Simd<T>::width), x converted to T.
template <typename T, typename In>
inline void transpose_block(const In* x, int64_t ld, T scale, T* out, int64_t ld_out) {
  typename Transpose<T>::V v[Transpose<T>::W];
  for (int r = 0; r < Transpose<T>::W; ++r) v[r] = load_acc(x + r * ld) * scale;
  Transpose<T>::run(v);
  for (int c = 0; c < Transpose<T>::W; ++c) Simd<T>::store(out + c * ld_out, v[c]);
}

// The whole W x W blocks of a transposing pack, where a GEMM unit is one element of the accumulation type:
// out[c * ld_out + r] = x[r * ld + c] * scale for r < block rows, c < block columns, which it returns (0, 0
// for other units); the caller packs the rest element by element.
template <typename U, typename In>
inline std::pair<int64_t, int64_t> pack_transposed_blocks(const In* x, int64_t rows, int64_t cols, int64_t ld,
                                                          typename Unit<U>::acc scale, U* out, int64_t ld_out) {
  if constexpr (Unit<U>::elems == 1 && std::is_same_v<U, acc_t<In>>) {
    constexpr int W = Simd<U>::width;
    const int64_t block_rows = rows / W * W, block_cols = cols / W * W;
    for (int64_t r = 0; r < block_rows; r += W)
      for (int64_t c = 0; c < block_cols; c += W)
        transpose_block(x + r * ld + c, ld, scale, out + c * ld_out + r, ld_out);
    return {block_rows, block_cols};
  } else {
    return {0, 0};
  }
}

// Packs a block of `rows` rows (row stride ld) of `cols` values, times
// `scale`, transposed, in GEMM units: out[c * ld_out + r] is unit c of row r;
// rows [rows, ld_out) are zero. The result is an ATrans A operand with
// compile-time lda = ld_out. Units of several elements cannot carry a scale
// exactly: scale must be 1 for them (scale the GEMM by alpha instead).
template <typename U, typename In>
void pack_transposed_scaled(const In* x, int64_t rows, int64_t cols, int64_t ld, typename Unit<U>::acc scale, U* out,
                            int64_t ld_out) {
  const int64_t ucols = units<U>(cols);
  const auto [block_rows, block_cols] = pack_transposed_blocks(x, rows, cols, ld, scale, out, ld_out);
  // The rest row by row, as pack_transposed_panels: x read in order, the strided writes inside the block.
  for (int64_t r = 0; r < rows; ++r) {
    const In* row = x + r * ld;
    for (int64_t c = r < block_rows ? block_cols : 0; c < ucols; ++c) {
      if constexpr (Unit<U>::elems == 1)
        out[c * ld_out + r] = Unit<U>::of(row, c, cols) * scale;
      else
        out[c * ld_out + r] = Unit<U>::of(row, c, cols);
    }
  }
  for (int64_t c = 0; c < ucols; ++c) std::fill(out + c * ld_out + rows, out + (c + 1) * ld_out, U{});
}

// pack_transposed_scaled's result laid out tile by tile of R rows: unit c of
// row r at out[(r / R) * units(cols) * R + c * R + r % R], the last tile's
// rows past `rows` zero (an A operand of gemm_panels with kLda = R). A micro-
// tile then reads its A as one contiguous run; laid out [unit][row], R of a
// cache line's values per unit, it touched a line per unit and pass (perf on
// the S and dP GEMMs, AVX2: 7-16% less time). `scratch` holds
// units(cols) * round_up(rows, R) units.
template <int R, typename U, typename In>
void pack_transposed_tiles(const In* x, int64_t rows, int64_t cols, int64_t ld, typename Unit<U>::acc scale,
                           U* scratch, U* out) {
  const int64_t ucols = units<U>(cols), padded = round_up(rows, int64_t(R));
  pack_transposed_scaled(x, rows, cols, ld, scale, scratch, padded);
  for (int64_t t = 0; t < padded; t += R)
    for (int64_t c = 0; c < ucols; ++c)
      std::memcpy(out + t * ucols + c * R, scratch + c * padded + t, R * sizeof(U));
}

// Packs rows [0, n) of a row-major matrix (row stride ld, `cols` columns) as
// transposed panels of GEMM units: panel j holds rows [j*NR, j*NR+NR) laid out
// [units(cols)][NR], zero beyond n. The result is the B operand of A * X^T.
template <typename U, typename In>
void pack_transposed_panels(const In* x, int64_t n, int64_t cols, int64_t ld, U* out) {
  constexpr int NR = Simd<typename Unit<U>::acc>::panel;
  const int64_t npanels = ceil_div(n, NR), ucols = units<U>(cols);
  for (int64_t j = 0; j < npanels; ++j) {
    U* panel = out + j * ucols * NR;
    const int64_t rows = std::min<int64_t>(NR, n - j * NR);
    const auto [block_rows, block_cols] =
        pack_transposed_blocks(x + j * NR * ld, rows, cols, ld, typename Unit<U>::acc(1), panel, NR);
    // The rest row by row: x is read in order (the prefetcher streams it; a column walk missed on every
    // row) and the strided writes stay in the panel, which fits L1.
    for (int64_t r = 0; r < NR; ++r) {
      const In* row = x + (j * NR + r) * ld;
      for (int64_t c = r < block_rows ? block_cols : 0; c < ucols; ++c)
        panel[c * NR + r] = r < rows ? Unit<U>::of(row, c, cols) : U{};
    }
  }
}

// Packs rows [0, n) of a row-major matrix (row stride ld, `cols` columns) as
// row panels, converting: panel j holds columns [j*NR, j*NR+NR) laid out
// [n][NR] (panels panel_rows * NR apart, by default n * NR), zero beyond cols.
// The result is a B operand (ldb = NR) whose panel over a block of rows is one
// contiguous block. x is read row by row, in order (the prefetchers stream it).
template <typename In, typename T>
void pack_row_panels(const In* x, int64_t n, int64_t cols, int64_t ld, T* out, int64_t panel_rows = -1) {
  constexpr int64_t NR = Simd<T>::panel;
  if (panel_rows < 0) panel_rows = n;
  for (int64_t r = 0; r < n; ++r) {
    const In* row = x + r * ld;
    for (int64_t c0 = 0; c0 < cols; c0 += NR) {
      const int64_t w = std::min(NR, cols - c0);
      T* dst = out + c0 * panel_rows + r * NR;
      if constexpr (std::is_same_v<In, T>) {
        if (w == NR) {  // a fixed size: vector moves, not a call per row
          std::memcpy(dst, row + c0, NR * sizeof(T));
          continue;
        }
        std::memcpy(dst, row + c0, w * sizeof(T));
      } else {
        for (int64_t c = 0; c < w; ++c) dst[c] = to_acc(row[c0 + c]);
      }
      std::fill(dst + w, dst + NR, T(0));
    }
  }
}

// Copies n rows of `cols` values (row stride ld) into rows of padded_cols
// values of type T, converting, and zero-fills the padding.
template <typename In, typename T>
void pack_rows_padded(const In* x, int64_t n, int64_t cols, int64_t ld, T* out, int64_t padded_cols) {
  for (int64_t r = 0; r < n; ++r) {
    if constexpr (std::is_same_v<In, T>)
      std::memcpy(out + r * padded_cols, x + r * ld, cols * sizeof(T));
    else
      for (int64_t c = 0; c < cols; ++c) out[r * padded_cols + c] = to_acc(x[r * ld + c]);
    std::fill(out + r * padded_cols + cols, out + (r + 1) * padded_cols, T(0));
  }
}

// x[i] = 2^(x[i] - shift) for x[i] - shift < 127.9, returning the sum.
// float: x = n + j/8 + f with f in [-1/16, 1/16]; 2^(j/8) comes from an
// 8-entry table (one permute), 2^f from a degree-3 polynomial (minimax,
// relative 2.5e-8), and n goes into the table entry's exponent field by an
// integer add. Relative error measured over [-126, 128): 1.56e-7 (1.3 ulp)
// with FMA, 1.62e-7 without (the sse level); the degree-5 polynomial on
// [-1/2, 1/2] before it had 2.1e-7 and a dependency chain 8 cycles longer,
// which held the exp pass to half the core's add and FMA rate (the scheduler
// fills with waiting work). Arguments below -126 (-inf included) give
// 2^-126, negligible next to the row maximum's 2^0; NaN stays NaN. double:
// libm.
template <typename T>
inline T exp2_shifted_sum(T* x, int64_t n, T shift) {
  if constexpr (std::is_same_v<T, float>) {
    using S = Simd<float>;
    using V = S::vec;
    constexpr int W = S::width;
    typedef uint32_t UV __attribute__((vector_size(kVecBytes)));  // unsigned: the shift drops high bits
    // 2^(j/8)'s bits less j << 20 (twice, for AVX-512's 16-entry permute): t's bits shifted left by 20 below
    // add j << 20 back and put n in the exponent field.
    alignas(64) static constexpr uint32_t kTable[16] = {
        0x3f800000, 0x3f8b95c2 - (1 << 20), 0x3f9837f0 - (2 << 20), 0x3fa5fed7 - (3 << 20),
        0x3fb504f3 - (4 << 20), 0x3fc5672a - (5 << 20), 0x3fd744fd - (6 << 20), 0x3feac0c7 - (7 << 20),
        0x3f800000, 0x3f8b95c2 - (1 << 20), 0x3f9837f0 - (2 << 20), 0x3fa5fed7 - (3 << 20),
        0x3fb504f3 - (4 << 20), 0x3fc5672a - (5 << 20), 0x3fd744fd - (6 << 20), 0x3feac0c7 - (7 << 20)};
    auto body = [](V v) -> V {
      const V xc = max_or_b(S::splat(-126.0f), v);  // NaN stays NaN
      // Adding 1.5 * 2^20 rounds to the nearest 1/8 and leaves 8n + j in t's low mantissa bits.
      const V magic = S::splat(1572864.0f);
      const V t = xc + magic;
      const V f = xc - (t - magic);  // exact
      V p = S::splat(0.05549622f);
      p = p * f + 0.24025762f;
      p = p * f + 0.69314724f;
      p = p * f + 1.0f;
      UV bits;
      std::memcpy(&bits, &t, sizeof(V));
#if defined(__AVX512F__)
      const UV entry = (UV)_mm512_permutexvar_epi32((__m512i)bits, _mm512_load_si512(kTable));
#elif defined(__AVX2__)
      const UV entry = (UV)_mm256_permutevar8x32_epi32(_mm256_load_si256((const __m256i*)kTable), (__m256i)bits);
#else
      UV entry;
      for (int i = 0; i < W; ++i) entry[i] = kTable[bits[i] & 7];
#endif
      const UV scale_bits = entry + (bits << 20);
      V scale;
      std::memcpy(&scale, &scale_bits, sizeof(V));
      return p * scale;
    };
    // Two sums: one would chain every step's add (its latency, not the exp, would set the pace).
    V sum0{}, sum1{};
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      const V y0 = body(S::load(x + i) - shift), y1 = body(S::load(x + i + W) - shift);
      S::store(x + i, y0);
      S::store(x + i + W, y1);
      sum0 += y0;
      sum1 += y1;
    }
    if (i + W <= n) {
      const V y = body(S::load(x + i) - shift);
      S::store(x + i, y);
      sum0 += y;
      i += W;
    }
    float total = S::hsum(sum0 + sum1);
    if (i < n) {
      float tmp[W];
      for (int j = 0; j < W; ++j) tmp[j] = i + j < n ? x[i + j] - shift : -126.0f;
      S::store(tmp, body(S::load(tmp)));
      for (int j = 0; i + j < n; ++j) {
        x[i + j] = tmp[j];
        total += tmp[j];
      }
    }
    return total;
  } else {
    T total = 0;
    for (int64_t i = 0; i < n; ++i) {
      x[i] = std::exp2(x[i] - shift);
      total += x[i];
    }
    return total;
  }
}

// The maximum of x[0, n), n > 0, by x86's max: a NaN entry may or may not
// win, which the online softmax does not need, a NaN score reaching the row's
// output and lse through the exp pass's sum either way (max_nan's compares
// and blend made this pass 2.3x slower).
template <typename T>
inline T row_max(const T* x, int64_t n) {
  using S = Simd<T>;
  constexpr int W = S::width;
  T m = x[0];
  int64_t i = 0;
  if (n >= W) {
    // Two running maxima: one would chain every step's max.
    auto m0 = S::load(x), m1 = m0;
    for (i = W; i + 2 * W <= n; i += 2 * W) {
      m0 = max_or_b(m0, S::load(x + i));
      m1 = max_or_b(m1, S::load(x + i + W));
    }
    if (i + W <= n) {
      m0 = max_or_b(m0, S::load(x + i));
      i += W;
    }
    m = S::hmax(max_or_b(m0, m1));
  }
  for (; i < n; ++i) m = max_or_b(m, x[i]);
  return m;
}

// sum a[i] * b[i], b converted to T. Two running sums: one would chain every
// step's add.
template <typename T, typename In = T>
inline T dot(const T* a, const In* b, int64_t n) {
  using S = Simd<T>;
  constexpr int W = S::width;
  typename S::vec acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 += S::load(a + i) * load_acc(b + i);
    acc1 += S::load(a + i + W) * load_acc(b + i + W);
  }
  if (i + W <= n) {
    acc0 += S::load(a + i) * load_acc(b + i);
    i += W;
  }
  T total = S::hsum(acc0 + acc1);
  for (; i < n; ++i) total += a[i] * to_acc(b[i]);
  return total;
}

// y += alpha * x, x converted to T.
template <typename T, typename In = T>
inline void axpy(T alpha, const In* x, T* y, int64_t n) {
  using S = Simd<T>;
  int64_t i = 0;
  for (; i + S::width <= n; i += S::width) S::store(y + i, S::load(y + i) + S::splat(alpha) * load_acc(x + i));
  for (; i < n; ++i) y[i] += alpha * to_acc(x[i]);
}

// x[i] *= a
template <typename T>
inline void scale_inplace(T* x, int64_t n, T a) {
  using S = Simd<T>;
  constexpr int W = S::width;
  int64_t i = 0;
  for (; i + W <= n; i += W) S::store(x + i, S::load(x + i) * a);
  for (; i < n; ++i) x[i] *= a;
}

// Large scratch blocks, kept per thread between kernel calls. Every call packs
// its operands into fresh buffers of a few MB; glibc maps such blocks anew
// (or trims the heap under them) once they are freed, so a call could spend a
// quarter of its time in page faults (B32-H2-N256-D32 forward: ~1,000 faults
// of its K panels and output per call, 2.4 ms of 7.3) in some runs and none
// in others. Blocks from kMinBytes are kept on free: up to kMaxBlocks of them
// and kMaxBytes per thread, the oldest given back first.
class BlockCache {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 18;
  static constexpr size_t kMaxBytes = size_t(1) << 26;
  static constexpr size_t kMaxBlocks = 8;
  static constexpr std::align_val_t kAlign{64};

  struct Block {
    void* data = nullptr;
    size_t bytes = 0;
  };

  // A block of at least `bytes` (the smallest cached one that fits, else a new one).
  static Block take(size_t bytes) {
    if (bytes >= kMinBytes) {
      Cache& c = cached();
      auto best = c.blocks.end();
      for (auto it = c.blocks.begin(); it != c.blocks.end(); ++it)
        if (it->bytes >= bytes && (best == c.blocks.end() || it->bytes < best->bytes)) best = it;
      if (best != c.blocks.end()) return c.remove(best);
    }
    return {::operator new(bytes, kAlign), bytes};
  }

  // Gives the calling thread's cached blocks back; returns their bytes.
  static size_t clear() { return cached().release_all(); }

  static void give(Block b) {
    if (b.bytes < kMinBytes || b.bytes > kMaxBytes) return release(b);
    Cache& c = cached();
    c.blocks.push_back(b);
    c.bytes += b.bytes;
    while (c.blocks.size() > kMaxBlocks || c.bytes > kMaxBytes) release(c.remove(c.blocks.begin()));
  }

 private:
  struct Cache {
    std::vector<Block> blocks;  // oldest first
    size_t bytes = 0;

    Block remove(std::vector<Block>::iterator it) {
      const Block b = *it;
      bytes -= b.bytes;
      blocks.erase(it);
      return b;
    }
    size_t release_all() {
      const size_t total = bytes;
      for (const Block& b : blocks) release(b);
      blocks.clear();
      bytes = 0;
      return total;
    }
    ~Cache() { release_all(); }
  };
  static Cache& cached() {
    static thread_local Cache cache;
    return cache;
  }
  static void release(Block b) { ::operator delete(b.data, kAlign); }
};

// An uninitialised array, for buffers that are written before being read
// (std::vector would zero them first: one more pass over memory), aligned
// to a cache line: malloc's 16 bytes would split most vector loads and
// stores of AVX-512 across two lines. Large ones come from BlockCache.
template <typename T>
class Buffer {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>);

 public:
  Buffer() = default;
  explicit Buffer(size_t n) : block_(n ? BlockCache::take(n * sizeof(T)) : BlockCache::Block{}), size_(n) {}
  Buffer(Buffer&& other) noexcept : block_(std::exchange(other.block_, {})), size_(std::exchange(other.size_, 0)) {}
  Buffer& operator=(Buffer&& other) noexcept {
    if (this != &other) {
      reset();
      block_ = std::exchange(other.block_, {});
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { reset(); }

  T* data() { return static_cast<T*>(block_.data); }
  const T* data() const { return static_cast<const T*>(block_.data); }
  size_t size() const { return size_; }
  // At least n elements, their contents undefined: thread-private scratch that grows on demand and is reused
  // across blocks without the pass over memory that zeroing would cost.
  T* grow(size_t n) {
    if (n * sizeof(T) <= block_.bytes)
      size_ = std::max(size_, n);
    else
      *this = Buffer(n);
    return data();
  }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }

 private:
  void reset() {
    if (block_.data) BlockCache::give(block_);
    block_ = {};
    size_ = 0;
  }
  BlockCache::Block block_;
  size_t size_ = 0;
};

}  // namespace tessel
