// Op 6b (docs/math.md): scale every segment of x[D] in place, optionally adding per-segment Gaussian noise (OGM-GE).
// The noise arrives as one standard-normal draw from the caller's generator (modfuse/ops.py), so the result
// matches the reference exactly and is reproducible from the generator's seed.
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

namespace modfuse::cpu {

constexpr int64_t kScaleBlock = 32768;

template <typename T>
void segment_scale(T* x, int64_t D, const int64_t* offsets, int64_t P, const acc_t<T>* scale,
                   const acc_t<T>* noise, const acc_t<T>* noise_std) {
  using A = acc_t<T>;
  const std::vector<SegmentBlock> blocks = segment_blocks(offsets, P, kScaleBlock);
  parallel_chunks(int64_t(blocks.size()), 1, D, [&](int64_t b, int64_t, int64_t) {
    const SegmentBlock& blk = blocks[b];
    const A s = scale[blk.segment];
    if (noise) {
      const A sd = noise_std[blk.segment];
      for (int64_t d = blk.begin; d < blk.end; ++d) x[d] = store<T>(load(x[d]) * s + noise[d] * sd);
    } else {
      for (int64_t d = blk.begin; d < blk.end; ++d) x[d] = store<T>(load(x[d]) * s);
    }
  });
}

#define MODFUSE_INSTANTIATE(T) \
  template void segment_scale<T>(T*, int64_t, const int64_t*, int64_t, const acc_t<T>*, const acc_t<T>*, const acc_t<T>*);
MODFUSE_INSTANTIATE(float)
MODFUSE_INSTANTIATE(double)
MODFUSE_INSTANTIATE(c10::Half)
MODFUSE_INSTANTIATE(c10::BFloat16)
#undef MODFUSE_INSTANTIATE

void segment_scale_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& scale,
                       const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& noise_std) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "segment_scale_: x must be contiguous [D]");
  TORCH_CHECK(noise.has_value() == noise_std.has_value(), "segment_scale_: noise and noise_std go together");
  const int64_t D = x.size(0);
  const at::Tensor off = checked_offsets(offsets, D, "segment_scale_");
  const int64_t P = off.size(0) - 1;
  const int64_t* o = off.const_data_ptr<int64_t>();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.scalar_type() == acc && scale.is_contiguous() && scale.numel() == P,
              "segment_scale_: scale must be [P] in the accumulation dtype");
  if (noise) {
    TORCH_CHECK(noise->scalar_type() == acc && noise->is_contiguous() && noise->numel() == D,
                "segment_scale_: noise must be [D] in the accumulation dtype");
    TORCH_CHECK(noise_std->scalar_type() == acc && noise_std->is_contiguous() && noise_std->numel() == P,
                "segment_scale_: noise_std must be [P] in the accumulation dtype");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_scale_", [&] {
    using A = acc_t<scalar_t>;
    segment_scale<scalar_t>(x.data_ptr<scalar_t>(), D, o, P, scale.const_data_ptr<A>(),
                            noise ? noise->const_data_ptr<A>() : nullptr,
                            noise ? noise_std->const_data_ptr<A>() : nullptr);
  });
}

}  // namespace modfuse::cpu
