// Counter-based standard normals for segment_scale_'s noise (docs/math.md, Op 6 "The noise stream"), shared by the
// CPU kernel (csrc/cpu/segment_scale.cpp) and the CUDA kernel (csrc/cuda/segment_scale.cu), and written out again
// in plain PyTorch/numpy in modfuse/reference.py (philox4x32_10, normal_noise).
//
// Element d's value depends only on (seed, offset, d): with c = offset + d mod 2^64, one Philox4x32-10 call (Salmon
// et al., SC'11, as in Random123) with key = seed (two 32-bit words, low first) and counter = (c / 4 as 64 bits,
// 0, 0), low word first, gives four words; words 0, 1 and words 2, 3 are two Box-Muller pairs in the accumulation
// type A, and element d takes lane c mod 4 of [r01 cos t01, r01 sin t01, r23 cos t23, r23 sin t23]. So four
// consecutive counters share one call and one log + sqrt per pair, and a range that starts or ends inside a group
// of four still draws exactly its own lanes. The logarithm, the sine and the cosine are our own short series built
// from separately rounded IEEE +, -, *, / and sqrt only (no libm, no FMA), so the CPU, the GPU and the reference
// give the same bits, whatever the thread or block layout.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MODFUSE_HD __host__ __device__ __forceinline__
#else
#define MODFUSE_HD inline
#endif

namespace modfuse::philox {

struct Words {
  uint32_t w[4];
};

MODFUSE_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1): Random123's philox4x32 with R = 10.
MODFUSE_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// Separately rounded arithmetic: nvcc would contract a * b + c into an FMA; the host compiler is told not to
// (fp-contract=off in the .cpp files that include this header).
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
#else
template <typename A> inline A mul(A a, A b) { return a * b; }
template <typename A> inline A add(A a, A b) { return a + b; }
template <typename A> inline A sub(A a, A b) { return a - b; }
template <typename A> inline A div(A a, A b) { return a / b; }
inline float sqrt_rn(float a) { return __builtin_sqrtf(a); }
inline double sqrt_rn(double a) { return __builtin_sqrt(a); }
#endif

// Per-type constants: how the uniforms are cut from a pair of words and how many series terms reach full precision.
// Truncation of the series on |theta| <= pi/4, relative (the first omitted term over sin t = t sinc t, sinc t >= 0.90,
// or over cos t >= 0.70): float sin to theta^9/9!: (pi/4)^10 / 11! / 0.90 = 2.5e-9, cos to theta^10/10!:
// (pi/4)^12 / 12! / 0.70 = 1.6e-10 (float eps 6e-8); double sin to theta^17/17!: 1.2e-19, cos to theta^18/18!:
// 4.6e-21 (double eps 1.1e-16).
template <typename A> struct Spec;
template <> struct Spec<float> {
  using U = uint32_t;
  using I = int32_t;
  static constexpr int kBits = 24;                // uniforms of 24 bits (a word's top 24): exact in float
  static constexpr int kLogTerms = 4;             // 1/3 .. 1/9: truncation < 2e-9 relative
  static constexpr int kSinTerms = 5, kCosTerms = 6;
  static constexpr int kExpShift = 23, kExpBias = 126;
  static constexpr U kMantissa = 0x007FFFFFu, kHalfExponent = 0x3F000000u;
  MODFUSE_HD static void uniforms(uint32_t a, uint32_t b, U& k1, U& k2) {
    k1 = (a >> 8) + 1u;  // [1, 2^24]
    k2 = b >> 8;         // [0, 2^24)
  }
};
template <> struct Spec<double> {
  using U = uint64_t;
  using I = int64_t;
  // a whole word per uniform (four normals take the call's 128 bits): u1 >= 2^-32, so |z| <= sqrt(64 ln 2) = 6.66
  static constexpr int kBits = 32;
  static constexpr int kLogTerms = 9;                    // 1/3 .. 1/19: truncation < 3e-17 relative
  static constexpr int kSinTerms = 9, kCosTerms = 10;
  static constexpr int kExpShift = 52, kExpBias = 1022;
  static constexpr U kMantissa = 0x000FFFFFFFFFFFFFull, kHalfExponent = 0x3FE0000000000000ull;
  MODFUSE_HD static void uniforms(uint32_t a, uint32_t b, U& k1, U& k2) {
    k1 = static_cast<U>(a) + 1u;  // [1, 2^32]
    k2 = b;                       // [0, 2^32)
  }
};

// Series coefficients in double, rounded once to A (the reference rounds the same doubles the same way).
// log: ln(m) = 2 s + 2 s z P(z), s = (m - 1) / (m + 1), z = s^2, P(z) = 1/3 + z/5 + z^2/7 + ...
// sin(t) = t (1 - t^2/3! + ...), cos(t) = 1 - t^2/2! + ...
MODFUSE_HD double log_coef(int k) { return 1.0 / (2 * k + 3); }
MODFUSE_HD double sin_coef(int k) {
  double f = 1;
  for (int i = 2; i <= 2 * k + 1; ++i) f *= i;
  return (k % 2 ? -1.0 : 1.0) / f;
}
MODFUSE_HD double cos_coef(int k) {
  double f = 1;
  for (int i = 2; i <= 2 * k; ++i) f *= i;
  return (k % 2 ? -1.0 : 1.0) / f;
}

template <typename A, typename F>
MODFUSE_HD A horner(A w, int n, F coef) {
  A p = static_cast<A>(coef(n - 1));
  for (int k = n - 2; k >= 0; --k) p = add(mul(p, w), static_cast<A>(coef(k)));
  return p;
}

// Box-Muller of one pair of Philox words (a, b): r cos t and r sin t in A (float or double), r = sqrt(-2 ln u1),
// t = 2 pi u2.
template <typename A>
MODFUSE_HD void box_muller(uint32_t a, uint32_t b, A& cos_out, A& sin_out) {
  using S = Spec<A>;
  using U = typename S::U;
  using I = typename S::I;
  U k1, k2;
  S::uniforms(a, b, k1, k2);
  // radius sqrt(-2 ln u1), u1 = k1 2^-bits in (0, 1]: u1 = m 2^e with m in [sqrt(1/2), sqrt(2)) (exact frexp)
  const A u1 = mul(static_cast<A>(k1), static_cast<A>(1.0 / static_cast<double>(U(1) << S::kBits)));
  U bits;
  std::memcpy(&bits, &u1, sizeof bits);
  int e = static_cast<int>(bits >> S::kExpShift) - S::kExpBias;
  const U mbits = (bits & S::kMantissa) | S::kHalfExponent;  // m in [0.5, 1)
  A m;
  std::memcpy(&m, &mbits, sizeof m);
  if (m < static_cast<A>(0.70710678118654752440)) m = mul(m, A(2)), e -= 1;
  const A f = sub(m, A(1));  // exact (Sterbenz)
  const A s = div(f, add(A(2), f));
  const A z = mul(s, s);
  const A ln_m = add(mul(A(2), s), mul(mul(mul(A(2), s), z), horner<A>(z, S::kLogTerms, log_coef)));
  const A ln_u1 = add(mul(static_cast<A>(e), static_cast<A>(0.69314718055994530942)), ln_m);
  const A radius = sqrt_rn(mul(A(-2), ln_u1));
  // angle 2 pi u2 = q pi/2 + theta, q = round(4 u2) in 0..4 and |theta| <= pi/4, all in integers first
  const U quarter = U(1) << (S::kBits - 2);
  const U q = (k2 + (quarter >> 1)) >> (S::kBits - 2);
  const I rem = static_cast<I>(k2) - static_cast<I>(q << (S::kBits - 2));  // [-quarter/2, quarter/2)
  const A theta =
      mul(static_cast<A>(rem), static_cast<A>(3.14159265358979323846 / static_cast<double>(U(1) << (S::kBits - 1))));
  const A t2 = mul(theta, theta);
  const A sin_t = mul(theta, horner<A>(t2, S::kSinTerms, sin_coef));
  const A cos_t = horner<A>(t2, S::kCosTerms, cos_coef);
  // cos(q pi/2 + theta): q = 0 or 4: cos, 1: -sin, 2: -cos, 3: sin; sin(q pi/2 + theta): 0 or 4: sin, 1: cos,
  // 2: -sin, 3: -cos (negation is exact)
  const A c = (q & 1) ? ((q & 2) ? sin_t : -sin_t) : ((q & 2) ? -cos_t : cos_t);
  const A sn = (q & 1) ? ((q & 2) ? -cos_t : cos_t) : ((q & 2) ? -sin_t : sin_t);
  cos_out = mul(radius, c);
  sin_out = mul(radius, sn);
}

// The four normals of Philox call `group` under `seed`: counters 4 group .. 4 group + 3, in lane order.
template <typename A>
MODFUSE_HD void normals4(uint64_t seed, uint64_t group, A z[4]) {
  const Words r = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u,
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller<A>(r.w[0], r.w[1], z[0], z[1]);
  box_muller<A>(r.w[2], r.w[3], z[2], z[3]);
}

// The standard normal of counter `counter` (offset + d for element d) under `seed` (the stream's definition; the
// kernels draw whole groups with normals4 / normal_tile instead of calling this per element).
template <typename A>
MODFUSE_HD A normal(uint64_t seed, uint64_t counter) {
  A z[4];
  normals4<A>(seed, counter >> 2, z);
  return z[counter & 3u];
}

// CPU: the 4 G normals of counters counter .. counter + 4 G - 1 into out[4 G], `counter` a multiple of 4 (G Philox
// calls; the group index of lane l is (counter + 4 l mod 2^64) / 4, so a tile that crosses 2^64 wraps as the
// counters do). Every step is a loop over the G lanes; each lane does exactly what normals4() does.
template <typename A, int G>
inline void normal_tile(uint64_t seed, uint64_t counter, A* out) {
  uint32_t c0[G], c1[G], c2[G], c3[G];
  for (int l = 0; l < G; ++l) {
    const uint64_t g = (counter + 4u * static_cast<uint64_t>(l)) >> 2;
    c0[l] = static_cast<uint32_t>(g), c1[l] = static_cast<uint32_t>(g >> 32), c2[l] = 0u, c3[l] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < G; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l], p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c0[l] = n0, c1[l] = static_cast<uint32_t>(p1), c2[l] = n2, c3[l] = static_cast<uint32_t>(p0);
    }
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < G; ++l) {
    box_muller<A>(c0[l], c1[l], out[4 * l], out[4 * l + 1]);
    box_muller<A>(c2[l], c3[l], out[4 * l + 2], out[4 * l + 3]);
  }
}

}  // namespace modfuse::philox
