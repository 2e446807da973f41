// Op 5 (docs/math.md): Gram matrix X X^T of R gradient rows in one pass over X (MGDA / MMPareto weights, cosines).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "cpu/common.h"

namespace modfuse::cpu {

constexpr int64_t kGramChunk = 4096;
constexpr int64_t kGramMaxRows = 64;  // one vector tile per row lives on the stack

template <typename T>
void gram(const T* X, int64_t R, int64_t D, T* out) {
  using A = acc_t<T>;
  constexpr int V = kLanes<A>;
  const int64_t pairs = R * (R + 1) / 2;
  const int64_t nchunks = (D + kGramChunk - 1) / kGramChunk;
  std::vector<double> partials(nchunks * pairs, 0.0);
  parallel_chunks(D, kGramChunk, pairs * D, [&](int64_t c, int64_t begin, int64_t end) {
    std::vector<Vec<A>> acc(pairs, Vec<A>{});  // one vector accumulator per pair (i >= j)
    Vec<A> tile[kGramMaxRows];
    int64_t d = begin;
    for (; d + V <= end; d += V) {
      for (int64_t i = 0; i < R; ++i) tile[i] = load_vec(X + i * D + d);
      int64_t pair = 0;
      for (int64_t i = 0; i < R; ++i)
        for (int64_t j = 0; j <= i; ++j, ++pair) acc[pair] += tile[i] * tile[j];
    }
    int64_t pair = 0;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j <= i; ++j, ++pair) {
        double s = lane_sum(acc[pair]);
        for (int64_t t = d; t < end; ++t) s += double(A(load(X[i * D + t]) * load(X[j * D + t])));
        partials[c * pairs + pair] = s;
      }
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
