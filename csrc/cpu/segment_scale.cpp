// Op 6b (docs/math.md): scale every segment of x[D] in place, optionally adding per-segment Gaussian noise (OGM-GE).
// The noise is drawn here from the counter-based stream of csrc/philox_normal.h (seed, and counter offset + d; one
// Philox call gives the 4 normals of an aligned group of 4 counters), so no [D] noise buffer exists, the result
// matches the reference bit for bit, and any thread split (or a shard of the buffer, with its own offset) draws
// exactly its own elements.
// No FMA contraction in this file (GCC and Clang contract a * b + c under -O3 -march=native by default): the
// in-place results must equal the reference's separately rounded multiply and add bit for bit (issue 14 item 9).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/common.h"
#include "philox_normal.h"

namespace modfuse::cpu {

constexpr int64_t kScaleBlock = 32768;

// Normals of the 4 G consecutive counters counter .. counter + 4 G - 1 (counter a multiple of 4) into z[4 G]:
// philox::normal_tile (loops over calls), or with AVX2 the same operations written with intrinsics, one Philox call
// per 32-bit lane, Box-Muller in 8 float or 4 double lanes (GCC does not vectorize the tile loops). Every lane does exactly
// philox_normal.h's separately rounded operations, so the bits match.
template <typename A, int G>
inline void normal_tile(uint64_t seed, uint64_t counter, A* z) {
  philox::normal_tile<A, G>(seed, counter, z);
}
// Philox calls per tile: 8 fill the 8 integer lanes of AVX2 (for double, two Box-Muller passes of 4 lanes).
template <typename A> constexpr int kTileCalls = 4;
#if defined(__AVX2__)
template <> constexpr int kTileCalls<float> = 8;
template <> constexpr int kTileCalls<double> = 8;
#endif

#if defined(__AVX2__)
namespace avx2 {
inline void mulhilo(__m256i c, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
inline __m256 fmul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 fadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 splat(double v) { return _mm256_set1_ps(static_cast<float>(v)); }
template <typename F>
inline __m256 horner(__m256 w, int n, F coef) {
  __m256 p = splat(coef(n - 1));
  for (int k = n - 2; k >= 0; --k) p = fadd(fmul(p, w), splat(coef(k)));
  return p;
}

// philox::box_muller<float> of eight word pairs (a, b), lane by lane: r cos t into c, r sin t into s.
inline void box_muller8(__m256i a, __m256i b, __m256& c, __m256& s) {
  using S = philox::Spec<float>;
  // u1 = k1 2^-24, k1 = (a >> 8) + 1; frexp from the bits; m in [sqrt(1/2), sqrt(2))
  const __m256i k1i = _mm256_add_epi32(_mm256_srli_epi32(a, 8), _mm256_set1_epi32(1));
  const __m256 u1 = fmul(_mm256_cvtepi32_ps(k1i), splat(1.0 / 16777216.0));
  const __m256i bits = _mm256_castps_si256(u1);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, S::kExpShift), _mm256_set1_epi32(S::kExpBias));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(S::kMantissa))),
                                                 _mm256_set1_epi32(static_cast<int>(S::kHalfExponent))));
  const __m256 low = _mm256_cmp_ps(m, splat(0.70710678118654752440), _CMP_LT_OQ);
  m = _mm256_blendv_ps(m, fmul(m, splat(2.0)), low);
  e = _mm256_add_epi32(e, _mm256_castps_si256(low));  // the mask is -1 where low
  const __m256 f = _mm256_sub_ps(m, splat(1.0));
  const __m256 sv = _mm256_div_ps(f, fadd(splat(2.0), f));
  const __m256 z = fmul(sv, sv);
  const __m256 two_s = fmul(splat(2.0), sv);
  const __m256 ln_m = fadd(two_s, fmul(fmul(two_s, z), horner(z, S::kLogTerms, philox::log_coef)));
  const __m256 ln_u1 = fadd(fmul(_mm256_cvtepi32_ps(e), splat(0.69314718055994530942)), ln_m);
  const __m256 radius = _mm256_sqrt_ps(fmul(splat(-2.0), ln_u1));
  // angle: k2 = b >> 8, q = (k2 + 2^21) >> 22, rem = k2 - q 2^22, theta = rem pi 2^-23
  const __m256i k2 = _mm256_srli_epi32(b, 8);
  const __m256i q = _mm256_srli_epi32(_mm256_add_epi32(k2, _mm256_set1_epi32(1 << 21)), 22);
  const __m256i rem = _mm256_sub_epi32(k2, _mm256_slli_epi32(q, 22));
  const __m256 theta = fmul(_mm256_cvtepi32_ps(rem), splat(3.14159265358979323846 / 8388608.0));
  const __m256 t2 = fmul(theta, theta);
  const __m256 sin_t = fmul(theta, horner(t2, S::kSinTerms, philox::sin_coef));
  const __m256 cos_t = horner(t2, S::kCosTerms, philox::cos_coef);
  // Odd q swaps the two. The cosine's sign flips where bit 0 xor bit 1 of q is set (q = 1, 2), the sine's where
  // bit 1 is (q = 2, 3).
  const __m256 odd = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256i flip_cos = _mm256_slli_epi32(_mm256_and_si256(_mm256_xor_si256(q, _mm256_srli_epi32(q, 1)), _mm256_set1_epi32(1)), 31);
  const __m256i flip_sin = _mm256_slli_epi32(_mm256_and_si256(q, _mm256_set1_epi32(2)), 30);
  c = fmul(radius, _mm256_xor_ps(_mm256_blendv_ps(cos_t, sin_t, odd), _mm256_castsi256_ps(flip_cos)));
  s = fmul(radius, _mm256_xor_ps(_mm256_blendv_ps(sin_t, cos_t, odd), _mm256_castsi256_ps(flip_sin)));
}

// Philox4x32-10 of the eight calls (counter + 4 l) / 4, l < 8, under `seed`: the four words of every call, one
// call per 32-bit lane (philox::normal_tile's loop, lane by lane).
inline void philox8(uint64_t seed, uint64_t counter, __m256i w[4]) {
  alignas(32) uint32_t lo32[8], hi32[8];
  for (int l = 0; l < 8; ++l) {
    const uint64_t g = (counter + 4u * static_cast<uint64_t>(l)) >> 2;
    lo32[l] = static_cast<uint32_t>(g), hi32[l] = static_cast<uint32_t>(g >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u)), m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, hi0, lo0);
    mulhilo(c2, m1, hi1, lo1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
  w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

// The 32 float normals of counters counter .. counter + 31 (counter a multiple of 4): eight Philox calls, one per
// lane, into z[32] in counter order.
inline void normals32(uint64_t seed, uint64_t counter, float* z) {
  __m256i w[4];
  philox8(seed, counter, w);
  __m256 cos01, sin01, cos23, sin23;
  box_muller8(w[0], w[1], cos01, sin01);
  box_muller8(w[2], w[3], cos23, sin23);
  // transpose the four [8] vectors into counter order: call l's lanes [cos01, sin01, cos23, sin23] at z[4 l ..]
  const __m256 t0 = _mm256_unpacklo_ps(cos01, sin01), t1 = _mm256_unpackhi_ps(cos01, sin01);
  const __m256 t2 = _mm256_unpacklo_ps(cos23, sin23), t3 = _mm256_unpackhi_ps(cos23, sin23);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);  // calls 0, 4 / 1, 5
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);  // calls 2, 6 / 3, 7
  _mm256_storeu_ps(z, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

// double: philox::box_muller<double> of four word pairs (a, b) (uint32 lanes), lane by lane, into c and s.
inline __m256d splat_d(double v) { return _mm256_set1_pd(v); }
template <typename F>
inline __m256d horner_d(__m256d w, int n, F coef) {
  __m256d p = splat_d(coef(n - 1));
  for (int k = n - 2; k >= 0; --k) p = _mm256_add_pd(_mm256_mul_pd(p, w), splat_d(coef(k)));
  return p;
}
inline __m256d u32_to_double(__m128i v) {  // exact: (v - 2^31 as int32) + 2^31
  return _mm256_add_pd(_mm256_cvtepi32_pd(_mm_xor_si128(v, _mm_set1_epi32(static_cast<int>(0x80000000u)))),
                       splat_d(2147483648.0));
}
inline void box_muller4d(__m128i a, __m128i b, __m256d& c, __m256d& s) {
  using S = philox::Spec<double>;
  // u1 = (a + 1) 2^-32 (exact); frexp from the bits; m in [sqrt(1/2), sqrt(2))
  const __m256d u1 = _mm256_mul_pd(_mm256_add_pd(u32_to_double(a), splat_d(1.0)), splat_d(1.0 / 4294967296.0));
  const __m256i bits = _mm256_castpd_si256(u1);
  __m256i e = _mm256_sub_epi64(_mm256_srli_epi64(bits, S::kExpShift), _mm256_set1_epi64x(S::kExpBias));
  __m256d m = _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(static_cast<long long>(S::kMantissa))),
                                                  _mm256_set1_epi64x(static_cast<long long>(S::kHalfExponent))));
  const __m256d low = _mm256_cmp_pd(m, splat_d(0.70710678118654752440), _CMP_LT_OQ);
  m = _mm256_blendv_pd(m, _mm256_mul_pd(m, splat_d(2.0)), low);
  e = _mm256_add_epi64(e, _mm256_castpd_si256(low));  // the mask is -1 where low
  // e (small, in the low 32 bits of each 64-bit lane) to double: gather the low halves, convert as int32
  const __m128i e32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(e, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)));
  const __m256d f = _mm256_sub_pd(m, splat_d(1.0));
  const __m256d sv = _mm256_div_pd(f, _mm256_add_pd(splat_d(2.0), f));
  const __m256d z = _mm256_mul_pd(sv, sv);
  const __m256d two_s = _mm256_mul_pd(splat_d(2.0), sv);
  const __m256d ln_m = _mm256_add_pd(two_s, _mm256_mul_pd(_mm256_mul_pd(two_s, z), horner_d(z, S::kLogTerms, philox::log_coef)));
  const __m256d ln_u1 = _mm256_add_pd(_mm256_mul_pd(_mm256_cvtepi32_pd(e32), splat_d(0.69314718055994530942)), ln_m);
  const __m256d radius = _mm256_sqrt_pd(_mm256_mul_pd(splat_d(-2.0), ln_u1));
  // angle: q = round(b / 2^30) = (b >> 30) + bit 29 of b (no overflow in 32 bits), rem = b - q 2^30 as int32
  // (exact mod 2^32: it lies in [-2^29, 2^29)), theta = rem pi 2^-31
  const __m128i q = _mm_add_epi32(_mm_srli_epi32(b, 30), _mm_and_si128(_mm_srli_epi32(b, 29), _mm_set1_epi32(1)));
  const __m128i rem = _mm_sub_epi32(b, _mm_slli_epi32(q, 30));
  const __m256d theta = _mm256_mul_pd(_mm256_cvtepi32_pd(rem), splat_d(3.14159265358979323846 / 2147483648.0));
  const __m256d t2 = _mm256_mul_pd(theta, theta);
  const __m256d sin_t = _mm256_mul_pd(theta, horner_d(t2, S::kSinTerms, philox::sin_coef));
  const __m256d cos_t = horner_d(t2, S::kCosTerms, philox::cos_coef);
  // the quadrant as in box_muller8, in 64-bit lanes
  const __m256i q64 = _mm256_cvtepu32_epi64(q);
  const __m256d odd = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(q64, _mm256_set1_epi64x(1)), _mm256_set1_epi64x(1)));
  const __m256i flip_cos = _mm256_slli_epi64(_mm256_and_si256(_mm256_xor_si256(q64, _mm256_srli_epi64(q64, 1)), _mm256_set1_epi64x(1)), 63);
  const __m256i flip_sin = _mm256_slli_epi64(_mm256_and_si256(q64, _mm256_set1_epi64x(2)), 62);
  c = _mm256_mul_pd(radius, _mm256_xor_pd(_mm256_blendv_pd(cos_t, sin_t, odd), _mm256_castsi256_pd(flip_cos)));
  s = _mm256_mul_pd(radius, _mm256_xor_pd(_mm256_blendv_pd(sin_t, cos_t, odd), _mm256_castsi256_pd(flip_sin)));
}

// The 32 double normals of counters counter .. counter + 31 (counter a multiple of 4): eight Philox calls, Box-Muller
// four calls at a time, into z[32] in counter order.
inline void normals32(uint64_t seed, uint64_t counter, double* z) {
  __m256i w[4];
  philox8(seed, counter, w);
  for (int half = 0; half < 2; ++half) {  // calls 4 half .. 4 half + 3
    const auto pick = [&](int i) {
      return half ? _mm256_extracti128_si256(w[i], 1) : _mm256_castsi256_si128(w[i]);
    };
    __m256d cos01, sin01, cos23, sin23;
    box_muller4d(pick(0), pick(1), cos01, sin01);
    box_muller4d(pick(2), pick(3), cos23, sin23);
    // transpose into counter order: call l's [cos01, sin01, cos23, sin23] at z[4 l ..]
    const __m256d t0 = _mm256_unpacklo_pd(cos01, sin01), t1 = _mm256_unpackhi_pd(cos01, sin01);  // calls 0, 2 / 1, 3
    const __m256d t2 = _mm256_unpacklo_pd(cos23, sin23), t3 = _mm256_unpackhi_pd(cos23, sin23);
    double* out = z + 16 * half;
    _mm256_storeu_pd(out, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_storeu_pd(out + 4, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_storeu_pd(out + 8, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_storeu_pd(out + 12, _mm256_permute2f128_pd(t1, t3, 0x31));
  }
}
}  // namespace avx2

template <>
inline void normal_tile<float, 8>(uint64_t seed, uint64_t counter, float* z) {
  avx2::normals32(seed, counter, z);
}
template <>
inline void normal_tile<double, 8>(uint64_t seed, uint64_t counter, double* z) {
  avx2::normals32(seed, counter, z);
}
#endif

template <typename T>
void segment_scale(T* x, int64_t D, const int64_t* offsets, int64_t P, const acc_t<T>* scale,
                   const acc_t<T>* noise_std, uint64_t seed, uint64_t offset) {
  using A = acc_t<T>;
  const std::vector<SegmentBlock> blocks = segment_blocks(offsets, P, kScaleBlock);
  parallel_chunks(int64_t(blocks.size()), 1, D, [&](int64_t b, int64_t, int64_t) {
    const SegmentBlock& blk = blocks[b];
    const A s = scale[blk.segment];
    const A sd = noise_std ? noise_std[blk.segment] : A(0);
    if (sd != A(0)) {  // (a zero std adds +-0: the same values, so those segments skip the draw)
      // One Philox call per aligned group of 4 counters (the counter is offset + d over the flat buffer, not per
      // segment): a head up to the first multiple of 4, whole tiles, then the last groups, cut at the block's end.
      const auto noisy = [&](int64_t d, A z) { x[d] = store<T>(load(x[d]) * s + z * sd); };
      A g[4];
      int64_t d = blk.begin;
      if (const uint64_t lane = (offset + uint64_t(d)) & 3u; lane != 0) {
        philox::normals4<A>(seed, (offset + uint64_t(d)) >> 2, g);
        for (uint64_t j = lane; j < 4 && d < blk.end; ++j, ++d) noisy(d, g[j]);
      }
      constexpr int N = 4 * kTileCalls<A>;
      A z[N];
      for (; d + N <= blk.end; d += N) {
        normal_tile<A, kTileCalls<A>>(seed, offset + uint64_t(d), z);
        for (int l = 0; l < N; ++l) noisy(d + l, z[l]);
      }
      for (; d < blk.end; d += 4) {
        philox::normals4<A>(seed, (offset + uint64_t(d)) >> 2, g);
        for (int j = 0; j < 4 && d + j < blk.end; ++j) noisy(d + j, g[j]);
      }
    } else {
      for (int64_t d = blk.begin; d < blk.end; ++d) x[d] = store<T>(load(x[d]) * s);
    }
  });
}

#define MODFUSE_INSTANTIATE(T) \
  template void segment_scale<T>(T*, int64_t, const int64_t*, int64_t, const acc_t<T>*, const acc_t<T>*, uint64_t, \
                                 uint64_t);
MODFUSE_INSTANTIATE(float)
MODFUSE_INSTANTIATE(double)
MODFUSE_INSTANTIATE(c10::Half)
MODFUSE_INSTANTIATE(c10::BFloat16)
#undef MODFUSE_INSTANTIATE

void segment_scale_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& scale,
                       const std::optional<at::Tensor>& noise_std, int64_t seed, int64_t offset) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "segment_scale_: x must be contiguous [D]");
  const int64_t D = x.size(0);
  const at::Tensor off = checked_offsets(offsets, D, "segment_scale_");
  const int64_t P = off.size(0) - 1;
  const int64_t* o = off.const_data_ptr<int64_t>();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.scalar_type() == acc && scale.is_contiguous() && scale.numel() == P,
              "segment_scale_: scale must be [P] in the accumulation dtype");
  if (noise_std) {
    TORCH_CHECK(noise_std->scalar_type() == acc && noise_std->is_contiguous() && noise_std->numel() == P,
                "segment_scale_: noise_std must be [P] in the accumulation dtype");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_scale_", [&] {
    using A = acc_t<scalar_t>;
    segment_scale<scalar_t>(x.data_ptr<scalar_t>(), D, o, P, scale.const_data_ptr<A>(),
                            noise_std ? noise_std->const_data_ptr<A>() : nullptr, uint64_t(seed), uint64_t(offset));
  });
}

}  // namespace modfuse::cpu
