// Counter-based standard normals for segment_scale_'s noise (docs/math.md, Op 6 "The noise stream"), shared by the
// CPU kernel (csrc/cpu/segment_scale.cpp) and the CUDA kernel (csrc/cuda/segment_scale.cu), and written out again
// in plain PyTorch/numpy in modfuse/reference.py (philox4x32_10, normal_noise).
//
// Element d's value depends only on (seed, offset, d): Philox4x32-10 (Salmon et al., SC'11, as in Random123) with
// key = seed (two 32-bit words, low first) and counter = (offset + d mod 2^64, 0, 0), low word first; then
// Box-Muller in the accumulation type A. The logarithm and the cosine are our own short series built from
// separately rounded IEEE +, -, *, / and sqrt only (no libm, no FMA), so the CPU, the GPU and the reference give
// the same bits, whatever the thread or block layout.
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

// Per-type constants: how the uniforms are cut from the words and how many series terms reach full precision.
template <typename A> struct Spec;
template <> struct Spec<float> {
  using U = uint32_t;
  using I = int32_t;
  static constexpr int kBits = 24;                // uniforms of 24 bits: exact in float
  static constexpr int kLogTerms = 4;             // 1/3 .. 1/9: truncation < 2e-9 relative
  static constexpr int kSinTerms = 5, kCosTerms = 6;  // theta^9 / 9!, theta^10 / 10!: < 3e-8
  static constexpr int kExpShift = 23, kExpBias = 126;
  static constexpr U kMantissa = 0x007FFFFFu, kHalfExponent = 0x3F000000u;
  MODFUSE_HD static void uniforms(const Words& r, U& k1, U& k2) {
    k1 = (r.w[0] >> 8) + 1u;  // [1, 2^24]
    k2 = r.w[1] >> 8;         // [0, 2^24)
  }
};
template <> struct Spec<double> {
  using U = uint64_t;
  using I = int64_t;
  static constexpr int kBits = 53;
  static constexpr int kLogTerms = 9;                    // 1/3 .. 1/19: truncation < 3e-17 relative
  static constexpr int kSinTerms = 9, kCosTerms = 10;    // < 1e-18
  static constexpr int kExpShift = 52, kExpBias = 1022;
  static constexpr U kMantissa = 0x000FFFFFFFFFFFFFull, kHalfExponent = 0x3FE0000000000000ull;
  MODFUSE_HD static void uniforms(const Words& r, U& k1, U& k2) {
    k1 = ((static_cast<U>(r.w[0]) << 21) | (r.w[1] >> 11)) + 1u;  // [1, 2^53]
    k2 = (static_cast<U>(r.w[2]) << 21) | (r.w[3] >> 11);         // [0, 2^53)
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

// Box-Muller of one Philox output: a standard normal in A (float or double).
template <typename A>
MODFUSE_HD A from_words(const Words& r) {
  using S = Spec<A>;
  using U = typename S::U;
  using I = typename S::I;
  U k1, k2;
  S::uniforms(r, k1, k2);
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
  // cos(q pi/2 + theta): q = 0 or 4: cos, 1: -sin, 2: -cos, 3: sin
  const A trig = (q & 1) ? ((q & 2) ? sin_t : -sin_t) : ((q & 2) ? -cos_t : cos_t);
  return mul(radius, trig);
}

// The standard normal of counter `counter` (offset + d for element d) under `seed`.
template <typename A>
MODFUSE_HD A normal(uint64_t seed, uint64_t counter) {
  return from_words<A>(philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                                     static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)));
}

// CPU: the normals of counters counter .. counter + N - 1 into out[N]. Every step is a loop over the N lanes that
// the compiler vectorizes (AVX2: vpmuludq for the 32x32->64 products); each lane does exactly what normal() does.
template <typename A, int N>
inline void normal_tile(uint64_t seed, uint64_t counter, A* out) {
  uint32_t c0[N], c1[N], c2[N], c3[N];
  for (int l = 0; l < N; ++l) {
    const uint64_t c = counter + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(c), c1[l] = static_cast<uint32_t>(c >> 32), c2[l] = 0u, c3[l] = 0u;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < N; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l], p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c0[l] = n0, c1[l] = static_cast<uint32_t>(p1), c2[l] = n2, c3[l] = static_cast<uint32_t>(p0);
    }
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < N; ++l) out[l] = from_words<A>(Words{{c0[l], c1[l], c2[l], c3[l]}});
}

}  // namespace modfuse::philox
