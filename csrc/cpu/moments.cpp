// Op 2 (docs/math.md): per-modality sums and sums of squares of K gradient samples, into float32/float64 banks.
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

constexpr int64_t kMomentsChunk = 4096;

template <typename T>
void moments(const T* G, int64_t M, int64_t K, int64_t D, acc_t<T>* S1, acc_t<T>* S2) {
  using A = acc_t<T>;
  const int64_t nchunks = (D + kMomentsChunk - 1) / kMomentsChunk;
  // Work items are (modality, chunk); each one owns its slice of S1 and S2, so there is nothing to combine.
  parallel_chunks(M * nchunks, 1, M * K * D, [&](int64_t item, int64_t, int64_t) {
    const int64_t m = item / nchunks;
    const int64_t begin = (item % nchunks) * kMomentsChunk;
    const int64_t len = std::min(D, begin + kMomentsChunk) - begin;
    A* s1 = S1 + m * D + begin;
    A* s2 = S2 + m * D + begin;
    std::fill(s1, s1 + len, A(0));
    std::fill(s2, s2 + len, A(0));
    for (int64_t k = 0; k < K; ++k) {
      const T* g = G + (m * K + k) * D + begin;
      for (int64_t i = 0; i < len; ++i) {
        const A v = load(g[i]);
        s1[i] += v;
        s2[i] += v * v;
      }
    }
  });
}

template <typename T, typename B>
void moments_accumulate(B* S1, B* S2, const T* g, int64_t n) {
  parallel_chunks(n, 1 << 16, n, [&](int64_t, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const B v = B(load(g[i]));
      S1[i] += v;
      S2[i] += v * v;
    }
  });
}

#define MODFUSE_INSTANTIATE(T)                                                                     \
  template void moments<T>(const T*, int64_t, int64_t, int64_t, acc_t<T>*, acc_t<T>*);              \
  template void moments_accumulate<T, float>(float*, float*, const T*, int64_t);                    \
  template void moments_accumulate<T, double>(double*, double*, const T*, int64_t);
MODFUSE_INSTANTIATE(float)
MODFUSE_INSTANTIATE(double)
MODFUSE_INSTANTIATE(c10::Half)
MODFUSE_INSTANTIATE(c10::BFloat16)
#undef MODFUSE_INSTANTIATE

std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& G) {
  TORCH_CHECK(G.dim() == 3 && G.is_contiguous(), "moments: G must be contiguous [M, K, D]");
  const int64_t M = G.size(0), K = G.size(1), D = G.size(2);
  const auto acc = G.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor S1 = at::empty({M, D}, G.options().dtype(acc));
  at::Tensor S2 = at::empty({M, D}, G.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "moments", [&] {
    using A = acc_t<scalar_t>;
    moments<scalar_t>(G.const_data_ptr<scalar_t>(), M, K, D, S1.data_ptr<A>(), S2.data_ptr<A>());
  });
  return {S1, S2};
}

void moments_accumulate_cpu(const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& g) {
  TORCH_CHECK(S1.is_contiguous() && S2.is_contiguous() && g.is_contiguous(),
              "moments_accumulate_: S1, S2 and g must be contiguous");
  TORCH_CHECK(S1.sizes() == S2.sizes() && S1.sizes() == g.sizes(), "moments_accumulate_: shapes must match");
  TORCH_CHECK(S1.scalar_type() == S2.scalar_type() &&
                  (S1.scalar_type() == at::kFloat || S1.scalar_type() == at::kDouble),
              "moments_accumulate_: S1 and S2 must both be float32 or both float64");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "moments_accumulate_", [&] {
    if (S1.scalar_type() == at::kDouble)
      moments_accumulate<scalar_t, double>(S1.data_ptr<double>(), S2.data_ptr<double>(),
                                           g.const_data_ptr<scalar_t>(), g.numel());
    else
      moments_accumulate<scalar_t, float>(S1.data_ptr<float>(), S2.data_ptr<float>(),
                                          g.const_data_ptr<scalar_t>(), g.numel());
  });
}

}  // namespace modfuse::cpu
