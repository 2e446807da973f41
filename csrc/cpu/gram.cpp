// Op 5 (SPEC.md): Gram matrix X X^T of R gradient rows in one pass over X (MGDA / MMPareto weights, cosines).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/common.h"

namespace modfuse::cpu {

constexpr int64_t kGramChunk = 4096;
constexpr int64_t kGramMaxRows = 64;  // per-lane accumulators for every pair live on the stack

template <typename T>
void gram(const T* X, int64_t R, int64_t D, T* out) {
  using A = acc_t<T>;
  constexpr int V = kLanes<A>;
  const int64_t pairs = R * (R + 1) / 2;
  const int64_t nchunks = (D + kGramChunk - 1) / kGramChunk;
  std::vector<double> partials(nchunks * pairs, 0.0);
  parallel_chunks(D, kGramChunk, [&](int64_t c, int64_t begin, int64_t end) {
    std::vector<A> lanes(pairs * V, A(0));  // lanes[(pair) * V + l]
    A tile[kGramMaxRows][V];
    for (int64_t d0 = begin; d0 < end; d0 += V) {
      const int nl = int(std::min<int64_t>(V, end - d0));
      for (int64_t i = 0; i < R; ++i)
        for (int l = 0; l < V; ++l) tile[i][l] = l < nl ? load(X[i * D + d0 + l]) : A(0);  // zero-padded tail
      int64_t pair = 0;
      for (int64_t i = 0; i < R; ++i)
        for (int64_t j = 0; j <= i; ++j, ++pair)
          for (int l = 0; l < V; ++l) lanes[pair * V + l] += tile[i][l] * tile[j][l];
    }
    for (int64_t pair = 0; pair < pairs; ++pair) partials[c * pairs + pair] = lane_sum(&lanes[pair * V]);
  });
  int64_t pair = 0;
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j <= i; ++j, ++pair) {
      double s = 0;
      for (int64_t c = 0; c < nchunks; ++c) s += partials[c * pairs + pair];
      out[i * R + j] = out[j * R + i] = store<T>(A(s));
    }
}

template void gram<float>(const float*, int64_t, int64_t, float*);
template void gram<double>(const double*, int64_t, int64_t, double*);
template void gram<c10::Half>(const c10::Half*, int64_t, int64_t, c10::Half*);
template void gram<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, c10::BFloat16*);

at::Tensor gram_cpu(const at::Tensor& X) {
  TORCH_CHECK(X.dim() == 2 && X.is_contiguous(), "gram: X must be contiguous [R, D]");
  TORCH_CHECK(X.size(0) <= kGramMaxRows, "gram: at most ", kGramMaxRows, " rows");
  const int64_t R = X.size(0), D = X.size(1);
  at::Tensor out = at::empty({R, R}, X.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "gram", [&] {
    gram<scalar_t>(X.const_data_ptr<scalar_t>(), R, D, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace modfuse::cpu
