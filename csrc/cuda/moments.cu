// Op 2 (docs/math.md): per-modality moment banks. moments: S1 = sum_k G[:, k], S2 = sum_k G[:, k]^2 from G[M, K, D],
// each G value read once; moments_accumulate: S1 += g, S2 += g^2 in place. Element-wise, so no reduction order
// to fix: every output element is one thread's loop over k. V elements per thread with 16-byte loads of G when
// D is a multiple of V and the pointers are aligned; one element per thread otherwise.
#include "cuda/common.cuh"

namespace modfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) moments_kernel(const T* __restrict__ G, int64_t M, int64_t K, int64_t D,
                                                           acc_t<T>* __restrict__ S1, acc_t<T>* __restrict__ S2) {
  using A = acc_t<T>;
  const int64_t per_row = D / V, total = M * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / per_row, d = (i % per_row) * V;
    A s1[V], s2[V];
#pragma unroll
    for (int j = 0; j < V; ++j) s1[j] = s2[j] = A(0);
    const T* g = G + m * K * D + d;
    for (int64_t k = 0; k < K; ++k) {
      const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(g + k * D);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A v = to_acc<A>(pk.v[j]);
        s1[j] += v;
        s2[j] += v * v;
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      S1[m * D + d + j] = s1[j];
      S2[m * D + d + j] = s2[j];
    }
  }
}

template <typename B, typename T, int V>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(B* __restrict__ S1, B* __restrict__ S2,
                                                              const T* __restrict__ g, int64_t n) {
  const int64_t total = n / V;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(g + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const B v = to_acc<B>(pk.v[j]);  // g converted to the banks' dtype first (docs/math.md / reference)
      S1[i * V + j] += v;
      S2[i * V + j] = add_rn(S2[i * V + j], mul_rn(v, v));  // no FMA: equals the reference's S2 + v^2 exactly
    }
  }
}

}  // namespace

int moments(const void* G, DType t, int64_t M, int64_t K, int64_t D, void* S1, void* S2, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    constexpr int V = kVec16<T>;
    const bool vec = D % V == 0 && aligned_to(G, 16);
    const int64_t work = M * (vec ? D / V : D);
    if (work == 0) return to_int(cudaGetLastError());
    const auto blocks = static_cast<unsigned>(grid_for(work, kThreads, kMaxBlocks));
    if (vec)
      moments_kernel<T, V><<<blocks, kThreads, 0, s>>>(static_cast<const T*>(G), M, K, D, static_cast<A*>(S1),
                                                       static_cast<A*>(S2));
    else
      moments_kernel<T, 1><<<blocks, kThreads, 0, s>>>(static_cast<const T*>(G), M, K, D, static_cast<A*>(S1),
                                                       static_cast<A*>(S2));
    return to_int(cudaGetLastError());
  });
}

int moments_accumulate(void* S1, void* S2, DType bank, const void* g, DType t, int64_t n, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  auto launch = [&](auto bank_tag) {
    using B = decltype(bank_tag);
    return dispatch(t, [&](auto tag) {
      using T = decltype(tag);
      constexpr int V = kVec16<T>;
      const bool vec = n % V == 0 && aligned_to(g, 16);
      const int64_t work = vec ? n / V : n;
      if (work == 0) return to_int(cudaGetLastError());
      const auto blocks = static_cast<unsigned>(grid_for(work, kThreads, kMaxBlocks));
      if (vec)
        accumulate_kernel<B, T, V><<<blocks, kThreads, 0, s>>>(static_cast<B*>(S1), static_cast<B*>(S2),
                                                               static_cast<const T*>(g), n);
      else
        accumulate_kernel<B, T, 1><<<blocks, kThreads, 0, s>>>(static_cast<B*>(S1), static_cast<B*>(S2),
                                                               static_cast<const T*>(g), n);
      return to_int(cudaGetLastError());
    });
  };
  if (bank == DType::f64) return launch(double{});
  if (bank == DType::f32) return launch(float{});
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace modfuse::cuda
