// Op 6b (docs/math.md): scale every segment of x[D] in place, optionally adding per-segment Gaussian noise (OGM-GE).
// The noise is drawn here, element by element, from the counter-based stream of csrc/philox_normal.h (seed, and
// counter offset + d), so no [D] noise buffer exists, the result matches the reference bit for bit, and any thread
// split (or a shard of the buffer, with its own offset) draws exactly its own elements.
// No FMA contraction in this file (GCC and Clang contract a * b + c under -O3 -march=native by default): the
// in-place results must equal the reference's separately rounded multiply and add bit for bit (issue 14 item 9).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/common.h"
#include "philox_normal.h"

namespace modfuse::cpu {

constexpr int64_t kScaleBlock = 32768;

template <typename T>
void segment_scale(T* x, int64_t D, const int64_t* offsets, int64_t P, const acc_t<T>* scale,
                   const acc_t<T>* noise_std, uint64_t seed, uint64_t offset) {
  using A = acc_t<T>;
  const std::vector<SegmentBlock> blocks = segment_blocks(offsets, P, kScaleBlock);
  parallel_chunks(int64_t(blocks.size()), 1, D, [&](int64_t b, int64_t, int64_t) {
    const SegmentBlock& blk = blocks[b];
    const A s = scale[blk.segment];
    const A sd = noise_std ? noise_std[blk.segment] : A(0);
    if (sd != A(0)) {  // (a zero std adds +-0: the same values, so those segments skip the draw)
      constexpr int N = 16;  // normals per tile (philox::normal_tile)
      A z[N];
      int64_t d = blk.begin;
      for (; d + N <= blk.end; d += N) {
        philox::normal_tile<A, N>(seed, offset + uint64_t(d), z);
        for (int l = 0; l < N; ++l) x[d + l] = store<T>(load(x[d + l]) * s + z[l] * sd);
      }
      for (; d < blk.end; ++d) x[d] = store<T>(load(x[d]) * s + philox::normal<A>(seed, offset + uint64_t(d)) * sd);
    } else {
      for (int64_t d = blk.begin; d < blk.end; ++d) x[d] = store<T>(load(x[d]) * s);
    }
  });
}

#define MODFUSE_INSTANTIATE(T) \
  template void segment_scale<T>(T*, int64_t, const int64_t*, int64_t, const acc_t<T>*, const acc_t<T>*, uint64_t, \
                                 uint64_t);
MODFUSE_INSTANTIATE(float)
MODFUSE_INSTANTIATE(double)
MODFUSE_INSTANTIATE(c10::Half)
MODFUSE_INSTANTIATE(c10::BFloat16)
#undef MODFUSE_INSTANTIATE

void segment_scale_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& scale,
                       const std::optional<at::Tensor>& noise_std, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "segment_scale_: x must be contiguous [D]");
  const int64_t D = x.size(0);
  const at::Tensor off = checked_offsets(offsets, D, "segment_scale_");
  const int64_t P = off.size(0) - 1;
  const int64_t* o = off.const_data_ptr<int64_t>();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.scalar_type() == acc && scale.is_contiguous() && scale.numel() == P,
              "segment_scale_: scale must be [P] in the accumulation dtype");
  if (noise_std) {
    TORCH_CHECK(noise_std->scalar_type() == acc && noise_std->is_contiguous() && noise_std->numel() == P,
                "segment_scale_: noise_std must be [P] in the accumulation dtype");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_scale_", [&] {
    using A = acc_t<scalar_t>;
    segment_scale<scalar_t>(x.data_ptr<scalar_t>(), D, o, P, scale.const_data_ptr<A>(),
                            noise_std ? noise_std->const_data_ptr<A>() : nullptr, uint64_t(seed), uint64_t(offset));
  });
}

}  // namespace modfuse::cpu
