// Op 1b (docs/math.md): squared L2 norm of every tensor of a list, read where the tensors are (no gather into one
// flat buffer), in one parallel pass: the tensor-list twin of segment_sq_norms, as torch._foreach_norm and apex's
// multi_tensor_apply take lists.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/common.h"

namespace modfuse::cpu {

constexpr int64_t kTensorBlock = 32768;  // a long tensor is split so that both cores share it

// Sum of x[begin, end)^2: four one-register accumulators (common.h's Vec), the tail and the lanes added in double.
template <typename T>
double span_sum_sq(const T* x, int64_t begin, int64_t end) {
  using A = acc_t<T>;
  constexpr int L = kLanes<A>;
  Vec<A> a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t d = begin;
  for (; d + 4 * L <= end; d += 4 * L) {
    const Vec<A> v0 = load_vec(x + d), v1 = load_vec(x + d + L);
    const Vec<A> v2 = load_vec(x + d + 2 * L), v3 = load_vec(x + d + 3 * L);
    a0 += v0 * v0;
    a1 += v1 * v1;
    a2 += v2 * v2;
    a3 += v3 * v3;
  }
  double sum = 0;
  for (; d < end; ++d) sum += double(load(x[d])) * load(x[d]);
  const Vec<A> a = (a0 + a1) + (a2 + a3);
  A lanes[L];
  std::memcpy(lanes, &a, sizeof lanes);
  for (int l = 0; l < L; ++l) sum += lanes[l];
  return sum;
}

template <typename T>
void tensor_sq_norms(const T* const* data, const int64_t* lengths, int64_t P, acc_t<T>* out) {
  using A = acc_t<T>;
  // The list as segments of one virtual buffer, cut into fixed blocks: the result does not depend on the thread
  // count, and the blocks of one tensor are consecutive.
  std::vector<int64_t> offsets(P + 1, 0);
  for (int64_t p = 0; p < P; ++p) offsets[p + 1] = offsets[p] + lengths[p];
  const std::vector<SegmentBlock> blocks = segment_blocks(offsets.data(), P, kTensorBlock);
  const int64_t nblocks = int64_t(blocks.size());
  std::vector<double> partials(nblocks);
  parallel_chunks(nblocks, 1, offsets[P], [&](int64_t item, int64_t, int64_t) {
    const SegmentBlock& blk = blocks[item];
    const int64_t first = offsets[blk.segment];  // the tensor's start in the virtual buffer
    partials[item] = span_sum_sq(data[blk.segment], blk.begin - first, blk.end - first);
  });
  for (int64_t p = 0; p < P; ++p) out[p] = A(0);
  double acc = 0;  // sum each tensor's blocks in order, then store
  for (int64_t b = 0; b < nblocks; ++b) {
    acc += partials[b];
    if (b + 1 == nblocks || blocks[b + 1].segment != blocks[b].segment) {
      out[blocks[b].segment] = A(acc);
      acc = 0;
    }
  }
}

template void tensor_sq_norms<float>(const float* const*, const int64_t*, int64_t, float*);
template void tensor_sq_norms<double>(const double* const*, const int64_t*, int64_t, double*);
template void tensor_sq_norms<c10::Half>(const c10::Half* const*, const int64_t*, int64_t, float*);
template void tensor_sq_norms<c10::BFloat16>(const c10::BFloat16* const*, const int64_t*, int64_t, float*);

DenseList dense_list(c10::ArrayRef<at::Tensor> tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": tensors must hold at least one tensor");
  DenseList list;
  list.copies.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type() && t.device() == tensors[0].device(), op,
                ": every tensor must have the first one's dtype and device");
    // A dense tensor in any dimension order (contiguous, transposed, channels_last) holds its numel values in one
    // run of memory starting at its data pointer (strides are >= 0), and a sum of squares ignores the order:
    // read it in place. Only gaps (slices, expanded dims) need a contiguous copy.
    if (t.numel() > 0 && !t.is_non_overlapping_and_dense()) {
      list.copies.push_back(t.contiguous());
      list.data.push_back(list.copies.back().const_data_ptr());
    } else {
      list.data.push_back(t.const_data_ptr());
    }
    list.lengths.push_back(t.numel());
  }
  return list;
}

at::Tensor tensor_sq_norms_cpu(at::TensorList tensors) {
  const DenseList list = dense_list(tensors, "tensor_sq_norms");
  TORCH_CHECK(tensors[0].is_cpu(), "tensor_sq_norms: CPU tensors expected");
  const int64_t P = int64_t(tensors.size());
  const auto t = tensors[0].scalar_type();
  at::Tensor out = at::empty({P}, tensors[0].options().dtype(t == at::kDouble ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "tensor_sq_norms", [&] {
    std::vector<const scalar_t*> data;
    for (const void* p : list.data) data.push_back(static_cast<const scalar_t*>(p));
    tensor_sq_norms<scalar_t>(data.data(), list.lengths.data(), P, out.data_ptr<acc_t<scalar_t>>());
  });
  return out;
}

}  // namespace modfuse::cpu
