// Op 4 (SPEC.md): uncertainty-calibrated aggregation of M modalities' gradients, one pass over the input.
// Moments form reads S1[M, D] and S2[M, D]; samples form reads G[M, K, D]. Both write out[D] (and optionally
// the fused uncertainty[D]) and per-modality stats[M, 4]. Intermediates (mean, variance, evidence, belief)
// never leave registers and L1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <tuple>

#include "cpu/common.h"

namespace modfuse::cpu {
namespace {

constexpr int64_t kChunk = 2048;         // elements of D per work item (moments form)
constexpr int64_t kSamplesChunk = 1024;  // samples form: K * kSamplesChunk values stay in L2 for pass two

template <typename A>
struct Params {
  A kappa, eps, evidence_max;
};

// SPEC steps 2-3 with a single division. With A = n mu^2 and B = v + eps, t2 = A / B, so
// e = clamp(t2 - 1, 0, emax) = clamp(A - B, 0, emax * B) / B, b = e / (e + kappa) = en / (en + kappa * B) and
// u = kappa * B / (en + kappa * B). X is one value or one vector tile; comparisons are ordered so that NaN
// passes through (as torch.clamp does).
template <typename X, typename A>
inline void opinion(X mu, X ssd, A n, A inv_nm1, const Params<A>& p, X& b, X& u, X& en) {
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

// Running per-modality stats of one chunk: (sum mu^2, sum (b mu)^2, sum b, count of e = 0).
template <typename X>
struct StatsAcc {
  X mu2{}, bmu2{}, b{}, zero_evidence{};
};

// Add modality m's contribution at d (one value or one tile, by X) to the chunk accumulators: o (output) and
// uu (product of u), both indexed from the chunk's start.
template <typename X, typename A, typename MomentsAt>
inline void add_at(int64_t d, int64_t begin, A n, A inv_nm1, const Params<A>& p, const MomentsAt& moments_at, A* o,
                   A* uu, StatsAcc<X>& st) {
  X mu, ssd, b, u, en;
  moments_at(d, mu, ssd);
  opinion(mu, ssd, n, inv_nm1, p, b, u, en);
  const X bmu = b * mu;
  store_as(o + (d - begin), load_as<X>(o + (d - begin)) + bmu);
  store_as(uu + (d - begin), load_as<X>(uu + (d - begin)) * u);
  const X zero = X{};
  st.mu2 += mu * mu;
  st.bmu2 += bmu * bmu;
  st.b += b;
  st.zero_evidence += en == zero ? zero + A(1) : zero;
}

// Modality m over [begin, end): whole vector tiles, then the scalar tail, then the four stats partials.
// moments_at(d, mu, ssd) is generic in its value type and yields the mean and sum of squared deviations.
template <typename A, typename MomentsAt>
inline void add_modality(int64_t begin, int64_t end, A n, const Params<A>& p, const MomentsAt& moments_at, A* o,
                         A* uu, double* partial) {
  constexpr int V = kLanes<A>;
  const A inv_nm1 = A(1) / (n - A(1));
  StatsAcc<Vec<A>> tiles;
  StatsAcc<A> tail;
  int64_t d = begin;
  for (; d + V <= end; d += V) add_at(d, begin, n, inv_nm1, p, moments_at, o, uu, tiles);
  for (; d < end; ++d) add_at(d, begin, n, inv_nm1, p, moments_at, o, uu, tail);
  partial[0] = lane_sum(tiles.mu2) + tail.mu2;
  partial[1] = lane_sum(tiles.bmu2) + tail.bmu2;
  partial[2] = lane_sum(tiles.b) + tail.b;
  partial[3] = lane_sum(tiles.zero_evidence) + tail.zero_evidence;
}

template <typename T>
inline void store_chunk(int64_t begin, int64_t end, const acc_t<T>* o, const acc_t<T>* uu, T* out, T* uncertainty) {
  for (int64_t d = begin; d < end; ++d) out[d] = store<T>(o[d - begin]);
  if (uncertainty)
    for (int64_t d = begin; d < end; ++d) uncertainty[d] = store<T>(uu[d - begin]);
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
  const Params<A> p{kappa, eps, evidence_max};
  const int64_t nchunks = (D + kChunk - 1) / kChunk;
  std::vector<double> partials(nchunks * M * 4);
  parallel_chunks(D, kChunk, [&](int64_t c, int64_t begin, int64_t end) {
    A o[kChunk], uu[kChunk];
    std::fill(o, o + (end - begin), A(0));
    std::fill(uu, uu + (end - begin), A(1));
    for (int64_t m = 0; m < M; ++m) {
      const T* s1 = S1 + m * D;
      const T* s2 = S2 + m * D;
      const A inv_n = A(1) / n[m];
      add_modality<A>(begin, end, n[m], p, [&](int64_t d, auto& mu, auto& ssd) {
        using X = std::decay_t<decltype(mu)>;
        const X x1 = load_as<X>(s1 + d);
        mu = x1 * inv_n;
        ssd = load_as<X>(s2 + d) - x1 * mu;  // S2 - n mu^2
      }, o, uu, &partials[(c * M + m) * 4]);
    }
    store_chunk<T>(begin, end, o, uu, out, uncertainty);
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
  const A inv_K = A(1) / A(K);
  parallel_chunks(D, kSamplesChunk, [&](int64_t c, int64_t begin, int64_t end) {
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
      add_modality<A>(begin, end, A(K), p, [&](int64_t d, auto& mu_d, auto& ssd_d) {
        using X = std::decay_t<decltype(mu_d)>;
        mu_d = load_as<X>(mu + (d - begin));
        ssd_d = load_as<X>(ssd + (d - begin));
      }, o, uu, &partials[(c * M + m) * 4]);
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
namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& like, int64_t M, int64_t D,
                                                                bool return_uncertainty) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::empty({D}, like.options()), at::empty({return_uncertainty ? D : 0}, like.options()),
          at::empty({M, 4}, like.options().dtype(acc))};
}
double resolve_eps(std::optional<double> eps, at::ScalarType dtype) {
  return eps.has_value() ? *eps : (dtype == at::kDouble ? 1e-30 : 1e-20);
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_cpu(const at::Tensor& S1, const at::Tensor& S2,
                                                                        const at::Tensor& n, double kappa,
                                                                        std::optional<double> eps, double evidence_max,
                                                                        bool return_uncertainty) {
  TORCH_CHECK(S1.dim() == 2 && S1.sizes() == S2.sizes() && S1.scalar_type() == S2.scalar_type(),
              "calibrated_aggregate: S1 and S2 must be [M, D] of one dtype");
  TORCH_CHECK(S1.is_contiguous() && S2.is_contiguous(), "calibrated_aggregate: S1 and S2 must be contiguous");
  const int64_t M = S1.size(0), D = S1.size(1);
  TORCH_CHECK(n.dim() == 1 && n.size(0) == M, "calibrated_aggregate: n must be [M]");
  TORCH_CHECK(kappa > 0 && evidence_max > 0, "calibrated_aggregate: kappa and evidence_max must be > 0");
  auto [out, uncertainty, stats] = allocate_outputs(S1, M, D, return_uncertainty);
  const double eps_v = resolve_eps(eps, S1.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S1.scalar_type(), "calibrated_aggregate", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor n_acc = n.to(at::CppTypeToScalarType<A>::value).contiguous();
    TORCH_CHECK(n_acc.ge(2).all().item<bool>(), "calibrated_aggregate: every n must be >= 2");
    calibrated_aggregate<scalar_t>(S1.const_data_ptr<scalar_t>(), S2.const_data_ptr<scalar_t>(),
                                   n_acc.const_data_ptr<A>(), M, D, A(kappa), A(eps_v), A(evidence_max),
                                   out.data_ptr<scalar_t>(), return_uncertainty ? uncertainty.data_ptr<scalar_t>() : nullptr,
                                   stats.data_ptr<A>());
  });
  return {out, stats, uncertainty};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_samples_cpu(const at::Tensor& G, double kappa,
                                                                                std::optional<double> eps,
                                                                                double evidence_max,
                                                                                bool return_uncertainty) {
  TORCH_CHECK(G.dim() == 3 && G.is_contiguous(), "calibrated_aggregate_samples: G must be contiguous [M, K, D]");
  const int64_t M = G.size(0), K = G.size(1), D = G.size(2);
  TORCH_CHECK(K >= 2, "calibrated_aggregate_samples: K must be >= 2");
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
