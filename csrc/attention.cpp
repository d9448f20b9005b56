// FlashAttention-2 on the CPU.
//
// Inputs of float, double or a half type (converted while packing; bfloat16
// multiplied as bfloat16 pairs where the CPU has AVX512-BF16, common.h's
// Unit), computed in float (double for double).
//
// Forward: K and V packed a chunk of (batch, kv head)s at a time; OpenMP over
// the chunk's (q head, query block of a segment). Each task streams key
// blocks through an online softmax: S = Q K^T with K pre-packed as transposed
// panels, P = exp2(S * scale * log2 e - m), O = O * alpha + P V, so memory is
// O(N) and the N x N matrix never exists. Key blocks outside the band
// (causal, window) are never visited.
//
// Segments (packed variable-length sequences) share every step: blocks never
// cross a segment boundary, so no work is spent outside a sequence.
//
// Backward: recompute P from the saved lse. OpenMP over (batch, segment, kv
// head, key split); a task owns its key blocks' dK and dV (summing the q heads of its
// GQA group) and a private dQ accumulator per split, reduced in a fixed order
// afterwards, so results are deterministic for a given thread count.
#include "attention.h"

#include <optional>

#include "common.h"

namespace tessel {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// Queries per block: a multiple of the micro-kernel's rows. Keys per block: a
// multiple of the panel width. Sized so the S tile and the K/V panels of a
// block stay in L2. The backward streams every query block's Q, dO and dQ past
// each key block; where a sequence's Q (one head) reaches kBwdLongHeadBytes
// they come from L3, and a key block twice as long halves that traffic (perf,
// AVX2 EPYC: 7-8% less micro-kernel time at N = 4096, D = 64 and N = 2048,
// D = 128). From 256 KB (N = 1024 at D = 64) with the long block's row copies
// (backward_key_block): forward+backward 1.05-1.17x at N = 1024, D = 64 and
// N = 512, D = 128 side by side; from 128 KB, 0.86-0.99x at N = 512, D = 64.
constexpr int64_t kFwdBlockQ = 8 * kMicroRows;
constexpr int64_t kFwdBlockK = 256;
constexpr int64_t kBwdBlockQ = 8 * kMicroRows;
constexpr int64_t kBwdBlockK = 96, kBwdLongBlockK = 192;
constexpr int64_t kBwdLongHeadBytes = int64_t(1) << 18;
// The forward packs K and V a chunk of (batch, kv head)s at a time, about
// this many bytes, and runs the chunk's query blocks before the next: its
// extra memory is bounded, where packing every head first doubled K's and V's
// (B16-H4-N2048-D128: 192 MB at the peak, 67 of them the output). Against
// packing every head first, calls interleaved one by one: 0.98-1.02x (AVX-512
// EPYC, N = 256..4096).
constexpr int64_t kFwdChunkBytes = int64_t(8) << 20;
// A block's scores fill whole panels (ncols rounds up to one): a key block that
// is not a multiple of the widest panel would overrun the S and dS scratch.
static_assert(kFwdBlockK % Simd<float>::panel == 0 && kBwdBlockK % Simd<float>::panel == 0 &&
                  kBwdLongBlockK % Simd<float>::panel == 0,
              "key blocks must be a multiple of the panel width");

// Keys [first, last] that query row i may see (both local to the segment).
inline void row_key_range(const Segment& s, int64_t i, int64_t* first, int64_t* last) {
  *first = std::max<int64_t>(0, i + s.band_lo);
  *last = std::min<int64_t>(s.len_k - 1, i + s.band_hi);
}

// Keys [first, last] that some row of queries [q0, q0 + mq) may see: both
// ends of the band grow with the row.
inline void rows_key_range(const Segment& s, int64_t q0, int64_t mq, int64_t* first, int64_t* last) {
  int64_t unused;
  row_key_range(s, q0, first, &unused);
  row_key_range(s, q0 + mq - 1, &unused, last);
}

// Columns [a, e) of a key block starting at k0 with `ncols` columns that row i
// may see (a >= e when none).
inline void row_block_cols(const Segment& s, int64_t i, int64_t k0, int64_t ncols, int64_t* a, int64_t* e) {
  int64_t first, last;
  row_key_range(s, i, &first, &last);
  *a = std::max<int64_t>(first, k0) - k0;
  *e = std::min<int64_t>(last, k0 + ncols - 1) - k0 + 1;
}

// Where each segment's keys start once every segment is padded to whole
// panels, and the padded total.
inline std::vector<int64_t> padded_key_starts(const AttentionProblem& p, int64_t panel) {
  std::vector<int64_t> starts(p.segments.size() + 1, 0);
  for (size_t s = 0; s < p.segments.size(); ++s) starts[s + 1] = starts[s] + round_up(p.segments[s].len_k, panel);
  return starts;
}

// Keys packed per piece of work: a head in several pieces keeps every thread busy.
constexpr int64_t kPackKeys = 512;

// K (or V) of (batch, kv head)s as transposed panels of GEMM units, the B
// operand of Q K^T (dO V^T), packed once and shared by all query blocks and
// q heads. Slot j holds head `first + j` of the last pack(); each segment
// starts a new panel.
template <typename In>
struct PanelHeads {
  using U = gemm_unit_t<In>;
  std::vector<int64_t> seg_start;
  int64_t rows_padded, head_units;
  Buffer<U> panels;  // [slot][rows_padded / NR][head_units][NR]

  // Room for `slots` heads.
  PanelHeads(const AttentionProblem& p, int64_t slots)
      : seg_start(padded_key_starts(p, Simd<acc_t<In>>::panel)),
        rows_padded(seg_start.back()),
        head_units(units<U>(p.head_dim)),
        panels(slots * rows_padded * head_units) {}
  // Every head, packed (slot = batch * kv_heads + kv head).
  PanelHeads(const AttentionProblem& p, const In* x, const Strides4& st) : PanelHeads(p, p.batch * p.kv_heads) {
    parallel_region(p.num_threads, [&] { pack(p, x, st, 0, p.batch * p.kv_heads); });
  }
  // Packs heads [first, first + n) (batch * kv_heads + kv head) into slots [0, n): an orphaned `omp for`,
  // shared by the threads of the region it is called in.
  void pack(const AttentionProblem& p, const In* x, const Strides4& st, int64_t first, int64_t n) {
    constexpr int64_t NR = Simd<acc_t<In>>::panel;
    static_assert(kPackKeys % NR == 0, "a piece must hold whole panels");
    const int64_t nseg = static_cast<int64_t>(p.segments.size()), pieces = ceil_div(p.len_k, kPackKeys);
#pragma omp for collapse(3)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t s = 0; s < nseg; ++s)
        for (int64_t r0 = 0; r0 < pieces * kPackKeys; r0 += kPackKeys) {
          const Segment& seg = p.segments[s];
          if (r0 >= seg.len_k) continue;
          const int64_t head = first + j, b = head / p.kv_heads, hk = head % p.kv_heads;
          pack_transposed_panels(x + b * st.b + hk * st.h + (seg.k_start + r0) * st.n,
                                 std::min(kPackKeys, seg.len_k - r0), p.head_dim, st.n,
                                 panels.data() + offset(j, s, r0));
        }
  }
  int64_t offset(int64_t slot, int64_t seg, int64_t key0) const {
    return (slot * rows_padded + seg_start[seg] + key0) * head_units;
  }
  const U* at(int64_t slot, int64_t seg, int64_t key0) const { return panels.data() + offset(slot, seg, key0); }
};

// A block of queries inside one segment.
struct QueryBlock {
  int64_t seg, q0;
};

inline std::vector<QueryBlock> query_blocks(const AttentionProblem& p, int64_t block) {
  std::vector<QueryBlock> blocks;
  for (size_t s = 0; s < p.segments.size(); ++s)
    for (int64_t q0 = 0; q0 < p.segments[s].len_q; q0 += block) blocks.push_back({static_cast<int64_t>(s), q0});
  return blocks;
}

// Columns of the products whose width is the head dim (P V, dV, dK, dQ): one
// vector when D fits in one, else whole two-vector panels (padding D = 16 to
// a float panel on AVX-512 would double their work).
template <typename T>
inline int64_t head_cols(int64_t D) {
  return D <= Simd<T>::width ? Simd<T>::width : round_up(D, Simd<T>::panel);
}

// C (m x Dp) (+)= A (m x k) * B (k x Dp), Dp = head_cols(D): B row-major (rows ldb apart), or row panels
// (b_panel_stride apart, rows ldb apart within one).
template <typename T, bool ATrans, int64_t kLda>
void gemm_head_cols(int64_t m, int64_t Dp, int64_t k, const T* a, const T* b, int64_t ldb, T* c, int64_t ldc,
                    bool accumulate, int64_t b_panel_stride = Simd<T>::panel, ABand band = {}) {
  constexpr int W = Simd<T>::width, NR = Simd<T>::panel;
  if (Dp == W)
    gemm_panels<T, ATrans, kLda, 1>(m, 1, k, a, b, ldb, W, c, ldc, accumulate, Triangle::kNone, kLda, 1, band);
  else
    gemm_panels<T, ATrans, kLda>(m, Dp / NR, k, a, b, ldb, b_panel_stride, c, ldc, accumulate, Triangle::kNone, kLda,
                                 1, band);
}

// Rows of a (B, heads, n, D) operand as the B operand of a GEMM, which needs
// rows of head_cols(D) values of type T: read in place when they are that,
// else from zero-padded (and converted) copies.
template <typename T>
struct RowOperand {
  const T* base;
  int64_t stride_b, stride_h, ld, heads, n;
  Buffer<T> padded;

  template <typename In>
  RowOperand(const AttentionProblem& p, const In* x, const Strides4& st, int64_t heads_, int64_t n_)
      : stride_b(st.b), stride_h(st.h), ld(st.n), heads(heads_), n(n_) {
    const int64_t D = p.head_dim, Dp = head_cols<T>(D);
    if constexpr (std::is_same_v<In, T>) {
      base = x;
      if (Dp == D) return;
    }
    padded = Buffer<T>(p.batch * heads * n * Dp);
    parallel_region(p.num_threads, [&] {
#pragma omp for collapse(2)
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t h = 0; h < heads; ++h)
          pack_rows_padded(x + b * st.b + h * st.h, n, D, st.n, padded.data() + (b * heads + h) * n * Dp, Dp);
    });
    base = padded.data();
    stride_b = heads * n * Dp;
    stride_h = n * Dp;
    ld = Dp;
  }
  const T* row(int64_t b, int64_t h, int64_t i) const { return base + b * stride_b + h * stride_h + i * ld; }
};

// V as the B operand of the forward's O += P V. With several panels of
// head_cols(D) columns, V is packed per kv head as row panels ([panel][n][NR]),
// so that a key block's panel is one contiguous block that stays in L1 while
// the block's row tiles pass over it: read in place, the 256 rows of a key
// block lie 4 * D bytes apart, at D = 64 on a quarter of L1's sets, and the
// panel did not stay (perf: P V 1.09x the Q K^T micro-kernel's samples, 0.97x
// packed). One panel's rows are read as RowOperand reads them (packing them
// cost the small heads 4-7%).
template <typename T>
struct ValueOperand {
  static constexpr int NR = Simd<T>::panel;
  std::optional<RowOperand<T>> rows;  // one panel
  int64_t n, kv_heads, head_size;
  Buffer<T> panels;  // [slot][panel][n][NR], slots as PanelHeads'

  // Room for `slots` heads of panels (packed by pack()), or one panel's rows.
  template <typename In>
  ValueOperand(const AttentionProblem& p, const In* v, int64_t slots)
      : n(p.len_k), kv_heads(p.kv_heads), head_size(head_cols<T>(p.head_dim) * p.len_k) {
    if (head_cols<T>(p.head_dim) <= NR)
      rows.emplace(p, v, p.v, p.kv_heads, p.len_k);
    else
      panels = Buffer<T>(slots * head_size);
  }
  // As PanelHeads::pack (nothing to do for rows).
  template <typename In>
  void pack(const AttentionProblem& p, const In* v, int64_t first, int64_t count) {
    if (rows) return;
#pragma omp for collapse(2)
    for (int64_t j = 0; j < count; ++j)
      for (int64_t r0 = 0; r0 < n; r0 += kPackKeys) {
        const int64_t head = first + j, b = head / p.kv_heads, hk = head % p.kv_heads;
        pack_row_panels(v + b * p.v.b + hk * p.v.h + r0 * p.v.n, std::min(kPackKeys, n - r0), p.head_dim, p.v.n,
                        panels.data() + j * head_size + r0 * NR, n);
      }
  }
  // Key row `key` of kv head `head` (batch * kv_heads + kv head, in slot head - first) in its first panel, the
  // rows' stride and the panels'.
  const T* at(int64_t head, int64_t first, int64_t key) const {
    return rows ? rows->row(head / kv_heads, head % kv_heads, key)
                : panels.data() + (head - first) * head_size + key * NR;
  }
  int64_t ldb() const { return rows ? rows->ld : NR; }
  int64_t panel_stride() const { return rows ? NR : n * NR; }
};

// One online-softmax step of a row: its visible scores s[0, n) (exp2 units)
// become exp2(s - m_new) in place, and the running max m, sum l and output
// o (o_len values) are rescaled to m_new.
template <typename T>
inline void online_softmax_step(T* s, int64_t n, T& m, T& l, T* o, int64_t o_len) {
  const T m_new = max_nan(m, row_max(s, n));
  const T sum = exp2_shifted_sum(s, n, m_new);
  if (m != -std::numeric_limits<T>::infinity() && m != m_new) {
    const T alpha = std::exp2(m - m_new);
    scale_inplace(o, o_len, alpha);
    l *= alpha;
  }
  l += sum;
  m = m_new;
}

// A row's lse (natural log) from its max m (exp2 units) and sum l: +inf, as
// torch's logsumexp, where a score is +inf (the output is NaN there).
template <typename T>
inline T row_lse(T m, T l) {
  return m == std::numeric_limits<T>::infinity() ? m : T((m + std::log2(l)) * kLn2);
}

// Q's scale * log2 e: folded into the packed Q where a GEMM unit is one
// element, else (bfloat16 pairs, which cannot hold a scaled value exactly)
// applied as the S GEMM's alpha.
template <typename U>
struct QueryScale {
  typename Unit<U>::acc pack, alpha;
  explicit QueryScale(double scale) {
    const auto sc = static_cast<typename Unit<U>::acc>(scale * kLog2e);
    pack = Unit<U>::elems == 1 ? sc : 1;
    alpha = Unit<U>::elems == 1 ? 1 : sc;
  }
};

template <typename In>
struct ForwardScratch {
  using T = acc_t<In>;
  Buffer<gemm_unit_t<In>> qt, qt_rows;  // Q^T in micro-tiles, and as packed before tiling
  Buffer<T> s, o, m, l;
};

template <typename In>
void forward_query_block(const AttentionProblem& p, const In* q, const PanelHeads<In>& kp,
                         const ValueOperand<acc_t<In>>& vp, int64_t first, int64_t b, int64_t h, QueryBlock blk,
                         acc_t<In>* out, acc_t<In>* lse, ForwardScratch<In>& ws) {
  using T = acc_t<In>;
  using U = gemm_unit_t<In>;
  constexpr int NR = Simd<T>::panel;
  const Segment& seg = p.segments[blk.seg];
  const int64_t q0 = blk.q0;  // local to the segment, as every key and query index below
  const int64_t D = p.head_dim, Dp = head_cols<T>(D);
  const int64_t mq = std::min(kFwdBlockQ, seg.len_q - q0);
  const int64_t hk = h / (p.heads / p.kv_heads), kv_head = b * p.kv_heads + hk;
  const In* qb = q + b * p.q.b + h * p.q.h + (seg.q_start + q0) * p.q.n;
  const QueryScale<U> sc(p.scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();

  // Q^T, S = Q K^T * scale * log2(e) comes out of the matmul in exp2's units.
  U* Qt = ws.qt.grow(kp.head_units * kFwdBlockQ);
  pack_transposed_tiles<kMicroRows>(qb, mq, D, p.q.n, sc.pack, ws.qt_rows.grow(kp.head_units * kFwdBlockQ), Qt);
  T* S = ws.s.grow(kFwdBlockQ * kFwdBlockK);
  T* O = ws.o.grow(kFwdBlockQ * Dp);
  T* m = ws.m.grow(kFwdBlockQ);
  T* l = ws.l.grow(kFwdBlockQ);
  std::fill(O, O + mq * Dp, T(0));
  std::fill(m, m + mq, neg_inf);
  std::fill(l, l + mq, T(0));

  int64_t first_key, last_key;
  rows_key_range(seg, q0, mq, &first_key, &last_key);

  for (int64_t k0 = first_key / NR * NR; k0 <= last_key; k0 += kFwdBlockK) {
    const int64_t ncols = std::min(kFwdBlockK, round_up(last_key + 1 - k0, NR));
    // S panel by panel, over the rows whose band reaches it (a causal block's diagonal panels skip the rows
    // above them; the softmax step zeroes what it does not read).
    for (int64_t j = 0; j < ncols / NR; ++j) {
      const int64_t c0 = k0 + j * NR;
      // From the micro-tile holding the first such row.
      const int64_t r0 = std::clamp<int64_t>(c0 - seg.band_hi - q0, 0, mq) / kMicroRows * kMicroRows;
      const int64_t r1 = std::clamp<int64_t>(c0 + NR - 1 - seg.band_lo - q0 + 1, r0, mq);
      gemm_panels<U, true, kMicroRows>(r1 - r0, 1, kp.head_units, Qt + r0 * kp.head_units,
                                       kp.at(kv_head - first, blk.seg, c0), NR, kp.head_units * NR,
                                       S + r0 * kFwdBlockK + j * NR, kFwdBlockK, false, Triangle::kNone, kMicroRows,
                                       sc.alpha);
    }
    for (int64_t r = 0; r < mq; ++r) {
      T* srow = S + r * kFwdBlockK;
      int64_t a, e;
      row_block_cols(seg, q0 + r, k0, ncols, &a, &e);
      if (a >= e) {
        std::fill(srow, srow + ncols, T(0));
        continue;
      }
      std::fill(srow, srow + a, T(0));
      std::fill(srow + e, srow + ncols, T(0));
      online_softmax_step(srow + a, e - a, m[r], l[r], O + r * Dp, Dp);
    }
    // O += P V over the block's real keys: [mq, nvalid] @ [nvalid, Dp], each row tile over the columns the band
    // gives its rows: a causal diagonal's upper triangle was 5% of P V at N = 2048 (causal forward side by side,
    // AVX-512 EPYC: 1.07x at N = 128..512, 1.03x at N = 1024).
    const int64_t nvalid = std::min(ncols, seg.len_k - k0);
    gemm_head_cols<T, false, kFwdBlockK>(mq, Dp, nvalid, S, vp.at(kv_head, first, seg.k_start + k0), vp.ldb(), O,
                                         Dp, true, vp.panel_stride(),
                                         ABand{q0 + seg.band_lo - k0, q0 + seg.band_hi - k0});
  }

  const int64_t row0 = (b * p.heads + h) * p.len_q + seg.q_start + q0;
  for (int64_t r = 0; r < mq; ++r) {
    T* orow = out + b * p.o.b + h * p.o.h + (seg.q_start + q0 + r) * p.o.n;
    // Empty by the band, never by the sum: NaN and inf scores propagate as in the reference.
    int64_t first, last;
    row_key_range(seg, q0 + r, &first, &last);
    if (first <= last) {
      const T inv = T(1) / l[r];
      for (int64_t d = 0; d < D; ++d) orow[d] = O[r * Dp + d] * inv;
      lse[row0 + r] = row_lse(m[r], l[r]);
    } else {
      std::fill(orow, orow + D, T(0));
      lse[row0 + r] = neg_inf;
    }
  }
}

// Decode: a few queries against a long KV cache. The GEMM path would pack
// all of K (a copy as large as the cache) for micro-tiles mostly empty of
// rows; instead each task reads its keys in place, scores every query row of
// a GQA group by dot products, and keeps the online softmax of its split of
// the keys; the splits (enough tasks for every thread even when B x Hkv is
// small) are merged by their (max, sum) afterwards.
constexpr int64_t kDecodeMaxRows = 16;      // query rows of a GQA group (heads per kv head x queries)
constexpr int64_t kDecodeMinKeys = 1024;     // below, the GEMM path is as fast
constexpr int64_t kDecodeMinElems = 1 << 20;  // K elements of a head from which reading K and V dominates
constexpr int64_t kDecodeBlock = 64;         // keys scored per online-softmax step

// One or two rows leave the GEMM micro-tiles nearly empty; up to 16 rows the
// dot products pay off once K and V no longer fit in cache (measured, bench
// decode rows).
inline bool use_decode(const AttentionProblem& p) {
  if (p.segments.size() != 1 || p.segments[0].len_k < kDecodeMinKeys) return false;
  const int64_t rows = p.heads / p.kv_heads * p.segments[0].len_q;
  return rows <= 2 || (rows <= kDecodeMaxRows && p.segments[0].len_k * p.head_dim >= kDecodeMinElems);
}

// The partial softmax state of every (batch, kv head, split) and query row of its group.
template <typename T>
struct DecodeParts {
  int64_t rows, splits;
  Buffer<T> m, l, o;  // [bhk][split][row], and o [..][row][D]
};

template <typename In, typename T = acc_t<In>>
void decode_split(const AttentionProblem& p, const In* q, const In* k, const In* v, int64_t b, int64_t hk,
                  int64_t k_lo, int64_t k_hi, T* m, T* l, T* o) {
  const Segment& seg = p.segments[0];
  const int64_t D = p.head_dim, nq = seg.len_q, group = p.heads / p.kv_heads, rows = group * nq;
  const T sc = T(p.scale * kLog2e), neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> qs(rows * D), s(rows * kDecodeBlock);
  for (int64_t r = 0; r < rows; ++r) {
    const In* qr = q + b * p.q.b + (hk * group + r / nq) * p.q.h + (seg.q_start + r % nq) * p.q.n;
    for (int64_t d = 0; d < D; ++d) qs[r * D + d] = to_acc(qr[d]) * sc;
  }
  std::fill(m, m + rows, neg_inf);
  std::fill(l, l + rows, T(0));
  std::fill(o, o + rows * D, T(0));
  const In* kb = k + b * p.k.b + hk * p.k.h + seg.k_start * p.k.n;
  const In* vb = v + b * p.v.b + hk * p.v.h + seg.k_start * p.v.n;
  for (int64_t j0 = k_lo; j0 < k_hi; j0 += kDecodeBlock) {
    const int64_t n = std::min(kDecodeBlock, k_hi - j0);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < rows; ++r) s[r * kDecodeBlock + j] = dot(qs.data() + r * D, kb + (j0 + j) * p.k.n, D);
    for (int64_t r = 0; r < rows; ++r) {
      int64_t a, e;
      row_block_cols(seg, r % nq, j0, n, &a, &e);
      if (a >= e) continue;
      T* srow = s.data() + r * kDecodeBlock;
      online_softmax_step(srow + a, e - a, m[r], l[r], o + r * D, D);
      for (int64_t j = a; j < e; ++j) axpy(srow[j], vb + (j0 + j) * p.v.n, o + r * D, D);
    }
  }
}

template <typename In, typename T = acc_t<In>>
void decode_forward(const AttentionProblem& p, const In* q, const In* k, const In* v, T* out, T* lse) {
  const Segment& seg = p.segments[0];
  const int64_t D = p.head_dim, nq = seg.len_q, group = p.heads / p.kv_heads, rows = group * nq;
  const int64_t tasks = p.batch * p.kv_heads;
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * p.num_threads, tasks), 1, seg.len_k / kDecodeBlock);
  const int64_t split_len = round_up(ceil_div(seg.len_k, splits), kDecodeBlock);
  DecodeParts<T> parts{rows, splits, Buffer<T>(tasks * splits * rows), Buffer<T>(tasks * splits * rows),
                       Buffer<T>(tasks * splits * rows * D)};
  parallel_region(p.num_threads, [&] {
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t part = t * splits + sp;
        decode_split(p, q, k, v, t / p.kv_heads, t % p.kv_heads, sp * split_len,
                     std::min(seg.len_k, (sp + 1) * split_len), parts.m.data() + part * rows,
                     parts.l.data() + part * rows, parts.o.data() + part * rows * D);
      }
  });
  const T neg_inf = -std::numeric_limits<T>::infinity();
  parallel_region(p.num_threads, [&] {
#pragma omp for collapse(2)
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t b = t / p.kv_heads, h = t % p.kv_heads * group + r / nq, i = r % nq;
        T* orow = out + b * p.o.b + h * p.o.h + (seg.q_start + i) * p.o.n;
        T* lrow = lse + (b * p.heads + h) * p.len_q + seg.q_start + i;
        int64_t first, last;
        row_key_range(seg, i, &first, &last);
        if (first > last) {  // empty by the band
          std::fill(orow, orow + D, T(0));
          *lrow = neg_inf;
          continue;
        }
        T top = neg_inf;
        for (int64_t sp = 0; sp < splits; ++sp) top = max_nan(top, parts.m[(t * splits + sp) * rows + r]);
        std::fill(orow, orow + D, T(0));
        T total = 0;
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t at = (t * splits + sp) * rows + r;
          if (parts.m[at] == neg_inf) continue;  // no key of this split
          const T w = std::exp2(parts.m[at] - top);
          total += parts.l[at] * w;
          axpy(w, parts.o.data() + at * D, orow, D);
        }
        scale_inplace(orow, D, T(1) / total);
        *lrow = row_lse(top, total);
      }
  });
}

}  // namespace

template <typename In>
void attention_forward_cpu(const AttentionProblem& p, const In* q, const In* k, const In* v, acc_t<In>* out,
                           acc_t<In>* lse) {
  if (use_decode(p)) return decode_forward(p, q, k, v, out, lse);
  using T = acc_t<In>;
  const int64_t kv_total = p.batch * p.kv_heads, group = p.heads / p.kv_heads;
  const int64_t head_bytes = 2 * p.len_k * round_up(p.head_dim, Simd<T>::panel) * static_cast<int64_t>(sizeof(T));
  const int64_t chunk = std::clamp<int64_t>(kFwdChunkBytes / head_bytes, 1, kv_total);
  PanelHeads<In> kp(p, chunk);
  ValueOperand<T> vp(p, v, chunk);
  const std::vector<QueryBlock> blocks = query_blocks(p, kFwdBlockQ);
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  parallel_region(p.num_threads, [&] {
    ForwardScratch<In> ws;
    for (int64_t first = 0; first < kv_total; first += chunk) {
      const int64_t heads = std::min(chunk, kv_total - first);
      kp.pack(p, k, p.k, first, heads);
      vp.pack(p, v, first, heads);
      // A head's query blocks from the last: a causal mask's longest come first, and the short ones at the
      // chunk's end even out the threads before the next chunk.
#pragma omp for collapse(2) schedule(dynamic)
      for (int64_t t = 0; t < heads * group; ++t)
        for (int64_t i = nblocks - 1; i >= 0; --i) {
          const int64_t head = first + t / group, b = head / p.kv_heads;
          const int64_t h = head % p.kv_heads * group + t % group;
          forward_query_block(p, q, kp, vp, first, b, h, blocks[i], out, lse, ws);
        }
    }
  });
}

namespace {

template <typename T>
struct BackwardScratch {
  Buffer<T> s, dp, dk, dv, q_rows, dout_rows, dq;
};

// Per q head: Q and dO as blocks of kBwdBlockQ rows transposed in GEMM units, micro-tile by micro-tile
// (pack_transposed_tiles; A operands, Q scaled as QueryScale says), each segment starting a new block;
// lse in log2 units and delta = rowsum(dO * O) - dlse, by row of the whole axis.
template <typename In>
struct QueryPack {
  std::vector<int64_t> seg_tile;  // first tile of each segment; back(): tiles per head
  int64_t head_units;
  Buffer<gemm_unit_t<In>> qt, doutt;
  Buffer<acc_t<In>> lse2, delta;

  // Offset of the tile holding local rows [q0, q0 + kBwdBlockQ) of segment seg of head bh in qt, doutt.
  int64_t tile(int64_t bh, int64_t seg, int64_t q0) const {
    return (bh * seg_tile.back() + seg_tile[seg] + q0 / kBwdBlockQ) * head_units * kBwdBlockQ;
  }
};

template <typename In, typename T = acc_t<In>>
QueryPack<In> pack_queries(const AttentionProblem& p, const In* q, const T* out, const In* dout, Strides4 ds,
                           const T* lse, const T* dlse) {
  using U = gemm_unit_t<In>;
  QueryPack<In> qp;
  const int64_t D = p.head_dim, Nq = p.len_q, heads = p.batch * p.heads;
  const int64_t nseg = static_cast<int64_t>(p.segments.size());
  qp.seg_tile.assign(nseg + 1, 0);
  for (int64_t s = 0; s < nseg; ++s) qp.seg_tile[s + 1] = qp.seg_tile[s] + ceil_div(p.segments[s].len_q, kBwdBlockQ);
  qp.head_units = units<U>(D);
  const QueryScale<U> sc(p.scale);
  qp.qt = Buffer<U>(heads * qp.seg_tile.back() * qp.head_units * kBwdBlockQ);
  qp.doutt = Buffer<U>(heads * qp.seg_tile.back() * qp.head_units * kBwdBlockQ);
  qp.lse2 = Buffer<T>(heads * Nq);
  qp.delta = Buffer<T>(heads * Nq);
  parallel_region(p.num_threads, [&] {
    Buffer<U> scratch(qp.head_units * kBwdBlockQ);
#pragma omp for collapse(3)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.heads; ++h)
        for (int64_t s = 0; s < nseg; ++s) {
          const Segment& seg = p.segments[s];
          const int64_t bh = b * p.heads + h;
          const In* qh = q + b * p.q.b + h * p.q.h + seg.q_start * p.q.n;
          const In* gh = dout + b * ds.b + h * ds.h + seg.q_start * ds.n;
          for (int64_t q0 = 0; q0 < seg.len_q; q0 += kBwdBlockQ) {
            const int64_t rows = std::min(kBwdBlockQ, seg.len_q - q0);
            pack_transposed_tiles<kMicroRows>(qh + q0 * p.q.n, rows, D, p.q.n, sc.pack, scratch.data(),
                                              qp.qt.data() + qp.tile(bh, s, q0));
            pack_transposed_tiles<kMicroRows>(gh + q0 * ds.n, rows, D, ds.n, T(1), scratch.data(),
                                              qp.doutt.data() + qp.tile(bh, s, q0));
          }
          for (int64_t i = 0; i < seg.len_q; ++i) {
            const int64_t row = bh * Nq + seg.q_start + i;
            const T* o = out + b * p.o.b + h * p.o.h + (seg.q_start + i) * p.o.n;
            const In* g = gh + i * ds.n;
            qp.delta[row] = dot(o, g, D) - (dlse ? dlse[row] : T(0));
            // A row without keys (by the band, not by its lse: a NaN or inf row must stay NaN) has
            // P = 0: +inf makes exp2 give 0.
            int64_t first, last;
            row_key_range(seg, i, &first, &last);
            qp.lse2[row] = first > last ? std::numeric_limits<T>::infinity() : T(lse[row] * kLog2e);
          }
        }
  });
  return qp;
}

// The B operands of the backward's row-major GEMMs: K's rows (dQ = dS K), and Q and dO (dK = dS^T Q,
// dV = P^T dO), whose rows block_rows gives a query block at a time.
template <typename In>
struct BackwardRows {
  const In *q, *dout;
  Strides4 q_st, dout_st;
  RowOperand<acc_t<In>> k;
};

// A B operand of gemm_head_cols: rows ldb apart, panels panel_stride apart.
template <typename T>
struct RowsB {
  const T* b;
  int64_t ldb, panel_stride;
};

// Rows [0, n) of x (row stride ld, D values), n <= kBwdBlockQ, as the B operand of dK's or dV's GEMM: as they
// lie where they are rows of head_cols(D) values of type T and kCopy is false, else converted and padded into
// buf (kBwdBlockQ * head_cols(D) values) as row panels of kBwdBlockQ rows (one-vector rows where D fits in
// one). Long heads copy (kCopy): their rows come from L3, and read in place, a panel's rows (a line of each,
// in few L1 sets) missed inside the micro-kernels' loops.
template <bool kCopy, typename In, typename T>
RowsB<T> block_rows(const In* x, int64_t n, int64_t D, int64_t ld, T* buf) {
  constexpr int64_t W = Simd<T>::width, NR = Simd<T>::panel;
  const int64_t Dp = head_cols<T>(D);
  if constexpr (!kCopy && std::is_same_v<In, T>) {
    if (Dp == D) return {x, ld, NR};
  }
  if (Dp == W) {
    pack_rows_padded(x, n, D, ld, buf, W);
    return {buf, W, NR};
  }
  pack_row_panels(x, n, D, ld, buf, kBwdBlockQ);
  return {buf, NR, kBwdBlockQ * NR};
}

// One key block of one (batch, kv head): accumulates its dK, dV over every q
// head of the group and every query block that sees it, and adds dS K into
// the split's dQ accumulator. Long heads (kBlockK = kBwdLongBlockK) copy each
// query block's Q and dO rows (block_rows) and add dS K to dQ from scratch:
// their rows come from L3, and accumulated in place, dQ's missed inside the
// micro-kernel's loop.
template <int64_t kBlockK, typename In, typename T = acc_t<In>>
void backward_key_block(const AttentionProblem& p, const QueryPack<In>& qp, const PanelHeads<In>& kp,
                        const PanelHeads<In>& vp, const BackwardRows<In>& rows, int64_t b, int64_t hk, int64_t s,
                        int64_t k0, T* dq_acc, Strides4 dq_st, T* dk, T* dv, BackwardScratch<T>& ws) {
  using U = gemm_unit_t<In>;
  constexpr int NR = Simd<T>::panel;
  const Segment& seg = p.segments[s];  // k0 and every query and key index below are local to it
  const int64_t D = p.head_dim, Dp = head_cols<T>(D), Nq = p.len_q;
  const int64_t nk = std::min(kBlockK, seg.len_k - k0);
  const int64_t ncols = round_up(nk, NR);
  const int64_t group = p.heads / p.kv_heads, kv_head = b * p.kv_heads + hk;
  const T scale = T(p.scale);
  const QueryScale<U> sc(p.scale);
  const int64_t Du = kp.head_units;
  constexpr bool kLong = kBlockK == kBwdLongBlockK;

  T* P = ws.s.grow(kBwdBlockQ * kBlockK);
  T* dS = ws.dp.grow(kBwdBlockQ * kBlockK);
  T* dK = ws.dk.grow(kBlockK * Dp);
  T* dV = ws.dv.grow(kBlockK * Dp);
  T* Qr = ws.q_rows.grow(kBwdBlockQ * Dp);
  T* dOr = ws.dout_rows.grow(kBwdBlockQ * Dp);
  T* dQb = kLong ? ws.dq.grow(kBwdBlockQ * Dp) : nullptr;
  std::fill(dK, dK + ncols * Dp, T(0));
  std::fill(dV, dV + ncols * Dp, T(0));

  // Queries that see any key of [k0, k0 + nk).
  const int64_t i_first = std::max<int64_t>(0, k0 - seg.band_hi);
  const int64_t i_last = std::min<int64_t>(seg.len_q - 1, k0 + nk - 1 - seg.band_lo);

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = b * p.heads + h;
    const T* lse2 = qp.lse2.data() + bh * Nq + seg.q_start;
    const T* delta = qp.delta.data() + bh * Nq + seg.q_start;
    T* dQh = dq_acc + b * dq_st.b + h * dq_st.h + seg.q_start * dq_st.n;
    for (int64_t q0 = i_first / kBwdBlockQ * kBwdBlockQ; q0 <= i_last; q0 += kBwdBlockQ) {
      const int64_t mq = std::min(kBwdBlockQ, i_last + 1 - q0);
      // The block's columns [c0, c1) that some row of these queries sees, in whole panels: a causal or
      // windowed block's edge panels are skipped for the query blocks they are masked from.
      int64_t first, last;
      rows_key_range(seg, q0, mq, &first, &last);
      const int64_t c0 = std::max<int64_t>(first - k0, 0) / NR * NR;
      const int64_t c1 = std::min(ncols, round_up(last + 1 - k0, NR));
      const int64_t nc = c1 - c0, nkc = std::min(c1, nk) - c0;  // columns, and real keys among them
      // S (log2 units) = Q K^T * scale * log2 e and dP = dO V^T: [mq, D] @ [D, nc]
      gemm_panels<U, true, kMicroRows>(mq, nc / NR, Du, qp.qt.data() + qp.tile(bh, s, q0),
                                       kp.at(kv_head, s, k0 + c0), NR, Du * NR, P + c0, kBlockK, false,
                                       Triangle::kNone, kMicroRows, sc.alpha);
      gemm_panels<U, true, kMicroRows>(mq, nc / NR, Du, qp.doutt.data() + qp.tile(bh, s, q0),
                                       vp.at(kv_head, s, k0 + c0), NR, Du * NR, dS + c0, kBlockK, false);
      for (int64_t r = 0; r < mq; ++r) {
        const int64_t i = q0 + r;
        T* prow = P + r * kBlockK;
        T* dsrow = dS + r * kBlockK;
        int64_t a, e;
        row_block_cols(seg, i, k0, nk, &a, &e);
        if (a >= e) {
          std::fill(prow + c0, prow + c1, T(0));
          std::fill(dsrow + c0, dsrow + c1, T(0));
          continue;
        }
        std::fill(prow + c0, prow + a, T(0));
        std::fill(prow + e, prow + c1, T(0));
        exp2_shifted_sum(prow + a, e - a, lse2[i]);
        // dS = P * (dP - delta) * scale; zero wherever P is.
        for (int64_t c = c0; c < c1; ++c) dsrow[c] = prow[c] * (dsrow[c] - delta[i]) * scale;
      }
      // dV += P^T dO, dK += dS^T Q: [nc, mq] @ [mq, Dp]
      const int64_t qrow = seg.q_start + q0;
      const RowsB<T> dout_b = block_rows<kLong>(
          rows.dout + b * rows.dout_st.b + h * rows.dout_st.h + qrow * rows.dout_st.n, mq, D, rows.dout_st.n, dOr);
      const RowsB<T> q_b =
          block_rows<kLong>(rows.q + b * rows.q_st.b + h * rows.q_st.h + qrow * rows.q_st.n, mq, D, rows.q_st.n, Qr);
      // Each row tile over the columns the band gives its rows (P^T's and dS^T's rows are keys), skipping a causal
      // diagonal's zero triangle: causal forward+backward side by side 1.07x at N = 128, 1.05x at N = 256..512,
      // 1.02-1.03x at N = 1024..2048 (AVX-512 EPYC).
      const ABand keys_band{k0 + c0 - seg.band_hi - q0, k0 + c0 - seg.band_lo - q0};
      gemm_head_cols<T, true, kBlockK>(nc, Dp, mq, P + c0, dout_b.b, dout_b.ldb, dV + c0 * Dp, Dp, true,
                                       dout_b.panel_stride, keys_band);
      gemm_head_cols<T, true, kBlockK>(nc, Dp, mq, dS + c0, q_b.b, q_b.ldb, dK + c0 * Dp, Dp, true, q_b.panel_stride,
                                       keys_band);
      // dQ += dS K over the real keys: [mq, nkc] @ [nkc, Dp]
      const T* k_rows = rows.k.row(b, hk, seg.k_start + k0 + c0);
      T* dq_rows = dQh + q0 * dq_st.n;
      const ABand queries_band{q0 + seg.band_lo - k0 - c0, q0 + seg.band_hi - k0 - c0};
      if constexpr (kLong) {
        gemm_head_cols<T, false, kBlockK>(mq, Dp, nkc, dS + c0, k_rows, rows.k.ld, dQb, Dp, false, Simd<T>::panel,
                                          queries_band);
        for (int64_t r = 0; r < mq; ++r) axpy(T(1), dQb + r * Dp, dq_rows + r * dq_st.n, Dp);
      } else {
        gemm_head_cols<T, false, kBlockK>(mq, Dp, nkc, dS + c0, k_rows, rows.k.ld, dq_rows, dq_st.n, true,
                                          Simd<T>::panel, queries_band);
      }
    }
  }

  const int64_t row0 = b * p.g.b + hk * p.g.h + (seg.k_start + k0) * p.g.n;
  for (int64_t r = 0; r < nk; ++r) {
    for (int64_t d = 0; d < D; ++d) {
      dk[row0 + r * p.g.n + d] = dK[r * Dp + d];
      dv[row0 + r * p.g.n + d] = dV[r * Dp + d];
    }
  }
}

}  // namespace

template <typename In, typename T>
void attention_backward_cpu(const AttentionProblem& p, const In* q, const In* k, const In* v, const T* out,
                            const In* dout, Strides4 dout_strides, const T* lse, const T* dlse, T* dq, T* dk,
                            T* dv) {
  const QueryPack<In> qp = pack_queries(p, q, out, dout, dout_strides, lse, dlse);
  const PanelHeads<In> kp(p, k, p.k), vp(p, v, p.v);
  const BackwardRows<In> rows{q, dout, p.q, dout_strides, RowOperand<T>(p, k, p.k, p.kv_heads, p.len_k)};
  const int64_t nseg = static_cast<int64_t>(p.segments.size());
  const int64_t tasks = p.batch * p.kv_heads * nseg;

  const int64_t D = p.head_dim, Dp = head_cols<T>(D), Nq = p.len_q;
  int64_t longest_q = 0;
  for (const Segment& seg : p.segments) longest_q = std::max(longest_q, seg.len_q);
  const bool long_head = longest_q * Dp * static_cast<int64_t>(sizeof(T)) >= kBwdLongHeadBytes;
  const int64_t block_k = long_head ? kBwdLongBlockK : kBwdBlockK;
  // Split the key blocks of a segment's head across tasks only when there are
  // too few (head, segment) pairs to keep every thread busy.
  int64_t nkb = 1;
  for (const Segment& seg : p.segments) nkb = std::max(nkb, ceil_div(seg.len_k, block_k));
  const int64_t nsplit = std::clamp<int64_t>(ceil_div(4 * p.num_threads, tasks), 1, nkb);
  // Each split accumulates its own dQ: split 0 into dq itself where its rows hold whole panels (Dp == D),
  // the others (all of them otherwise) into rows of Dp in dq_acc, added to dq in split order afterwards.
  const bool direct = Dp == D;
  const int64_t acc_splits = nsplit - direct, dq_size = p.batch * p.heads * Nq * Dp;
  const Strides4 acc_st{p.heads * Nq * Dp, Nq * Dp, Dp};
  Buffer<T> dq_acc(acc_splits * dq_size);
  const int64_t dq_rows = p.batch * p.heads * Nq;
  auto dq_row = [&](int64_t r) {
    return dq + r / (p.heads * Nq) * p.o.b + r / Nq % p.heads * p.o.h + r % Nq * p.o.n;
  };
  parallel_region(p.num_threads, [&] {
    if (direct) {
#pragma omp for nowait
      for (int64_t r = 0; r < dq_rows; ++r) std::fill(dq_row(r), dq_row(r) + D, T(0));
    }
#pragma omp for
    for (int64_t r = 0; r < acc_splits * dq_rows; ++r)
      std::fill(dq_acc.data() + r * Dp, dq_acc.data() + (r + 1) * Dp, T(0));
  });

  parallel_region(p.num_threads, [&] {
    BackwardScratch<T> ws;
#pragma omp for collapse(4) schedule(dynamic)
    for (int64_t split = 0; split < nsplit; ++split)
      for (int64_t b = 0; b < p.batch; ++b)
        for (int64_t s = 0; s < nseg; ++s)
          for (int64_t hk = 0; hk < p.kv_heads; ++hk) {
            const bool to_dq = direct && split == 0;
            T* target = to_dq ? dq : dq_acc.data() + (split - direct) * dq_size;
            const Strides4 target_st = to_dq ? p.o : acc_st;
            // Interleaved key blocks balance causal masks across splits.
            for (int64_t k0 = split * block_k; k0 < p.segments[s].len_k; k0 += nsplit * block_k) {
              if (long_head)
                backward_key_block<kBwdLongBlockK>(p, qp, kp, vp, rows, b, hk, s, k0, target, target_st, dk, dv, ws);
              else
                backward_key_block<kBwdBlockK>(p, qp, kp, vp, rows, b, hk, s, k0, target, target_st, dk, dv, ws);
            }
          }
  });

  if (acc_splits == 0) return;
  parallel_region(p.num_threads, [&] {
#pragma omp for
    for (int64_t r = 0; r < dq_rows; ++r) {
      T* row = dq_row(r);
      for (int64_t d = 0; d < D; ++d) {
        T acc = direct ? row[d] : T(0);
        for (int64_t s = 0; s < acc_splits; ++s) acc += dq_acc[s * dq_size + r * Dp + d];
        row[d] = acc;
      }
    }
  });
}

#define TESSEL_ATTENTION_INSTANCES(In)                                                                     \
  template void attention_forward_cpu<In>(const AttentionProblem&, const In*, const In*, const In*, acc_t<In>*,  \
                                          acc_t<In>*);                                                          \
  template void attention_backward_cpu<In>(const AttentionProblem&, const In*, const In*, const In*,            \
                                           const acc_t<In>*, const In*, Strides4, const acc_t<In>*,            \
                                           const acc_t<In>*, acc_t<In>*, acc_t<In>*, acc_t<In>*);
TESSEL_ATTENTION_INSTANCES(float)
TESSEL_ATTENTION_INSTANCES(double)
TESSEL_ATTENTION_INSTANCES(Bf16)
TESSEL_ATTENTION_INSTANCES(Half)
#undef TESSEL_ATTENTION_INSTANCES

}  // namespace tessel
