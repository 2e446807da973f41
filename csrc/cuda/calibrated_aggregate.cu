// Op 4 (docs/math.md): uncertainty-calibrated aggregation, one pass over the input.
// Moments form reads S1[M, D] and S2[M, D]; samples form reads G[M, K, D] once (shifted single-pass variance).
// Both write out[D] (and optionally the fused uncertainty[D]) and stats[M, 4]. Per element the mean, variance,
// evidence and belief of every modality stay in registers. Stats: each block sums its elements' contributions
// (a fixed shuffle tree) into workspace partials [blocks, M, 4]; a second kernel adds the partials in block
// order in float64. The grid size depends only on D, so the stats repeat bit for bit.
#include <type_traits>

#include "calibrated_opinion.h"
#include "cuda/common.cuh"

namespace modfuse::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;  // partials: at most 1024 * M * 4 values
constexpr int kMaxModalities = 16;

// Op 4 steps 2-3 (docs/math.md): the opinion shared with the CPU kernel (csrc/calibrated_opinion.h).
template <typename A>
using Params = OpinionParams<A>;

template <typename A, int MAXM>
struct Stats {
  A v[MAXM][4];
};

// One modality's contribution at one element: output, product of uncertainties, stats.
template <typename A, int MAXM>
__device__ __forceinline__ void accumulate(int m, A mu, A ssd, A n, A inv_nm1, const Params<A>& p, A& o, A& uu,
                                           Stats<A, MAXM>& st) {
  A b, u, e;
  opinion(mu, ssd, n, inv_nm1, p, b, u, e);
  const A bmu = b * mu;
  o += bmu;
  uu *= u;
  st.v[m][0] += mu * mu;
  st.v[m][1] += bmu * bmu;
  st.v[m][2] += b;
  st.v[m][3] += e == A(0) ? A(1) : A(0);
}

template <typename A, int MAXM>
__device__ __forceinline__ void write_partials(Stats<A, MAXM>& st, int64_t M, A* shared, double* partial) {
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    if (m >= M) break;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const A total = block_sum(st.v[m][j], shared);
      if (threadIdx.x == 0) partial[(static_cast<int64_t>(blockIdx.x) * M + m) * 4 + j] = static_cast<double>(total);
    }
  }
}

// Moments form: V consecutive elements per thread (16-byte loads for float32 / float64, 8 for half types).
template <typename T, int V, int MAXM>
__global__ void __launch_bounds__(kThreads) moments_form_kernel(const T* __restrict__ S1, const T* __restrict__ S2,
                                                                const acc_t<T>* __restrict__ n, int64_t M, int64_t D,
                                                                Params<acc_t<T>> p, T* __restrict__ out,
                                                                T* __restrict__ uncertainty, double* partial) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  A nm[MAXM], inv_n[MAXM], inv_nm1[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    nm[m] = m < M ? n[m] : A(2);
    inv_n[m] = A(1) / nm[m];
    inv_nm1[m] = A(1) / (nm[m] - A(1));
  }
  Stats<A, MAXM> st;
#pragma unroll
  for (int m = 0; m < MAXM; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) st.v[m][j] = A(0);
  const int64_t groups = D / V;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < groups;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i * V;
    A o[V], uu[V];
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = A(0), uu[j] = A(1);
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m >= M) break;
      const Pack<T, V> a = *reinterpret_cast<const Pack<T, V>*>(S1 + m * D + d);
      const Pack<T, V> q = *reinterpret_cast<const Pack<T, V>*>(S2 + m * D + d);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A x1 = to_acc<A>(a.v[j]);
        const A mu = x1 * inv_n[m];
        accumulate(m, mu, to_acc<A>(q.v[j]) - x1 * mu, nm[m], inv_nm1[m], p, o[j], uu[j], st);
      }
    }
    Pack<T, V> po, pu;
#pragma unroll
    for (int j = 0; j < V; ++j) po.v[j] = from_acc<T>(o[j]), pu.v[j] = from_acc<T>(uu[j]);
    *reinterpret_cast<Pack<T, V>*>(out + d) = po;
    if (uncertainty != nullptr) *reinterpret_cast<Pack<T, V>*>(uncertainty + d) = pu;
  }
  write_partials(st, M, shared, partial);
}

// Samples form: one element per thread; per modality g0 = the first sample, then s1 = sum (g - g0) and
// s2 = sum (g - g0)^2 in one pass, so mean = g0 + s1 / K and sum of squared deviations = s2 - s1^2 / K: exact
// algebra, and the shift by a sample keeps the cancellation of the plain S2 - K mu^2 away.
template <typename T, int MAXM>
__global__ void __launch_bounds__(kThreads) samples_form_kernel(const T* __restrict__ G, int64_t M, int64_t K,
                                                                int64_t D, Params<acc_t<T>> p, T* __restrict__ out,
                                                                T* __restrict__ uncertainty, double* partial) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  const A n = static_cast<A>(K), inv_n = A(1) / n, inv_nm1 = A(1) / (n - A(1));
  Stats<A, MAXM> st;
#pragma unroll
  for (int m = 0; m < MAXM; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) st.v[m][j] = A(0);
  for (int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; d < D;
       d += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A o = A(0), uu = A(1);
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m >= M) break;
      const T* g = G + m * K * D + d;
      const A g0 = to_acc<A>(g[0]);
      A s1 = A(0), s2 = A(0);
      for (int64_t k = 1; k < K; ++k) {
        const A delta = to_acc<A>(g[k * D]) - g0;
        s1 += delta;
        s2 += delta * delta;
      }
      accumulate(m, g0 + s1 * inv_n, s2 - s1 * s1 * inv_n, n, inv_nm1, p, o, uu, st);
    }
    out[d] = from_acc<T>(o);
    if (uncertainty != nullptr) uncertainty[d] = from_acc<T>(uu);
  }
  write_partials(st, M, shared, partial);
}

// stats[m] = (sum mu^2, sum (b mu)^2, mean b, fraction e = 0) from `blocks` partial rows, in block order.
template <typename A>
__global__ void finish_kernel(const double* __restrict__ partial, int64_t blocks, int64_t M, int64_t D,
                              A* __restrict__ stats) {
  const int64_t i = threadIdx.x;  // one thread per (m, j): M * 4 <= 64
  if (i >= M * 4) return;
  double s = 0;
  for (int64_t b = 0; b < blocks; ++b) s += partial[b * M * 4 + i];
  const int j = static_cast<int>(i % 4);
  stats[i] = static_cast<A>(j >= 2 ? s / static_cast<double>(D) : s);
}

// Picks the register budget for the per-thread stats: M <= 4, <= 8 or <= 16 modalities.
template <typename F>
int by_modalities(int64_t M, F&& f) {
  if (M <= 4) return f(std::integral_constant<int, 4>{});
  if (M <= 8) return f(std::integral_constant<int, 8>{});
  if (M <= kMaxModalities) return f(std::integral_constant<int, kMaxModalities>{});
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename T>
constexpr int vec_width() {
  return kVec16<T> < 4 ? kVec16<T> : 4;  // 4 float / half / bfloat16, 2 double: bounded register use
}

}  // namespace

int64_t calibrated_aggregate_workspace(int64_t M, int64_t D, DType) {
  // at most kMaxBlocks partial rows of M * 4 doubles (both forms)
  return grid_for(D, kThreads, kMaxBlocks) * M * 4 * static_cast<int64_t>(sizeof(double));
}

int calibrated_aggregate(const void* S1, const void* S2, const void* n, DType t, int64_t M, int64_t D, double kappa,
                         double eps, double evidence_max, void* out, void* uncertainty, void* stats, void* workspace,
                         void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  auto* partial = static_cast<double*>(workspace);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    constexpr int V = vec_width<T>();
    const Params<A> p{static_cast<A>(kappa), static_cast<A>(eps), static_cast<A>(evidence_max)};
    const bool vec = aligned_to(S1, V * sizeof(T)) && aligned_to(S2, V * sizeof(T)) && aligned_to(out, V * sizeof(T)) &&
                     aligned_to(uncertainty, V * sizeof(T)) && D % V == 0;
    return by_modalities(M, [&](auto max_m) {
      constexpr int MAXM = decltype(max_m)::value;
      const T* a = static_cast<const T*>(S1);
      const T* q = static_cast<const T*>(S2);
      const A* counts = static_cast<const A*>(n);
      T* o = static_cast<T*>(out);
      T* u = static_cast<T*>(uncertainty);
      int64_t blocks;
      if (vec) {
        blocks = grid_for(D / V, kThreads, kMaxBlocks);
        moments_form_kernel<T, V, MAXM><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(a, q, counts, M, D, p, o, u,
                                                                                          partial);
      } else {
        // unaligned or D % V != 0: the bulk with one element per thread
        blocks = grid_for(D, kThreads, kMaxBlocks);
        moments_form_kernel<T, 1, MAXM><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(a, q, counts, M, D, p, o, u,
                                                                                          partial);
      }
      finish_kernel<A><<<1, 64, 0, s>>>(partial, blocks, M, D, static_cast<A*>(stats));
      return to_int(cudaGetLastError());
    });
  });
}

int calibrated_aggregate_samples(const void* G, DType t, int64_t M, int64_t K, int64_t D, double kappa, double eps,
                                 double evidence_max, void* out, void* uncertainty, void* stats, void* workspace,
                                 void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  auto* partial = static_cast<double*>(workspace);
  return dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const Params<A> p{static_cast<A>(kappa), static_cast<A>(eps), static_cast<A>(evidence_max)};
    return by_modalities(M, [&](auto max_m) {
      constexpr int MAXM = decltype(max_m)::value;
      const int64_t blocks = grid_for(D, kThreads, kMaxBlocks);
      samples_form_kernel<T, MAXM><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          static_cast<const T*>(G), M, K, D, p, static_cast<T*>(out), static_cast<T*>(uncertainty), partial);
      finish_kernel<A><<<1, 64, 0, s>>>(partial, blocks, M, D, static_cast<A*>(stats));
      return to_int(cudaGetLastError());
    });
  });
}

}  // namespace modfuse::cuda
