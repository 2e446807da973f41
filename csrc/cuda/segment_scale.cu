// Op 6 (docs/math.md), segment_scale_: x[d] = x[d] * scale[p] (+ z_d * noise_std[p]) in place for d in segment p
// (OGM-GE's modulation and generalisation noise in one pass); z_d = philox::normal(seed, offset + d), drawn here
// (csrc/philox_normal.h: the same bits as the CPU kernel and the reference). One block per piece of a segment (the host piece table, launch.h),
// so every block knows its segment without a search.
#include "cuda/common.cuh"
#include "philox_normal.h"

namespace modfuse::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) segment_scale_kernel(T* __restrict__ x, const int64_t* __restrict__ pieces,
                                                                 const acc_t<T>* __restrict__ scale,
                                                                 const acc_t<T>* __restrict__ noise_std,
                                                                 uint64_t seed, uint64_t offset) {
  using A = acc_t<T>;
  const int64_t w = blockIdx.x;
  const int64_t p = pieces[3 * w], begin = pieces[3 * w + 1], end = pieces[3 * w + 2];
  const A sc = scale[p];
  const A sd = noise_std != nullptr ? noise_std[p] : A(0);
  for (int64_t d = begin + threadIdx.x; d < end; d += blockDim.x) {
    // The reference's order and roundings: scale first, then add the noise, with no FMA (bit-identical results)
    A y = mul_rn(to_acc<A>(x[d]), sc);
    if (sd != A(0)) y = add_rn(y, mul_rn(philox::normal<A>(seed, offset + static_cast<uint64_t>(d)), sd));
    x[d] = from_acc<T>(y);
  }
}

}  // namespace

int segment_scale(void* x, DType t, const int64_t* pieces, int64_t W, const void* scale, const void* noise_std,
                  uint64_t seed, uint64_t offset, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    if (W > 0)
      segment_scale_kernel<T><<<static_cast<unsigned>(W), kThreads, 0, s>>>(
          static_cast<T*>(x), pieces, static_cast<const A*>(scale), static_cast<const A*>(noise_std), seed, offset);
    return to_int(cudaGetLastError());
  });
}

}  // namespace modfuse::cuda
