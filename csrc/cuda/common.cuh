// Shared device helpers of the CUDA kernels: dtype dispatch, conversions to the accumulation type, 16-byte
// vector packs, and deterministic warp/block sums (a fixed shuffle tree: the same order on every run).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"

namespace modfuse::cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename A> __device__ __forceinline__ A to_acc(float v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A to_acc(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) {
  return static_cast<A>(__bfloat162float(v));
}

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Products and sums that nvcc never contracts into an FMA (the _rn intrinsics), for the kernels whose results
// must equal the reference's separately rounded multiply and add bit for bit (segment_scale_, moments_accumulate_).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// N values of T loaded or stored as one aligned access (16 bytes for the vector paths).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per 16-byte access: 4 float, 8 half/bfloat16, 2 double.
template <typename T> constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

inline bool aligned_to(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// `shared` holds 32 A values; the call ends with a barrier, so it may be called again right away.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A total = A(0);
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : A(0);
    total = warp_sum(total);
  }
  __syncthreads();
  return total;
}

// This thread's share of the sum of squares of p[0, n), the block's threads striding over it (add the shares with
// block_sum): scalar up to the first 16-byte boundary, then 16-byte packs (a segment or a tensor of a list starts
// at any element address). Used by Op 1 (segment_sq_norms.cu) and Op 1b (tensor_sq_norms.cu).
template <typename T, typename A>
__device__ A thread_sum_sq(const T* p, int64_t n) {
  constexpr int V = kVec16<T>;
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 15) / static_cast<int64_t>(sizeof(T));
  int64_t head = misalign == 0 ? 0 : V - misalign;  // scalar elements before the first 16-byte boundary
  head = head < n ? head : n;
  A s = A(0);
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) {
    const A v = to_acc<A>(p[i]);
    s += v * v;
  }
  const int64_t nv = (n - head) / V;
  const Pack<T, V>* vp = reinterpret_cast<const Pack<T, V>*>(p + head);
  for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
    const Pack<T, V> pk = vp[i];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A v = to_acc<A>(pk.v[j]);
      s += v * v;
    }
  }
  for (int64_t i = head + nv * V + threadIdx.x; i < n; i += blockDim.x) {
    const A v = to_acc<A>(p[i]);
    s += v * v;
  }
  return s;
}

inline int to_int(cudaError_t e) { return static_cast<int>(e); }

// Grid size for a grid-stride loop over `work` items of `per_block` each, capped so reductions have a bounded
// number of partials. It depends only on the sizes (not the device), so results repeat bit for bit.
inline int64_t grid_for(int64_t work, int64_t per_block, int64_t cap) {
  int64_t g = (work + per_block - 1) / per_block;
  return g < 1 ? 1 : (g > cap ? cap : g);
}

// Calls f(T{}) with T the CUDA type of `t`.
template <typename F>
inline int dispatch(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f(float{});
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
    case DType::f64: return f(double{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace modfuse::cuda
