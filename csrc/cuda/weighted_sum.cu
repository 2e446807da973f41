// Op 6 (docs/math.md): out[D] = sum_r w_r X_r with one weight per row (w[R], acc) or per element (w[R, D], X's dtype).
// Element-wise: each output element is one thread's loop over the rows (fixed order), V elements per thread
// with 16-byte loads when D is a multiple of V and the pointers are aligned.
#include "cuda/common.cuh"

namespace modfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;

template <typename T, int V, bool PerElement>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(const T* __restrict__ X, const void* __restrict__ w,
                                                                int64_t R, int64_t D, T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t groups = D / V;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < groups;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i * V;
    A o[V];
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = A(0);
    for (int64_t r = 0; r < R; ++r) {
      const Pack<T, V> x = *reinterpret_cast<const Pack<T, V>*>(X + r * D + d);
      if constexpr (PerElement) {
        const Pack<T, V> ww = *reinterpret_cast<const Pack<T, V>*>(static_cast<const T*>(w) + r * D + d);
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] += to_acc<A>(ww.v[j]) * to_acc<A>(x.v[j]);
      } else {
        const A wr = static_cast<const A*>(w)[r];
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] += wr * to_acc<A>(x.v[j]);
      }
    }
    Pack<T, V> po;
#pragma unroll
    for (int j = 0; j < V; ++j) po.v[j] = from_acc<T>(o[j]);
    *reinterpret_cast<Pack<T, V>*>(out + d) = po;
  }
}

}  // namespace

int weighted_sum(const void* X, const void* w, bool per_element, DType t, int64_t R, int64_t D, void* out,
                 void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec16<T>;
    const bool vec = D % V == 0 && aligned_to(X, 16) && aligned_to(out, 16) && (!per_element || aligned_to(w, 16));
    const int64_t work = vec ? D / V : D;
    if (work == 0) return to_int(cudaGetLastError());
    const auto blocks = static_cast<unsigned>(grid_for(work, kThreads, kMaxBlocks));
    const T* x = static_cast<const T*>(X);
    T* o = static_cast<T*>(out);
    if (vec && per_element) weighted_sum_kernel<T, V, true><<<blocks, kThreads, 0, s>>>(x, w, R, D, o);
    else if (vec) weighted_sum_kernel<T, V, false><<<blocks, kThreads, 0, s>>>(x, w, R, D, o);
    else if (per_element) weighted_sum_kernel<T, 1, true><<<blocks, kThreads, 0, s>>>(x, w, R, D, o);
    else weighted_sum_kernel<T, 1, false><<<blocks, kThreads, 0, s>>>(x, w, R, D, o);
    return to_int(cudaGetLastError());
  });
}

}  // namespace modfuse::cuda
