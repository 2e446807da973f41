// Op 5 (docs/math.md): out[R, R] = X X^T for R <= 64 rows, one pass over X.
// Each block walks tiles of kTile columns (grid-stride over tiles), stages a tile of all R rows in shared
// memory in the accumulation type, and each thread accumulates a few (i <= j) pairs over the tile. Per-block
// partials [blocks, pairs] are added in block order by a second kernel, which also mirrors and converts.
#include "cuda/common.cuh"

namespace modfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 64;
constexpr int kMaxRows = 64;
constexpr int kMaxPairs = kMaxRows * (kMaxRows + 1) / 2;  // 2080
constexpr int kPairsPerThread = (kMaxPairs + kThreads - 1) / kThreads;  // 9
constexpr int64_t kMaxBlocks = 512;

template <typename T>
__global__ void __launch_bounds__(kThreads) gram_kernel(const T* __restrict__ X, int64_t R, int64_t D,
                                                        acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ A tile[kMaxRows][kTile + 1];  // +1: threads reading one column of different rows hit different banks
  __shared__ unsigned char pair_i[kMaxPairs], pair_j[kMaxPairs];
  const int pairs = static_cast<int>(R * (R + 1) / 2);
  for (int q = threadIdx.x; q < pairs; q += blockDim.x) {  // q -> (i, j), i <= j, row by row
    int i = 0, rest = q;
    while (rest >= static_cast<int>(R) - i) rest -= static_cast<int>(R) - i, ++i;
    pair_i[q] = static_cast<unsigned char>(i);
    pair_j[q] = static_cast<unsigned char>(i + rest);
  }
  A acc[kPairsPerThread];
#pragma unroll
  for (int s = 0; s < kPairsPerThread; ++s) acc[s] = A(0);
  const int64_t tiles = (D + kTile - 1) / kTile;
  for (int64_t c = blockIdx.x; c < tiles; c += gridDim.x) {
    __syncthreads();  // the previous tile is consumed (and the pair table written, on the first pass)
    const int64_t d0 = c * kTile;
    const int width = static_cast<int>(D - d0 < kTile ? D - d0 : kTile);
    for (int e = threadIdx.x; e < R * kTile; e += blockDim.x) {
      const int r = e / kTile, k = e % kTile;
      tile[r][k] = k < width ? to_acc<A>(X[r * D + d0 + k]) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kPairsPerThread; ++s) {
      const int q = threadIdx.x + s * kThreads;
      if (q < pairs) {
        const int i = pair_i[q], j = pair_j[q];
        A sum = A(0);
#pragma unroll 8
        for (int k = 0; k < kTile; ++k) sum += tile[i][k] * tile[j][k];
        acc[s] += sum;
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kPairsPerThread; ++s) {
    const int q = threadIdx.x + s * kThreads;
    if (q < pairs) partial[static_cast<int64_t>(blockIdx.x) * pairs + q] = acc[s];
  }
}

template <typename T>
__global__ void finish_kernel(const acc_t<T>* __restrict__ partial, int64_t blocks, int64_t R, T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t pairs = R * (R + 1) / 2;
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= pairs) return;
  int64_t i = 0, rest = q;
  while (rest >= R - i) rest -= R - i, ++i;
  const int64_t j = i + rest;
  A s = A(0);
  for (int64_t b = 0; b < blocks; ++b) s += partial[b * pairs + q];  // block order: deterministic
  out[i * R + j] = from_acc<T>(s);
  out[j * R + i] = from_acc<T>(s);
}

}  // namespace

int64_t gram_workspace(int64_t R, int64_t D, DType t) {
  return grid_for((D + kTile - 1) / kTile, 1, kMaxBlocks) * (R * (R + 1) / 2) * acc_bytes(t);
}

int gram(const void* X, DType t, int64_t R, int64_t D, void* out, void* workspace, void* stream) {
  if (R < 1 || R > kMaxRows) return static_cast<int>(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t blocks = grid_for((D + kTile - 1) / kTile, 1, kMaxBlocks);
    gram_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(static_cast<const T*>(X), R, D,
                                                                      static_cast<A*>(workspace));
    const int64_t pairs = R * (R + 1) / 2;
    finish_kernel<T><<<static_cast<unsigned>((pairs + 255) / 256), 256, 0, s>>>(static_cast<const A*>(workspace),
                                                                                 blocks, R, static_cast<T*>(out));
    return to_int(cudaGetLastError());
  });
}

}  // namespace modfuse::cuda
