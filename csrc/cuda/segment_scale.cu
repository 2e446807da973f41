// Op 6 (docs/math.md), segment_scale_: x[d] = x[d] * scale[p] (+ z_d * noise_std[p]) in place for d in segment p
// (OGM-GE's modulation and generalisation noise in one pass); z_d = philox::normal(seed, offset + d), drawn here
// (csrc/philox_normal.h: the same bits as the CPU kernel and the reference), each thread taking whole groups of 4
// counters, one Philox call per group. One block per piece of a segment (the host piece table, launch.h), so every
// block knows its segment without a search.
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
  if (sd == A(0)) {  // (a zero std adds +-0: the same values, so the segment skips the draw)
    for (int64_t d = begin + threadIdx.x; d < end; d += blockDim.x) x[d] = from_acc<T>(mul_rn(to_acc<A>(x[d]), sc));
    return;
  }
  // Thread k takes the k-th group of 4 counters from the multiple of 4 at or below offset + begin: one Philox call,
  // four normals, the first and the last group cut at the piece's ends (counters wrap mod 2^64 as the reference's).
  const uint64_t first = offset + static_cast<uint64_t>(begin);
  const int64_t lead = static_cast<int64_t>(first & 3u);
  const int64_t groups = (end - begin + lead + 3) / 4;
  for (int64_t k = threadIdx.x; k < groups; k += blockDim.x) {
    A z[4];
    philox::normals4<A>(seed, (first - static_cast<uint64_t>(lead) + 4u * static_cast<uint64_t>(k)) >> 2, z);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t d = begin - lead + 4 * k + j;
      if (d >= begin && d < end) {
        // The reference's order and roundings: scale first, then add the noise, with no FMA (bit-identical results)
        x[d] = from_acc<T>(add_rn(mul_rn(to_acc<A>(x[d]), sc), mul_rn(z[j], sd)));
      }
    }
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
