// Op 6b (docs/math.md): scale every segment of x[D] in place, optionally adding per-segment Gaussian noise (OGM-GE).
// The noise is drawn here, element by element, from the counter-based stream of csrc/philox_normal.h (seed, and
// counter offset + d), so no [D] noise buffer exists, the result matches the reference bit for bit, and any thread
// split (or a shard of the buffer, with its own offset) draws exactly its own elements.
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

// Normals of N consecutive counters into z[N]: philox::normal_tile (loops over lanes), or with AVX2 and float the
// same operations written with 8-lane intrinsics (GCC does not vectorize the tile loops: 18 ns a value, 4x
// torch.randn). Every lane does exactly philox_normal.h's separately rounded operations, so the bits match.
template <typename A, int N>
inline void normal_tile(uint64_t seed, uint64_t counter, A* z) {
  philox::normal_tile<A, N>(seed, counter, z);
}

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

// Eight float normals of counters counter .. counter + 7 (philox::normal<float>, lane by lane).
inline __m256 normal8(uint64_t seed, uint64_t counter) {
  using S = philox::Spec<float>;
  alignas(32) uint32_t lo32[8], hi32[8];
  for (int l = 0; l < 8; ++l) {
    const uint64_t c = counter + static_cast<uint64_t>(l);
    lo32[l] = static_cast<uint32_t>(c), hi32[l] = static_cast<uint32_t>(c >> 32);
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
  // u1 = k1 2^-24, k1 = (w0 >> 8) + 1; frexp from the bits; m in [sqrt(1/2), sqrt(2))
  const __m256i k1i = _mm256_add_epi32(_mm256_srli_epi32(c0, 8), _mm256_set1_epi32(1));
  const __m256 u1 = fmul(_mm256_cvtepi32_ps(k1i), splat(1.0 / 16777216.0));
  const __m256i bits = _mm256_castps_si256(u1);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, S::kExpShift), _mm256_set1_epi32(S::kExpBias));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(S::kMantissa))),
                                                 _mm256_set1_epi32(static_cast<int>(S::kHalfExponent))));
  const __m256 low = _mm256_cmp_ps(m, splat(0.70710678118654752440), _CMP_LT_OQ);
  m = _mm256_blendv_ps(m, fmul(m, splat(2.0)), low);
  e = _mm256_add_epi32(e, _mm256_castps_si256(low));  // the mask is -1 where low
  const __m256 f = _mm256_sub_ps(m, splat(1.0));
  const __m256 s = _mm256_div_ps(f, fadd(splat(2.0), f));
  const __m256 z = fmul(s, s);
  const __m256 two_s = fmul(splat(2.0), s);
  const __m256 ln_m = fadd(two_s, fmul(fmul(two_s, z), horner(z, S::kLogTerms, philox::log_coef)));
  const __m256 ln_u1 = fadd(fmul(_mm256_cvtepi32_ps(e), splat(0.69314718055994530942)), ln_m);
  const __m256 radius = _mm256_sqrt_ps(fmul(splat(-2.0), ln_u1));
  // angle: q = (k2 + 2^21) >> 22, rem = k2 - q 2^22, theta = rem pi 2^-23
  const __m256i k2 = _mm256_srli_epi32(c1, 8);
  const __m256i q = _mm256_srli_epi32(_mm256_add_epi32(k2, _mm256_set1_epi32(1 << 21)), 22);
  const __m256i rem = _mm256_sub_epi32(k2, _mm256_slli_epi32(q, 22));
  const __m256 theta = fmul(_mm256_cvtepi32_ps(rem), splat(3.14159265358979323846 / 8388608.0));
  const __m256 t2 = fmul(theta, theta);
  const __m256 sin_t = fmul(theta, horner(t2, S::kSinTerms, philox::sin_coef));
  const __m256 cos_t = horner(t2, S::kCosTerms, philox::cos_coef);
  // q = 0, 4: cos; 1: -sin; 2: -cos; 3: sin. Odd q takes sin; the sign flips where bit 0 xor bit 1 is set.
  const __m256 odd = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
  const __m256i flip = _mm256_slli_epi32(_mm256_and_si256(_mm256_xor_si256(q, _mm256_srli_epi32(q, 1)), _mm256_set1_epi32(1)), 31);
  const __m256 trig = _mm256_xor_ps(_mm256_blendv_ps(cos_t, sin_t, odd), _mm256_castsi256_ps(flip));
  return fmul(radius, trig);
}
}  // namespace avx2

template <>
inline void normal_tile<float, 16>(uint64_t seed, uint64_t counter, float* z) {
  _mm256_storeu_ps(z, avx2::normal8(seed, counter));
  _mm256_storeu_ps(z + 8, avx2::normal8(seed, counter + 8));
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
      constexpr int N = 16;  // normals per tile (philox::normal_tile)
      A z[N];
      int64_t d = blk.begin;
      for (; d + N <= blk.end; d += N) {
        normal_tile<A, N>(seed, offset + uint64_t(d), z);
        for (int l = 0; l < N; ++l) x[d + l] = store<T>(load(x[d + l]) * s + z[l] * sd);
      }
      for (; d < blk.end; ++d) x[d] = store<T>(load(x[d]) * s + philox::normal<A>(seed, offset + uint64_t(d)) * sd);
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
