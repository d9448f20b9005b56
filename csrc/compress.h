// Low-rank gradient compression on the CPU (PowerSGD-style): the passes over
// gradients, and Gram-Schmidt on the factors.
#pragma once

#include <cstdint>

namespace tessel {

// One gradient matrix of a bucket and its factors. M = grad + error (error
// null: M = grad) is never stored: each pass forms it on the fly, so the
// error buffer changes only in the last pass. Factors are kept transposed,
// pt: (rank, n) and qt: (rank, m), each vector contiguous, so that
// M ~ pt^T qt.
template <typename T>
struct CompressItem {
  T* grad;   // (n, m) contiguous; overwritten with the decompressed gradient by reconstruct
  T* error;  // (n, m) contiguous or null
  int64_t n, m;
  int64_t p_offset, q_offset;  // of pt, qt within the flat factor buffers
};

// pt = (M qt^T)^T for every item.
template <typename T>
void compress_project_p(const CompressItem<T>* items, int64_t count, int64_t rank, T* p, const T* q,
                        int num_threads);

// qt = (M^T pt^T)^T for every item.
template <typename T>
void compress_project_q(const CompressItem<T>* items, int64_t count, int64_t rank, const T* p, T* q,
                        int num_threads);

// grad = pt_out^T qt_out; with an error buffer, error = M - pt_err^T qt_err
// (the part of M this worker's factors did not carry).
template <typename T>
void compress_reconstruct(const CompressItem<T>* items, int64_t count, int64_t rank, const T* p_out, const T* q_out,
                          const T* p_err, const T* q_err, int num_threads);

// Gram-Schmidt with reorthogonalisation on `rank` vectors of length
// lengths[i] starting at buf + offsets[i], for every i: vector j at
// + j * vector_stride (0: the length, i.e. vectors stored one after another),
// element e at + e * element_stride. Each v_j has its projections on the
// earlier vectors removed twice ("twice is enough": one pass leaves a
// dependent vector's rounding noise far from orthogonal), then
// v_j /= (|v_j| + eps), the norm computed without overflow or underflow; a
// zero vector stays zero. Covers the factors (vectors contiguous) and a
// (m, r) matrix's columns (vector_stride 1, element_stride r).
template <typename T>
void orthonormalize(T* buf, const int64_t* offsets, const int64_t* lengths, int64_t count, int64_t rank,
                    int64_t vector_stride, int64_t element_stride, double eps, int num_threads);

}  // namespace tessel
