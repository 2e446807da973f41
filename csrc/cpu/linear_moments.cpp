// Op 3 (docs/math.md): per-sample gradient moments of an nn.Linear layer without per-sample gradients.
// On the CPU this is a composition of matmuls (the fused GEMM is the GPU kernels' job):
//   T = 1: S1 = gy^T x and S2 = (gy^2)^T (x^2), two GEMMs, with each sample's gy and x first balanced by a
//          power of two (see balanced_squares).
//   T > 1: S1 = gy^T x over all (n, t); S2 accumulates W_n^2 one sample at a time into one [O, I] buffer, so
//          memory stays O(O * I) where the per-sample route needs O(N * O * I).
// With s1 (the caller's weight gradient of the summed loss, which the ordinary backward already computed) the S1
// GEMM is skipped and S1 comes back empty: the caller has it (modfuse.ops returns s1 as S1). T = 1 then runs one
// GEMM, not two, and no [O, I] copy.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace modfuse::cpu {

// (gy_n^2) and (x_n^2) of the T = 1 form overflow (or underflow) on their own where the reference's
// W_n^2 = (gy_n x_n)^2 is finite (issue 14 item 4: |gy| = 1e20, |x| = 1e-10 gave inf for 1e20). Scaling sample n's
// gy by 2^s_n and its x by 2^-s_n changes no product gy x, and no rounding (powers of two are exact), but with
// s_n = (e(max|x_n|) - e(max|gy_n|)) / 2 both have a maximum near sqrt(max|W_n|), so their squares overflow only
// where W_n^2 itself does. The Triton kernel (modfuse/triton/linear_moments.py) uses the same shifts.
namespace {
std::tuple<at::Tensor, at::Tensor> balanced_squares(const at::Tensor& ga, const at::Tensor& xa) {
  if (ga.numel() == 0 || xa.numel() == 0) return {ga.square(), xa.square()};
  if (ga.is_cpu()) {  // the common case, cheaply (two reductions; no device sync): no square can overflow
    const double safe = ga.scalar_type() == at::kDouble ? 0x1p511 : 0x1p63;
    if (ga.abs().max().item<double>() < safe && xa.abs().max().item<double>() < safe) return {ga.square(), xa.square()};
  }
  const int64_t limit = ga.scalar_type() == at::kDouble ? 1022 : 126;  // 2^limit stays a normal number
  const at::Tensor eg = std::get<1>(at::frexp(ga.abs().amax(1)));
  const at::Tensor ex = std::get<1>(at::frexp(xa.abs().amax(1)));
  const at::Tensor shift = at::div(ex - eg, 2, "floor").clamp(-limit, limit).to(at::kDouble).unsqueeze(1);
  const at::ScalarType acc = ga.scalar_type();
  return {(ga * at::exp2(shift).to(acc)).square(), (xa * at::exp2(-shift).to(acc)).square()};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_moments_cpu(const at::Tensor& x,
                                                                              const at::Tensor& gy,
                                                                              const std::optional<at::Tensor>& s1) {
  TORCH_CHECK((x.dim() == 2 || x.dim() == 3) && gy.dim() == x.dim(), "linear_moments: x and gy must be 2-D or 3-D");
  TORCH_CHECK(x.size(0) == gy.size(0) && (x.dim() == 2 || x.size(1) == gy.size(1)),
              "linear_moments: x and gy must agree on N (and T)");
  // float64 only when both are float64; mixed autocast dtypes (bf16 gy, fp32 x) accumulate in float32.
  const auto acc = x.scalar_type() == at::kDouble && gy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = x.to(acc), ga = gy.to(acc);
  const int64_t I = x.size(-1), O = gy.size(-1);
  TORCH_CHECK(!s1 || (s1->dim() == 2 && s1->size(0) == O && s1->size(1) == I && s1->device() == x.device()),
              "linear_moments: s1 must be [O, I] on x's device");
  const auto given_s1 = [&] { return at::empty({0}, xa.options()); };
  if (x.dim() == 2) {
    const auto [g2, x2] = balanced_squares(ga, xa);
    return {s1 ? given_s1() : ga.t().mm(xa), g2.t().mm(x2), ga.sum(0), ga.square().sum(0)};
  }
  const int64_t N = x.size(0), T = x.size(1);
  at::Tensor S1 = s1 ? given_s1() : ga.reshape({N * T, O}).t().mm(xa.reshape({N * T, I}));
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
