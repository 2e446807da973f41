// Op 1b (docs/math.md): squared L2 norm of every tensor of a list, read where the tensors are.
// The host cuts every tensor into pieces of at most kPieceChunk elements and uploads one device table of
// (address, length) per piece plus the first piece of each tensor. Stage 1: one block per piece reduces x^2 with
// 16-byte loads; stage 2: one thread per tensor adds its pieces' partials in piece order (deterministic).
#include "cuda/common.cuh"

namespace modfuse::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) pieces_kernel(const int64_t* __restrict__ table,
                                                          acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  const int64_t w = blockIdx.x;
  const T* p = reinterpret_cast<const T*>(static_cast<uintptr_t>(table[2 * w]));
  const A s = block_sum(thread_sum_sq<T, A>(p, table[2 * w + 1]), shared);
  if (threadIdx.x == 0) partial[w] = s;
}

template <typename A>
__global__ void combine_kernel(const A* __restrict__ partial, const int64_t* __restrict__ first, int64_t P,
                               A* __restrict__ out) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= P) return;
  A s = A(0);
  for (int64_t w = first[p]; w < first[p + 1]; ++w) s += partial[w];  // piece order: deterministic
  out[p] = s;
}

}  // namespace

int tensor_sq_norms(const int64_t* table, int64_t W, const int64_t* first, int64_t P, DType t, void* out,
                    void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    // gridDim.x allows 2^31 - 1 blocks: W pieces of kPieceChunk elements cover any list that fits in memory
    if (W > 0) pieces_kernel<T><<<static_cast<unsigned>(W), kThreads, 0, s>>>(table, static_cast<A*>(workspace));
    if (P > 0) {
      combine_kernel<A><<<static_cast<unsigned>((P + 255) / 256), 256, 0, s>>>(
          static_cast<const A*>(workspace), first, P, static_cast<A*>(out));
    }
    return to_int(cudaGetLastError());
  });
}

}  // namespace modfuse::cuda
