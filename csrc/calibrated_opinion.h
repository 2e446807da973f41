// Op 4 steps 2-3 (docs/math.md) (evidence, belief, uncertainty), the one definition shared by the CPU kernel
// (csrc/cpu/calibrated_aggregate.cpp, where X is a value or a vector tile) and the CUDA kernel
// (csrc/cuda/calibrated_aggregate.cu, X = A); modfuse/triton/calibrated_aggregate.py spells out the same steps.
// Plain C++ with no torch headers, so nvcc compiles it anywhere.
#pragma once

#if defined(__CUDACC__)
#define MODFUSE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MODFUSE_HOST_DEVICE inline
#endif

namespace modfuse {

template <typename A>
struct OpinionParams {
  A kappa, eps, evidence_max;
};

// The reference's own steps, in its order, so that no intermediate can overflow or underflow where the
// reference's does not (issue 14 item 4): t2 = n mu^2 / (v + eps) is inf when n mu^2 overflows (evidence capped,
// b ~ 1, as in the reference), and b = e / (e + kappa), u = kappa / (e + kappa) are 0 and 1 when e = 0 for any
// kappa > 0. (A single division 1 / (e_n + kappa (v + eps)) overflowed for a zero column with a tiny eps or
// kappa, giving 0 * inf = NaN.) `ssd` is the sum of squared deviations (S2 - n mu^2); comparisons are ordered so
// that NaN passes through, as torch.clamp does. Returns the evidence e in `e`.
template <typename X, typename A>
MODFUSE_HOST_DEVICE void opinion(X mu, X ssd, A n, A inv_nm1, const OpinionParams<A>& p, X& b, X& u, X& e) {
  const X zero = X{};
  ssd = ssd < zero ? zero : ssd;  // rounding can make S2 - n mu^2 slightly negative
  const X t2 = n * (mu * mu) / (ssd * inv_nm1 + p.eps);
  e = t2 - A(1);
  e = e < zero ? zero : e;
  e = e > p.evidence_max ? zero + p.evidence_max : e;
  const X total = e + p.kappa;
  b = e / total;
  u = p.kappa / total;
}

}  // namespace modfuse
