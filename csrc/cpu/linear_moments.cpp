// Op 3 (docs/math.md): per-sample gradient moments of an nn.Linear layer without per-sample gradients.
// On the CPU this is a composition of matmuls (the fused GEMM is the GPU kernels' job):
//   T = 1: S1 = gy^T x and S2 = (gy^2)^T (x^2), two GEMMs.
//   T > 1: S1 = gy^T x over all (n, t); S2 accumulates W_n^2 one sample at a time into one [O, I] buffer, so
//          memory stays O(O * I) where the per-sample route needs O(N * O * I).
#include <ATen/ATen.h>

#include <tuple>

namespace modfuse::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_moments_cpu(const at::Tensor& x,
                                                                              const at::Tensor& gy) {
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && gy.dim() == x.dim(), "linear_moments: x and gy must be 2-D or 3-D");
  TORCH_CHECK(x.size(0) == gy.size(0) && (x.dim() == 2 || x.size(1) == gy.size(1)),
              "linear_moments: x and gy must agree on N (and T)");
  // float64 only when both are float64; mixed autocast dtypes (bf16 gy, fp32 x) accumulate in float32.
  const auto acc = x.scalar_type() == at::kDouble && gy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = x.to(acc), ga = gy.to(acc);
  const int64_t I = x.size(-1), O = gy.size(-1);
  if (x.dim() == 2) {
    return {ga.t().mm(xa), ga.square().t().mm(xa.square()), ga.sum(0), ga.square().sum(0)};
  }
  const int64_t N = x.size(0), T = x.size(1);
  at::Tensor S1 = ga.reshape({N * T, O}).t().mm(xa.reshape({N * T, I}));
  at::Tensor S2 = at::zeros({O, I}, xa.options());
  at::Tensor W = at::empty({O, I}, xa.options());
  for (int64_t n = 0; n < N; ++n) {
    at::mm_out(W, ga[n].t(), xa[n]);  // W_n, overwritten every sample
    S2.addcmul_(W, W);
  }
  const at::Tensor b = ga.sum(1);  // per-sample bias gradients [N, O]
  return {S1, S2, b.sum(0), b.square().sum(0)};
}

}  // namespace modfuse::cpu
