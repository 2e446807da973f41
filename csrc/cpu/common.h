// Shared pieces of the CPU kernels: dtype conversion that the compiler can vectorize, fixed-size tiles, and
// deterministic chunked parallelism.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace modfuse::cpu {

// Bytes per tile: one register of the widest vector unit the target has. Wider GCC vectors than the registers
// (64 bytes on AVX2) are kept on the stack by GCC 12: a 64-byte sum of squares ran 17x slower than a 32-byte one
// on an AVX2 EPYC (README, ops performance).
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;  // SSE2, NEON
#endif
// Lanes per tile: one register of the accumulation type. Inner loops over a fixed number of lanes with per-lane
// accumulators vectorize without -ffast-math reassociation.
template <typename A> constexpr int kLanes = kVecBytes / int(sizeof(A));

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

// One tile of kLanes accumulation-type values as a GCC/Clang vector: arithmetic, comparisons and ?: act lane by
// lane and compile to one register of the target (AVX-512, AVX2 or SSE) with no intrinsics.
// (The attribute must sit on concrete typedefs: GCC ignores it on a dependent template type.)
typedef float VecFloat __attribute__((vector_size(kVecBytes)));
typedef double VecDouble __attribute__((vector_size(kVecBytes)));
template <typename A> struct VecOf;
template <> struct VecOf<float> { using type = VecFloat; };
template <> struct VecOf<double> { using type = VecDouble; };
template <typename A> using Vec = typename VecOf<A>::type;

// Load kLanes values of T from p (any alignment) converted to the accumulation type.
inline Vec<float> load_vec(const float* p) { Vec<float> v; std::memcpy(&v, p, sizeof v); return v; }
inline Vec<double> load_vec(const double* p) { Vec<double> v; std::memcpy(&v, p, sizeof v); return v; }
inline Vec<float> load_vec(const c10::BFloat16* p) {
  typedef uint16_t U16 __attribute__((vector_size(kVecBytes / 2)));
  typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));
  U16 bits;
  std::memcpy(&bits, p, sizeof bits);
  const U32 wide = __builtin_convertvector(bits, U32) << 16;
  Vec<float> v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}
inline Vec<float> load_vec(const c10::Half* p) {
#ifdef __FLT16_MAX__
  typedef _Float16 H16 __attribute__((vector_size(kVecBytes / 2)));
  H16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, Vec<float>);
#else
  Vec<float> v;
  for (int l = 0; l < kLanes<float>; ++l) v[l] = float(p[l]);
  return v;
#endif
}

// Store one tile converted to T (the vector twins of store<T>).
inline void store_vec(float* p, Vec<float> v) { std::memcpy(p, &v, sizeof v); }
inline void store_vec(double* p, Vec<double> v) { std::memcpy(p, &v, sizeof v); }
inline void store_vec(c10::BFloat16* p, Vec<float> v) {
  typedef uint16_t U16 __attribute__((vector_size(kVecBytes / 2)));
  typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));
  typedef int32_t I32 __attribute__((vector_size(kVecBytes)));
  U32 u;
  std::memcpy(&u, &v, sizeof u);
  const U32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const I32 is_nan = v != v;
  const U32 bits = is_nan ? U32{} + 0x7FC0u : rounded;
  const U16 narrow = __builtin_convertvector(bits, U16);
  std::memcpy(p, &narrow, sizeof narrow);
}
inline void store_vec(c10::Half* p, Vec<float> v) {
#ifdef __FLT16_MAX__
  typedef _Float16 H16 __attribute__((vector_size(kVecBytes / 2)));
  const H16 h = __builtin_convertvector(v, H16);
  std::memcpy(p, &h, sizeof h);
#else
  for (int l = 0; l < kLanes<float>; ++l) p[l] = c10::Half(v[l]);
#endif
}

// load_as<X>(p): one value (X = acc_t<T>) or one tile (X = Vec<acc_t<T>>) from p, so a generic body serves the
// vectorized tiles and the scalar tail alike.
template <typename X, typename T>
inline X load_as(const T* p) {
  if constexpr (std::is_same_v<X, acc_t<T>>)
    return load(*p);
  else
    return load_vec(p);
}
template <typename X, typename A>
inline void store_as(A* p, X v) {
  if constexpr (std::is_same_v<X, A>)
    *p = v;
  else
    std::memcpy(p, &v, sizeof v);
}

// Work below which a kernel runs on the calling thread: waking OpenMP threads costs far more than touching
// 32K values (issue 14 item 8: a 2 x 40 segment_sq_norms took 1.2 ms at 2 threads on a busy machine, 40 us at 1).
// The same figure as ATen's own grain, at::internal::GRAIN_SIZE.
constexpr int64_t kParallelGrain = 32768;

// Run f(chunk, begin, end) over fixed chunks of [0, n). Chunk boundaries do not depend on the thread count, so
// per-chunk partial results combined in chunk order are bit-identical however many threads run. `work` is the
// number of values the whole call touches: each thread gets at least kParallelGrain of them, so small calls
// never open a parallel region.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, int64_t work, const F& f) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nchunks <= 0) return;
  const int64_t per_chunk = std::max<int64_t>(work / nchunks, 1);
  const int64_t grain = std::max<int64_t>((kParallelGrain + per_chunk - 1) / per_chunk, 1);
  at::parallel_for(0, nchunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) f(c, c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// A piece of one segment: segments longer than the block size are split so that one huge parameter does not
// serialise the work, and empty segments get no block.
struct SegmentBlock {
  int64_t segment, begin, end;
};
// Internal guard for the segment ops (user-facing checks are in modfuse/_checks.py): offsets must be int64
// [P + 1] from 0 to D, non-decreasing. Returns them contiguous; the kernels read them on the host.
inline at::Tensor checked_offsets(const at::Tensor& offsets, int64_t D, const char* op) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2 && offsets.scalar_type() == at::kLong, op,
              ": offsets must be int64 [P + 1]");
  at::Tensor off = offsets.contiguous();
  const int64_t P = off.size(0) - 1;
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[P] == D, op, ": offsets must start at 0 and end at D");
  for (int64_t p = 0; p < P; ++p) TORCH_CHECK(o[p] <= o[p + 1], op, ": offsets must not decrease");
  return off;
}

inline std::vector<SegmentBlock> segment_blocks(const int64_t* offsets, int64_t P, int64_t block) {
  std::vector<SegmentBlock> blocks;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = offsets[p]; b < offsets[p + 1]; b += block)
      blocks.push_back({p, b, std::min(offsets[p + 1], b + block)});
  return blocks;
}

// Sum of a tile's lanes in double, so per-chunk partials are exact to well below float32 rounding.
template <typename X>
inline double lane_sum(const X& tile) {
  double s = 0;
  for (int l = 0; l < int(sizeof(X) / sizeof(tile[0])); ++l) s += tile[l];
  return s;
}

// The tensor-list ops' view of a list (one dtype and device): each tensor's data pointer and element count, where
// a dense tensor is read in place in whatever dimension order it has and any other tensor through a contiguous
// copy kept alive in `copies`.
struct DenseList {
  std::vector<const void*> data;
  std::vector<int64_t> lengths;
  std::vector<at::Tensor> copies;
};
DenseList dense_list(c10::ArrayRef<at::Tensor> tensors, const char* op);  // csrc/cpu/tensor_sq_norms.cpp

// Internal guard of Op 4's `out=` (user-facing checks with full messages are in modfuse/ops.py): a contiguous [D]
// tensor of `like`'s dtype and device that shares no memory with `inputs`. csrc/cpu/calibrated_aggregate.cpp.
void check_aggregate_out(const at::Tensor& out, const at::Tensor& like, int64_t D,
                         std::initializer_list<at::Tensor> inputs, const char* op);

}  // namespace modfuse::cpu
