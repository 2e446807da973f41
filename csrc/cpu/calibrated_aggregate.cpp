// Op 4 (docs/math.md): uncertainty-calibrated aggregation of M modalities' gradients, one pass over the input.
// Moments form reads S1[M, D] and S2[M, D]; samples form reads G[M, K, D]. Both write out[D] (and optionally
// the fused uncertainty[D]) and per-modality stats[M, 4]. Intermediates (mean, variance, evidence, belief)
// never leave registers and L1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <tuple>

#include "calibrated_opinion.h"
#include "cpu/common.h"

namespace modfuse::cpu {
namespace {

constexpr int64_t kChunk = 2048;         // elements of D per work item (moments form)
constexpr int64_t kSamplesChunk = 1024;  // samples form: K * kSamplesChunk values stay in L2 for pass two
constexpr int64_t kMaxModalities = 16;     // docs/math.md: M <= 16; per-modality accumulators live on the stack

template <typename A>
using Params = OpinionParams<A>;

// Running per-modality stats of one chunk: (sum mu^2, sum (b mu)^2, sum b, count of e = 0).
template <typename X>
struct StatsAcc {
  X mu2{}, bmu2{}, b{}, zero_evidence{};
};

// Add one modality's contribution at one element or tile (by X) to the running output o, the product of
// uncertainties uu and that modality's stats.
template <typename X, typename A>
inline void accumulate(X mu, X ssd, A n, A inv_nm1, const Params<A>& p, X& o, X& uu, StatsAcc<X>& st) {
  X b, u, e;
  opinion(mu, ssd, n, inv_nm1, p, b, u, e);
  const X bmu = b * mu;
  const X zero = X{};
  o += bmu;
  uu *= u;
  st.mu2 += mu * mu;
  st.bmu2 += bmu * bmu;
  st.b += b;
  st.zero_evidence += e == zero ? zero + A(1) : zero;
}

template <typename A>
inline void write_partials(const StatsAcc<Vec<A>>& tiles, const StatsAcc<A>& tail, double* partial) {
  partial[0] = lane_sum(tiles.mu2) + tail.mu2;
  partial[1] = lane_sum(tiles.bmu2) + tail.bmu2;
  partial[2] = lane_sum(tiles.b) + tail.b;
  partial[3] = lane_sum(tiles.zero_evidence) + tail.zero_evidence;
}

// Store one output value or tile in T.
template <typename T, typename X>
inline void store_out(T* p, X v) {
  if constexpr (std::is_same_v<X, acc_t<T>>)
    *p = store<T>(v);
  else
    store_vec(p, v);
}

// Store a chunk's accumulators (indexed from begin) as out and uncertainty, a vector tile at a time.
template <typename T>
inline void store_chunk(int64_t begin, int64_t end, const acc_t<T>* o, const acc_t<T>* uu, T* out, T* uncertainty) {
  using A = acc_t<T>;
  constexpr int V = kLanes<A>;
  auto element = [&](int64_t d, auto tag) {
    using X = decltype(tag);
    store_out(out + d, load_as<X>(o + (d - begin)));
    if (uncertainty) store_out(uncertainty + d, load_as<X>(uu + (d - begin)));
  };
  int64_t d = begin;
  for (; d + V <= end; d += V) element(d, Vec<A>{});
  for (; d < end; ++d) element(d, A{});
}

// stats[m] = (sum mu^2, sum (b mu)^2, mean b, fraction with e = 0), combined over chunks in chunk order.
template <typename A>
void reduce_stats(const std::vector<double>& partials, int64_t nchunks, int64_t M, int64_t D, A* stats) {
  for (int64_t m = 0; m < M; ++m) {
    double s[4] = {0, 0, 0, 0};
    for (int64_t c = 0; c < nchunks; ++c)
      for (int j = 0; j < 4; ++j) s[j] += partials[(c * M + m) * 4 + j];
    stats[m * 4 + 0] = A(s[0]);
    stats[m * 4 + 1] = A(s[1]);
    stats[m * 4 + 2] = A(s[2] / double(D));
    stats[m * 4 + 3] = A(s[3] / double(D));
  }
}

}  // namespace

template <typename T>
void calibrated_aggregate(const T* S1, const T* S2, const acc_t<T>* n, int64_t M, int64_t D, acc_t<T> kappa,
                          acc_t<T> eps, acc_t<T> evidence_max, T* out, T* uncertainty, acc_t<T>* stats) {
  using A = acc_t<T>;
  constexpr int V = kLanes<A>;
  const Params<A> p{kappa, eps, evidence_max};
  A inv_n[kMaxModalities], inv_nm1[kMaxModalities];
  for (int64_t m = 0; m < M; ++m) {
    inv_n[m] = A(1) / n[m];
    inv_nm1[m] = A(1) / (n[m] - A(1));
  }
  const int64_t nchunks = (D + kChunk - 1) / kChunk;
  std::vector<double> partials(nchunks * M * 4);
  parallel_chunks(D, kChunk, 2 * M * D, [&](int64_t c, int64_t begin, int64_t end) {
    // Elements outer, modalities inner: all 2M input streams advance together through contiguous memory
    // (prefetch-friendly) and the output and uncertainty of a tile stay in registers.
    StatsAcc<Vec<A>> tiles[kMaxModalities];
    StatsAcc<A> tail[kMaxModalities];
    auto element = [&](int64_t d, auto* st) {
      using X = std::decay_t<decltype(st->mu2)>;
      X o{}, uu = X{} + A(1);
      for (int64_t m = 0; m < M; ++m) {
        const X x1 = load_as<X>(S1 + m * D + d);
        const X mu = x1 * inv_n[m];
        const X ssd = load_as<X>(S2 + m * D + d) - x1 * mu;  // S2 - n mu^2
        accumulate(mu, ssd, n[m], inv_nm1[m], p, o, uu, st[m]);
      }
      store_out(out + d, o);
      if (uncertainty) store_out(uncertainty + d, uu);
    };
    int64_t d = begin;
    for (; d + V <= end; d += V) element(d, tiles);
    for (; d < end; ++d) element(d, tail);
    for (int64_t m = 0; m < M; ++m) write_partials(tiles[m], tail[m], &partials[(c * M + m) * 4]);
  });
  reduce_stats(partials, nchunks, M, D, stats);
}

template <typename T>
void calibrated_aggregate_samples(const T* G, int64_t M, int64_t K, int64_t D, acc_t<T> kappa, acc_t<T> eps,
                                  acc_t<T> evidence_max, T* out, T* uncertainty, acc_t<T>* stats) {
  using A = acc_t<T>;
  const Params<A> p{kappa, eps, evidence_max};
  const int64_t nchunks = (D + kSamplesChunk - 1) / kSamplesChunk;
  std::vector<double> partials(nchunks * M * 4);
  constexpr int V = kLanes<A>;
  const A inv_K = A(1) / A(K), inv_Km1 = A(1) / A(K - 1);
  parallel_chunks(D, kSamplesChunk, M * K * D, [&](int64_t c, int64_t begin, int64_t end) {
    const int64_t len = end - begin;
    A o[kSamplesChunk], uu[kSamplesChunk], mu[kSamplesChunk], ssd[kSamplesChunk];
    std::fill(o, o + len, A(0));
    std::fill(uu, uu + len, A(1));
    for (int64_t m = 0; m < M; ++m) {
      const T* g = G + m * K * D + begin;
      // Two-pass variance: the chunk's K rows are read from memory once (pass one), then again from cache.
      std::fill(mu, mu + len, A(0));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < len; ++i) mu[i] += load(g[k * D + i]);
      for (int64_t i = 0; i < len; ++i) mu[i] *= inv_K;
      std::fill(ssd, ssd + len, A(0));
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < len; ++i) {
          const A dev = load(g[k * D + i]) - mu[i];
          ssd[i] += dev * dev;
        }
      StatsAcc<Vec<A>> tiles;
      StatsAcc<A> tail;
      auto element = [&](int64_t i, auto& st) {
        using X = std::decay_t<decltype(st.mu2)>;
        X o_i = load_as<X>(o + i), uu_i = load_as<X>(uu + i);
        accumulate(load_as<X>(mu + i), load_as<X>(ssd + i), A(K), inv_Km1, p, o_i, uu_i, st);
        store_as(o + i, o_i);
        store_as(uu + i, uu_i);
      };
      int64_t i = 0;
      for (; i + V <= len; i += V) element(i, tiles);
      for (; i < len; ++i) element(i, tail);
      write_partials(tiles, tail, &partials[(c * M + m) * 4]);
    }
    store_chunk<T>(begin, end, o, uu, out, uncertainty);
  });
  reduce_stats(partials, nchunks, M, D, stats);
}

#define MODFUSE_INSTANTIATE(T)                                                                                   \
  template void calibrated_aggregate<T>(const T*, const T*, const acc_t<T>*, int64_t, int64_t, acc_t<T>,          \
                                        acc_t<T>, acc_t<T>, T*, T*, acc_t<T>*);                                  \
  template void calibrated_aggregate_samples<T>(const T*, int64_t, int64_t, int64_t, acc_t<T>, acc_t<T>,         \
                                                acc_t<T>, T*, T*, acc_t<T>*);
MODFUSE_INSTANTIATE(float)
MODFUSE_INSTANTIATE(double)
MODFUSE_INSTANTIATE(c10::Half)
MODFUSE_INSTANTIATE(c10::BFloat16)
#undef MODFUSE_INSTANTIATE

// ---- tensor wrappers: internal guards only; user-facing checks with full messages live in modfuse/ops.py ----
void check_aggregate_out(const at::Tensor& out, const at::Tensor& like, int64_t D,
                         std::initializer_list<at::Tensor> inputs, const char* op) {
  TORCH_CHECK(out.dim() == 1 && out.size(0) == D && out.scalar_type() == like.scalar_type() &&
                  out.device() == like.device() && out.is_contiguous(),
              op, ": out must be a contiguous [D] tensor of S1's dtype and device");
  for (const at::Tensor& input : inputs) at::assert_no_overlap(out, input);
}

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& like, int64_t M, int64_t D,
                                                                bool return_uncertainty, bool into_out = false) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // with `out` given the result goes there and the op returns an empty tensor in its place (csrc/ops.cpp)
  return {at::empty({into_out ? 0 : D}, like.options()), at::empty({return_uncertainty ? D : 0}, like.options()),
          at::empty({M, 4}, like.options().dtype(acc))};
}
double resolve_eps(std::optional<double> eps, at::ScalarType dtype) {
  return eps.has_value() ? *eps : (dtype == at::kDouble ? 1e-30 : 1e-20);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_cpu(const at::Tensor& S1, const at::Tensor& S2,
                                                                        const at::Tensor& n, double kappa,
                                                                        std::optional<double> eps, double evidence_max,
                                                                        bool return_uncertainty,
                                                                        const std::optional<at::Tensor>& out) {
  TORCH_CHECK(S1.dim() == 2 && S1.sizes() == S2.sizes() && S1.scalar_type() == S2.scalar_type(),
              "calibrated_aggregate: S1 and S2 must be [M, D] of one dtype");
  TORCH_CHECK(S1.is_contiguous() && S2.is_contiguous(), "calibrated_aggregate: S1 and S2 must be contiguous");
  const int64_t M = S1.size(0), D = S1.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxModalities && D >= 1, "calibrated_aggregate: need 1 <= M <= 16 and D >= 1");
  TORCH_CHECK(n.dim() == 1 && n.size(0) == M, "calibrated_aggregate: n must be [M]");
  TORCH_CHECK(kappa > 0 && evidence_max > 0, "calibrated_aggregate: kappa and evidence_max must be > 0");
  if (out) check_aggregate_out(*out, S1, D, {S1, S2, n}, "calibrated_aggregate");
  auto [fresh, uncertainty, stats] = allocate_outputs(S1, M, D, return_uncertainty, out.has_value());
  const at::Tensor& result = out ? *out : fresh;
  const double eps_v = resolve_eps(eps, S1.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S1.scalar_type(), "calibrated_aggregate", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor n_acc = n.to(at::CppTypeToScalarType<A>::value).contiguous();
    TORCH_CHECK(n_acc.ge(2).all().item<bool>(), "calibrated_aggregate: every n must be >= 2");
    calibrated_aggregate<scalar_t>(S1.const_data_ptr<scalar_t>(), S2.const_data_ptr<scalar_t>(),
                                   n_acc.const_data_ptr<A>(), M, D, A(kappa), A(eps_v), A(evidence_max),
                                   result.data_ptr<scalar_t>(),
                                   return_uncertainty ? uncertainty.data_ptr<scalar_t>() : nullptr, stats.data_ptr<A>());
  });
  return {fresh, stats, uncertainty};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_samples_cpu(const at::Tensor& G, double kappa,
                                                                                std::optional<double> eps,
                                                                                double evidence_max,
                                                                                bool return_uncertainty) {
  TORCH_CHECK(G.dim() == 3 && G.is_contiguous(), "calibrated_aggregate_samples: G must be contiguous [M, K, D]");
  const int64_t M = G.size(0), K = G.size(1), D = G.size(2);
  TORCH_CHECK(K >= 2 && M >= 1 && D >= 1, "calibrated_aggregate_samples: need K >= 2, M >= 1 and D >= 1");
  TORCH_CHECK(kappa > 0 && evidence_max > 0, "calibrated_aggregate_samples: kappa and evidence_max must be > 0");
  auto [out, uncertainty, stats] = allocate_outputs(G, M, D, return_uncertainty);
  const double eps_v = resolve_eps(eps, G.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "calibrated_aggregate_samples", [&] {
    using A = acc_t<scalar_t>;
    calibrated_aggregate_samples<scalar_t>(G.const_data_ptr<scalar_t>(), M, K, D, A(kappa), A(eps_v),
                                           A(evidence_max), out.data_ptr<scalar_t>(),
                                           return_uncertainty ? uncertainty.data_ptr<scalar_t>() : nullptr,
                                           stats.data_ptr<A>());
  });
  return {out, stats, uncertainty};
}

}  // namespace modfuse::cpu
