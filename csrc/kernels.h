// Launch declarations of modfuse's kernels: plain pointers and sizes, no tensors, so the same entry points
// serve the CPU kernels (csrc/cpu/<op>.cpp) and, with a stream argument, the CUDA ones (csrc/cuda/<op>.cu).
// Every pointer is to contiguous memory; `acc_t<T>` is float for float/half/bfloat16 and double for double.
// Reductions use fixed chunks and combine them in chunk order, so results do not depend on the thread count.
#pragma once
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace modfuse {

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

namespace cpu {

// Op 1: out[r * P + p] = sum of x[r, d]^2 over segment p.
template <typename T>
void segment_sq_norms(const T* x, int64_t R, int64_t D, const int64_t* offsets, int64_t P, acc_t<T>* out);

// Op 1b: out[p] = sum of data[p][0, lengths[p])^2, for P tensors where they are.
template <typename T>
void tensor_sq_norms(const T* const* data, const int64_t* lengths, int64_t P, acc_t<T>* out);

// Op 2: S1 = sum_k G[:, k, :], S2 = sum_k G[:, k, :]^2 (banks in acc_t<T>); the accumulate form adds g[M, D].
template <typename T>
void moments(const T* G, int64_t M, int64_t K, int64_t D, acc_t<T>* S1, acc_t<T>* S2);
template <typename T, typename B>
void moments_accumulate(B* S1, B* S2, const T* g, int64_t n);

// Op 4, moments form: n[M] counts; out[D], optional uncertainty[D] (nullptr to skip), stats[M * 4].
template <typename T>
void calibrated_aggregate(const T* S1, const T* S2, const acc_t<T>* n, int64_t M, int64_t D, acc_t<T> kappa,
                          acc_t<T> eps, acc_t<T> evidence_max, T* out, T* uncertainty, acc_t<T>* stats);
// Op 4, samples form: G[M, K, D] read once, two-pass variance per chunk in cache.
template <typename T>
void calibrated_aggregate_samples(const T* G, int64_t M, int64_t K, int64_t D, acc_t<T> kappa, acc_t<T> eps,
                                  acc_t<T> evidence_max, T* out, T* uncertainty, acc_t<T>* stats);

// Op 5: out[R, R] = X X^T.
template <typename T>
void gram(const T* X, int64_t R, int64_t D, T* out);

// Op 6: out[D] = sum_r w_r X_r; w has R values (w_per_element = false) or R * D values (true).
template <typename T, typename W>
void weighted_sum(const T* X, const W* w, bool w_per_element, int64_t R, int64_t D, T* out);
// x[d] = x[d] * scale[p] + z_d * noise_std[p] in segment p, z_d = philox::normal(seed, offset + d)
// (csrc/philox_normal.h); noise_std may be nullptr (no noise).
template <typename T>
void segment_scale(T* x, int64_t D, const int64_t* offsets, int64_t P, const acc_t<T>* scale,
                   const acc_t<T>* noise_std, uint64_t seed, uint64_t offset);
// Op 7: out[(r * P + p) * 2 + {0, 1}] = sum of x[r, d] and of x[r, d]^2 over segment p, in float64.
template <typename T>
void segment_moments(const T* x, int64_t R, int64_t D, const int64_t* offsets, int64_t P, double* out);

}  // namespace cpu
}  // namespace modfuse
