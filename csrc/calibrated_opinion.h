// Op 4 steps 2-3 (docs/math.md) (evidence, belief, uncertainty), the one definition shared by the CPU kernel
// (csrc/cpu/calibrated_aggregate.cpp, where X is a value or a vector tile) and the CUDA kernel
// (csrc/cuda/calibrated_aggregate.cu, X = A). Plain C++ with no torch headers, so nvcc compiles it anywhere.
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

// A single division. With A = n mu^2 and B = v + eps, t2 = A / B, so
// e = clamp(t2 - 1, 0, emax) = clamp(A - B, 0, emax * B) / B, b = e / (e + kappa) = en / (en + kappa * B) and
// u = kappa * B / (en + kappa * B). `ssd` is the sum of squared deviations (S2 - n mu^2); comparisons are ordered
// so that NaN passes through (as torch.clamp does).
template <typename X, typename A>
MODFUSE_HOST_DEVICE void opinion(X mu, X ssd, A n, A inv_nm1, const OpinionParams<A>& p, X& b, X& u, X& en) {
  const X zero = X{};
  ssd = ssd < zero ? zero : ssd;  // rounding can make S2 - n mu^2 slightly negative
  const X B = ssd * inv_nm1 + p.eps;
  en = n * mu * mu - B;
  en = en < zero ? zero : en;
  const X cap = p.evidence_max * B;
  en = en > cap ? cap : en;
  const X kB = p.kappa * B;
  const X r = A(1) / (en + kB);
  b = en * r;
  u = kB * r;
}

}  // namespace modfuse
