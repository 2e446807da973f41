// Op 1 (docs/math.md): squared L2 norm of every segment of every row, in one pass over x.
// Stage 1: one block per (piece, row) reduces x^2 over its piece (at most kPieceChunk elements of one segment)
// with 16-byte loads; stage 2: one thread per (row, segment) adds its pieces' partials in piece order.
#include "cuda/common.cuh"

namespace modfuse::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) pieces_kernel(const T* __restrict__ x, int64_t D,
                                                          const int64_t* __restrict__ pieces, int64_t W,
                                                          acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  const int64_t w = blockIdx.x, r = blockIdx.y;
  const int64_t begin = pieces[3 * w + 1], end = pieces[3 * w + 2];
  const A s = block_sum(thread_sum_sq<T, A>(x + r * D + begin, end - begin), shared);
  if (threadIdx.x == 0) partial[r * W + w] = s;
}

template <typename A>
__global__ void combine_kernel(const A* __restrict__ partial, int64_t W, const int64_t* __restrict__ first,
                               int64_t R, int64_t P, A* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= R * P) return;
  const int64_t r = i / P, p = i % P;
  A s = A(0);
  for (int64_t w = first[p]; w < first[p + 1]; ++w) s += partial[r * W + w];  // piece order: deterministic
  out[i] = s;
}

}  // namespace

int segment_sq_norms(const void* x, DType t, int64_t R, int64_t D, const int64_t* pieces, int64_t W,
                     const int64_t* first, int64_t P, void* out, void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    if (W > 0 && R > 0) {
      // gridDim.y is limited to 65535 rows per launch: walk the rows in slices
      for (int64_t r0 = 0; r0 < R; r0 += 65535) {
        const int64_t rows = R - r0 < 65535 ? R - r0 : 65535;
        pieces_kernel<T><<<dim3(static_cast<unsigned>(W), static_cast<unsigned>(rows)), kThreads, 0, s>>>(
            static_cast<const T*>(x) + r0 * D, D, pieces, W, static_cast<A*>(workspace) + r0 * W);
      }
    }
    if (R * P > 0) {
      combine_kernel<A><<<static_cast<unsigned>((R * P + 255) / 256), 256, 0, s>>>(
          static_cast<const A*>(workspace), W, first, R, P, static_cast<A*>(out));
    }
    return to_int(cudaGetLastError());
  });
}

}  // namespace modfuse::cuda
