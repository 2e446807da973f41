// Op 7 (docs/math.md): per-segment sum and sum of squares of every row of x[R, D], accumulated in float64 for every
// input dtype, in one pass (the per-tensor standard deviation of OGM-GE without a float64 copy of the bank).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/common.h"

namespace modfuse::cpu {

constexpr int64_t kMomentsBlock = 32768;  // a long segment is split so that both cores share it

// One float64 tile (kLanes<double> lanes, one register): the tile converts to double before it adds.
template <typename T>
inline Vec<double> load_double_tile(const T* p) {
  Vec<double> v;
  for (int l = 0; l < kLanes<double>; ++l) v[l] = double(load(p[l]));
  return v;
}

template <typename T>
void segment_moments(const T* x, int64_t R, int64_t D, const int64_t* offsets, int64_t P, double* out) {
  const std::vector<SegmentBlock> blocks = segment_blocks(offsets, P, kMomentsBlock);
  const int64_t nblocks = int64_t(blocks.size());
  std::vector<double> partials(2 * R * nblocks);
  parallel_chunks(R * nblocks, 1, R * D, [&](int64_t item, int64_t, int64_t) {
    const int64_t r = item / nblocks;
    const SegmentBlock& blk = blocks[item % nblocks];
    const T* row = x + r * D;
    Vec<double> s1 = {}, s2 = {};
    int64_t d = blk.begin;
    for (; d + kLanes<double> <= blk.end; d += kLanes<double>) {
      const Vec<double> v = load_double_tile(row + d);
      s1 += v;
      s2 += v * v;
    }
    double sum = lane_sum(s1), sq = lane_sum(s2);
    for (; d < blk.end; ++d) {
      const double v = load(row[d]);
      sum += v;
      sq += v * v;
    }
    partials[2 * item] = sum;
    partials[2 * item + 1] = sq;
  });
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t p = 0; p < 2 * P; ++p) out[r * 2 * P + p] = 0;
    double sum = 0, sq = 0;  // blocks of one segment are consecutive: add them in order, then store
    for (int64_t b = 0; b < nblocks; ++b) {
      sum += partials[2 * (r * nblocks + b)];
      sq += partials[2 * (r * nblocks + b) + 1];
      if (b + 1 == nblocks || blocks[b + 1].segment != blocks[b].segment) {
        out[(r * P + blocks[b].segment) * 2] = sum;
        out[(r * P + blocks[b].segment) * 2 + 1] = sq;
        sum = sq = 0;
      }
    }
  }
}

template void segment_moments<float>(const float*, int64_t, int64_t, const int64_t*, int64_t, double*);
template void segment_moments<double>(const double*, int64_t, int64_t, const int64_t*, int64_t, double*);
template void segment_moments<c10::Half>(const c10::Half*, int64_t, int64_t, const int64_t*, int64_t, double*);
template void segment_moments<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, const int64_t*, int64_t,
                                             double*);

at::Tensor segment_moments_cpu(const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "segment_moments: x must be contiguous [R, D]");
  const int64_t R = x.size(0), D = x.size(1);
  const at::Tensor off = checked_offsets(offsets, D, "segment_moments");
  const int64_t P = off.size(0) - 1;
  at::Tensor out = at::empty({R, P, 2}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_moments", [&] {
    segment_moments<scalar_t>(x.const_data_ptr<scalar_t>(), R, D, off.const_data_ptr<int64_t>(), P,
                              out.data_ptr<double>());
  });
  return out;
}

}  // namespace modfuse::cpu
