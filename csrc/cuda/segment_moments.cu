// Op 7 (docs/math.md): per-segment sum and sum of squares of every row, accumulated in float64, in one pass over x.
// Stage 1: one block per (piece, row) reduces its piece (at most kPieceChunk elements of one segment); stage 2:
// one thread per (row, segment) adds its pieces' partials in piece order (deterministic, no atomics).
#include "cuda/common.cuh"

namespace modfuse::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) pieces_kernel(const T* __restrict__ x, int64_t D,
                                                          const int64_t* __restrict__ pieces, int64_t W,
                                                          double* __restrict__ partial) {
  __shared__ double shared[32];
  const int64_t w = blockIdx.x, r = blockIdx.y;
  const int64_t begin = pieces[3 * w + 1], end = pieces[3 * w + 2];
  const T* p = x + r * D;
  double s1 = 0, s2 = 0;
  for (int64_t d = begin + threadIdx.x; d < end; d += blockDim.x) {
    const double v = to_acc<double>(p[d]);
    s1 += v;
    s2 += v * v;
  }
  s1 = block_sum(s1, shared);
  s2 = block_sum(s2, shared);
  if (threadIdx.x == 0) {
    partial[2 * (r * W + w)] = s1;
    partial[2 * (r * W + w) + 1] = s2;
  }
}

__global__ void combine_kernel(const double* __restrict__ partial, int64_t W, const int64_t* __restrict__ first,
                               int64_t R, int64_t P, double* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R * P) return;
  const int64_t r = i / P, p = i % P;
  double s1 = 0, s2 = 0;
  for (int64_t w = first[p]; w < first[p + 1]; ++w) {  // piece order: deterministic
    s1 += partial[2 * (r * W + w)];
    s2 += partial[2 * (r * W + w) + 1];
  }
  out[2 * i] = s1;
  out[2 * i + 1] = s2;
}

}  // namespace

int segment_moments(const void* x, DType t, int64_t R, int64_t D, const int64_t* pieces, int64_t W,
                    const int64_t* first, int64_t P, void* out, void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    if (W > 0 && R > 0) {
      // gridDim.y is limited to 65535 rows per launch: walk the rows in slices
      for (int64_t r0 = 0; r0 < R; r0 += 65535) {
        const int64_t rows = R - r0 < 65535 ? R - r0 : 65535;
        pieces_kernel<T><<<dim3(static_cast<unsigned>(W), static_cast<unsigned>(rows)), kThreads, 0, s>>>(
            static_cast<const T*>(x) + r0 * D, D, pieces, W, static_cast<double*>(workspace) + 2 * r0 * W);
      }
    }
    if (R * P > 0) {
      combine_kernel<<<static_cast<unsigned>((R * P + 255) / 256), 256, 0, s>>>(
          static_cast<const double*>(workspace), W, first, R, P, static_cast<double*>(out));
    }
    return to_int(cudaGetLastError());
  });
}

}  // namespace modfuse::cuda
