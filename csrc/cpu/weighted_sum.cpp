// Op 6 (docs/math.md): out[D] = sum_r w_r X_r, with one weight per row or one per element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/common.h"

namespace modfuse::cpu {

constexpr int64_t kWeightedSumChunk = 4096;

template <typename T, typename W>
void weighted_sum(const T* X, const W* w, bool w_per_element, int64_t R, int64_t D, T* out) {
  using A = acc_t<T>;
  parallel_chunks(D, kWeightedSumChunk, R * D, [&](int64_t, int64_t begin, int64_t end) {
    A acc[kWeightedSumChunk];
    std::fill(acc, acc + (end - begin), A(0));
    for (int64_t r = 0; r < R; ++r) {
      const T* x = X + r * D;
      if (w_per_element) {
        const W* wr = w + r * D;
        for (int64_t d = begin; d < end; ++d) acc[d - begin] += A(load(wr[d])) * load(x[d]);
      } else {
        const A wr = A(load(w[r]));
        for (int64_t d = begin; d < end; ++d) acc[d - begin] += wr * load(x[d]);
      }
    }
    for (int64_t d = begin; d < end; ++d) out[d] = store<T>(acc[d - begin]);
  });
}

// Row weights come in the accumulation dtype; per-element weights in X's own dtype (no hidden conversion pass).
template void weighted_sum<float, float>(const float*, const float*, bool, int64_t, int64_t, float*);
template void weighted_sum<double, double>(const double*, const double*, bool, int64_t, int64_t, double*);
template void weighted_sum<c10::Half, float>(const c10::Half*, const float*, bool, int64_t, int64_t, c10::Half*);
template void weighted_sum<c10::Half, c10::Half>(const c10::Half*, const c10::Half*, bool, int64_t, int64_t,
                                                 c10::Half*);
template void weighted_sum<c10::BFloat16, float>(const c10::BFloat16*, const float*, bool, int64_t, int64_t,
                                                 c10::BFloat16*);
template void weighted_sum<c10::BFloat16, c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, bool, int64_t,
                                                         int64_t, c10::BFloat16*);

at::Tensor weighted_sum_cpu(const at::Tensor& X, const at::Tensor& w) {
  TORCH_CHECK(X.dim() == 2 && X.is_contiguous() && w.is_contiguous(), "weighted_sum: X [R, D] and w contiguous");
  const int64_t R = X.size(0), D = X.size(1);
  const bool per_element = w.dim() == 2;
  TORCH_CHECK(per_element ? w.sizes() == X.sizes() : (w.dim() == 1 && w.size(0) == R),
              "weighted_sum: w must be [R] or [R, D]");
  const auto acc = X.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w.scalar_type() == (per_element ? X.scalar_type() : acc),
              "weighted_sum: w must be X's dtype ([R, D]) or its accumulation dtype ([R])");
  at::Tensor out = at::empty({D}, X.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "weighted_sum", [&] {
    using A = acc_t<scalar_t>;
    if (per_element)
      weighted_sum<scalar_t, scalar_t>(X.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), true, R, D,
                                       out.data_ptr<scalar_t>());
    else
      weighted_sum<scalar_t, A>(X.const_data_ptr<scalar_t>(), w.const_data_ptr<A>(), false, R, D,
                                out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace modfuse::cpu
