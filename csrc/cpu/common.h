// Shared pieces of the CPU kernels: dtype conversion that the compiler can vectorize, fixed-size tiles, and
// deterministic chunked parallelism.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace modfuse::cpu {

// Lanes per tile: 64 bytes of the accumulation type (one AVX-512 register, two AVX2 ones). Inner loops over a
// fixed number of lanes with per-lane accumulators vectorize without -ffast-math reassociation.
template <typename A> constexpr int kLanes = 64 / int(sizeof(A));

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(c10::BFloat16 v) {
  uint32_t bits = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float load(c10::Half v) {
#ifdef __FLT16_MAX__  // GCC/Clang _Float16: one vcvtph2ps per vector with F16C
  return float(__builtin_bit_cast(_Float16, v.x));
#else
  return float(v);
#endif
}

template <typename T> inline T store(acc_t<T> v) { return T(v); }
template <> inline c10::BFloat16 store<c10::BFloat16>(float v) {
  // Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16(float), without a branch.
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(uint16_t(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}
template <> inline c10::Half store<c10::Half>(float v) {
#ifdef __FLT16_MAX__
  return c10::Half(__builtin_bit_cast(uint16_t, _Float16(v)), c10::Half::from_bits());
#else
  return c10::Half(v);
#endif
}

// Run f(chunk, begin, end) over fixed chunks of [0, n). Chunk boundaries do not depend on the thread count, so
// per-chunk partial results combined in chunk order are bit-identical however many threads run.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c, c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// A piece of one segment: segments longer than the block size are split so that one huge parameter does not
// serialise the work, and empty segments get no block.
struct SegmentBlock {
  int64_t segment, begin, end;
};
inline std::vector<SegmentBlock> segment_blocks(const int64_t* offsets, int64_t P, int64_t block) {
  std::vector<SegmentBlock> blocks;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = offsets[p]; b < offsets[p + 1]; b += block)
      blocks.push_back({p, b, std::min(offsets[p + 1], b + block)});
  return blocks;
}

// Apply body(d, lane) to every d in [begin, end): whole tiles of kLanes first (the vectorized path), then the
// tail with the same body.
template <typename A, typename Body>
inline void for_each_lane(int64_t begin, int64_t end, const Body& body) {
  constexpr int V = kLanes<A>;
  int64_t d0 = begin;
  for (; d0 + V <= end; d0 += V)
    for (int l = 0; l < V; ++l) body(d0 + l, l);
  for (int l = 0; d0 + l < end; ++l) body(d0 + l, l);
}

// Sum of a lane accumulator in double, so per-chunk partials are exact to well below float32 rounding.
template <typename A>
inline double lane_sum(const A* lanes) {
  double s = 0;
  for (int l = 0; l < kLanes<A>; ++l) s += lanes[l];
  return s;
}

}  // namespace modfuse::cpu
