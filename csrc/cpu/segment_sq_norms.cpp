// Op 1 (docs/math.md): squared L2 norm of every segment of every row of x[R, D], one launch for all parameters.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/common.h"

namespace modfuse::cpu {

constexpr int64_t kSegmentBlock = 32768;  // a long parameter is split so that both cores share it

template <typename T>
void segment_sq_norms(const T* x, int64_t R, int64_t D, const int64_t* offsets, int64_t P, acc_t<T>* out) {
  using A = acc_t<T>;
  const std::vector<SegmentBlock> blocks = segment_blocks(offsets, P, kSegmentBlock);
  const int64_t nblocks = int64_t(blocks.size());
  std::vector<double> partials(R * nblocks);
  parallel_chunks(R * nblocks, 1, R * D, [&](int64_t item, int64_t, int64_t) {
    const int64_t r = item / nblocks;
    const SegmentBlock& blk = blocks[item % nblocks];
    const T* row = x + r * D;
    constexpr int V = kLanes<A>;
    Vec<A> acc = {};
    int64_t d = blk.begin;
    for (; d + V <= blk.end; d += V) {
      const Vec<A> v = load_vec(row + d);
      acc += v * v;
    }
    double sum = 0;
    for (; d < blk.end; ++d) sum += double(load(row[d])) * load(row[d]);
    for (int l = 0; l < V; ++l) sum += acc[l];
    partials[item] = sum;
  });
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t p = 0; p < P; ++p) out[r * P + p] = A(0);
    double acc = 0;  // blocks of one segment are consecutive: sum them in order, then store
    for (int64_t b = 0; b < nblocks; ++b) {
      acc += partials[r * nblocks + b];
      if (b + 1 == nblocks || blocks[b + 1].segment != blocks[b].segment) {
        out[r * P + blocks[b].segment] = A(acc);
        acc = 0;
      }
    }
  }
}

template void segment_sq_norms<float>(const float*, int64_t, int64_t, const int64_t*, int64_t, float*);
template void segment_sq_norms<double>(const double*, int64_t, int64_t, const int64_t*, int64_t, double*);
template void segment_sq_norms<c10::Half>(const c10::Half*, int64_t, int64_t, const int64_t*, int64_t, float*);
template void segment_sq_norms<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, const int64_t*, int64_t,
                                              float*);

at::Tensor segment_sq_norms_cpu(const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "segment_sq_norms: x must be contiguous [R, D]");
  const int64_t R = x.size(0), D = x.size(1);
  const at::Tensor off = checked_offsets(offsets, D, "segment_sq_norms");
  const int64_t P = off.size(0) - 1;
  const int64_t* o = off.const_data_ptr<int64_t>();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({R, P}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_sq_norms", [&] {
    segment_sq_norms<scalar_t>(x.const_data_ptr<scalar_t>(), R, D, o, P, out.data_ptr<acc_t<scalar_t>>());
  });
  return out;
}

}  // namespace modfuse::cpu
