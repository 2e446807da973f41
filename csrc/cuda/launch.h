// Launchers of modfuse's CUDA kernels (csrc/cuda/<op>.cu). Plain C++: no torch and no CUDA headers, so the
// tensor wrappers (csrc/cuda_ops.cpp) and the kernels meet only through pointers, sizes, a dtype code and a
// stream (a cudaStream_t passed as void*). Every pointer is to contiguous device memory unless it says host.
// Each launcher returns the cudaError_t of its launches as an int (0 = success).
//
// Accumulation: float32 for float32/float16/bfloat16 inputs, float64 for float64 ("acc" below).
// Reductions are two-stage and deterministic: fixed per-block partials, combined in block order by a second
// kernel (no atomics), so results are bit-identical from run to run on the same device and grid.
// Indexing is 64-bit throughout.
#pragma once
#include <cstdint>

namespace modfuse::cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

inline int64_t acc_bytes(DType t) { return t == DType::f64 ? 8 : 4; }

// Segment ops cut each segment into pieces of at most kPieceChunk elements (one block each; the host builds the
// (segment, begin, end) table with cpu::segment_blocks), so big segments spread over many blocks. pieces is that
// table [W, 3] on the device; first[p] is the first piece of segment p (first[P] = W). An empty segment has none.
constexpr int64_t kPieceChunk = 16384;  // elements per piece (64 KB of float32)

// Op 1: out[R, P] (acc) = sum of x[r, d]^2 over segment p, over the pieces [W, 3] and first [P + 1] above;
// workspace holds R * W acc values.
int segment_sq_norms(const void* x, DType t, int64_t R, int64_t D, const int64_t* pieces, int64_t W,
                     const int64_t* first, int64_t P, void* out, void* workspace, void* stream);

// Op 1b: out[P] (acc) = sum of squares of each of P tensors of dtype t, read in place. table [W, 2] on the device:
// (address, length) of every piece (at most kPieceChunk elements of one tensor, a tensor's pieces consecutive);
// first[p] is tensor p's first piece (first[P] = W); workspace holds W acc values.
int tensor_sq_norms(const int64_t* table, int64_t W, const int64_t* first, int64_t P, DType t, void* out,
                    void* workspace, void* stream);

// Op 2: S1, S2 [M, D] (acc) = sums over k of G[M, K, D] and of its squares.
int moments(const void* G, DType t, int64_t M, int64_t K, int64_t D, void* S1, void* S2, void* stream);
// S1 += g, S2 += g^2 over n elements; banks are float32 or float64 (bank), g any dtype t.
int moments_accumulate(void* S1, void* S2, DType bank, const void* g, DType t, int64_t n, void* stream);

// Op 4, moments form: S1, S2 [M, D] in t, n [M] (acc, device), out [D] in t, uncertainty [D] in t or nullptr,
// stats [M, 4] (acc). workspace: calibrated_aggregate_workspace(M, D, t) bytes.
int64_t calibrated_aggregate_workspace(int64_t M, int64_t D, DType t);
int calibrated_aggregate(const void* S1, const void* S2, const void* n, DType t, int64_t M, int64_t D, double kappa,
                         double eps, double evidence_max, void* out, void* uncertainty, void* stats, void* workspace,
                         void* stream);
// Op 4, samples form: G [M, K, D] in t (2 <= K <= 64), read once; same outputs and workspace size.
int calibrated_aggregate_samples(const void* G, DType t, int64_t M, int64_t K, int64_t D, double kappa, double eps,
                                 double evidence_max, void* out, void* uncertainty, void* stats, void* workspace,
                                 void* stream);

// Op 5: out [R, R] in t = X X^T (R <= 64), accumulated in acc. workspace: gram_workspace(R, D, t) bytes.
int64_t gram_workspace(int64_t R, int64_t D, DType t);
int gram(const void* X, DType t, int64_t R, int64_t D, void* out, void* workspace, void* stream);

// Op 6: out [D] in t = sum_r w_r X_r; w is [R] (acc, per_element = false) or [R, D] (t, per_element = true).
int weighted_sum(const void* X, const void* w, bool per_element, DType t, int64_t R, int64_t D, void* out,
                 void* stream);
// x [D] in t, in place: x = x * scale[p] (+ philox::normal(seed, offset + d) * noise_std[p]) over the pieces
// above; scale and noise_std [P] in acc; noise_std may be nullptr (no noise).
int segment_scale(void* x, DType t, const int64_t* pieces, int64_t W, const void* scale, const void* noise_std,
                  uint64_t seed, uint64_t offset, void* stream);

// Op 7: out [R, P, 2] float64 = per-segment sum and sum of squares of x [R, D] (accumulated in float64), over the
// pieces and first above; workspace holds 2 * R * W doubles.
int segment_moments(const void* x, DType t, int64_t R, int64_t D, const int64_t* pieces, int64_t W,
                    const int64_t* first, int64_t P, void* out, void* workspace, void* stream);

}  // namespace modfuse::cuda
