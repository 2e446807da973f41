// CUDA tensor wrappers of the kernels in csrc/cuda/<op>.cu: internal guards, output allocation on the tensors'
// device, the current stream, and the host-side piece tables of the segment ops. Registered for the CUDA
// dispatch key in ops.cpp. User-facing argument checks are in modfuse/_checks.py (shared by every backend);
// the guards here only keep a direct torch.ops.modfuse call from touching memory out of bounds.
// Built only when torch has CUDA (setup.py defines MODFUSE_WITH_CUDA); CI compile-checks it with -fsyntax-only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/common.h"
#include "cuda/launch.h"
#include "ops.h"

namespace modfuse::cuda {
namespace {

constexpr int64_t kMaxModalities = 16;

DType dtype_code(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

void check(int err) { C10_CUDA_CHECK(static_cast<cudaError_t>(err)); }

void guard_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), op, ": ", name, " must be a contiguous CUDA tensor");
}

// The piece table (segment, begin, end) of host offsets, and first piece per segment, on x's device.
struct Pieces {
  at::Tensor table, first;
  int64_t count;
};

Pieces pieces_for(const at::Tensor& offsets, int64_t D, const at::Tensor& like, const char* op) {
  // offsets live on the host (modfuse.ops passes them there); a device tensor would cost a sync here
  const at::Tensor off = cpu::checked_offsets(offsets.to(at::kCPU), D, op);
  const int64_t P = off.size(0) - 1;
  std::vector<int64_t> table, first(P + 1, 0);
  for (const cpu::SegmentBlock& b : cpu::segment_blocks(off.const_data_ptr<int64_t>(), P, kPieceChunk)) {
    table.insert(table.end(), {b.segment, b.begin, b.end});
    first[b.segment + 1] = static_cast<int64_t>(table.size() / 3);  // pieces up to and including segment p
  }
  for (int64_t p = 0; p < P; ++p) first[p + 1] = std::max(first[p + 1], first[p]);  // empty segments: no pieces
  const auto opts = at::TensorOptions().dtype(at::kLong);
  const int64_t W = static_cast<int64_t>(table.size() / 3);
  at::Tensor t = at::from_blob(table.data(), {static_cast<int64_t>(table.size())}, opts).to(like.device());
  at::Tensor f = at::from_blob(first.data(), {static_cast<int64_t>(first.size())}, opts).to(like.device());
  return {t, f, W};
}

}  // namespace

at::Tensor segment_sq_norms_cuda(const at::Tensor& x, const at::Tensor& offsets) {
  guard_cuda(x, "x", "segment_sq_norms");
  TORCH_CHECK(x.dim() == 2, "segment_sq_norms: x must be [R, D]");
  const c10::cuda::CUDAGuard device(x.device());
  const int64_t R = x.size(0), D = x.size(1);
  const Pieces pc = pieces_for(offsets, D, x, "segment_sq_norms");
  const int64_t P = pc.first.size(0) - 1;
  at::Tensor out = at::empty({R, P}, x.options().dtype(acc_of(x.scalar_type())));
  at::Tensor workspace = at::empty({std::max<int64_t>(R * pc.count, 1)}, out.options());
  check(segment_sq_norms(x.const_data_ptr(), dtype_code(x.scalar_type(), "segment_sq_norms"), R, D,
                         pc.table.const_data_ptr<int64_t>(), pc.count, pc.first.const_data_ptr<int64_t>(), P,
                         out.data_ptr(), workspace.data_ptr(), stream_of(x)));
  return out;
}

at::Tensor tensor_sq_norms_cuda(c10::ArrayRef<at::Tensor> tensors) {
  const cpu::DenseList list = cpu::dense_list(tensors, "tensor_sq_norms");
  TORCH_CHECK(tensors[0].is_cuda(), "tensor_sq_norms: CUDA tensors expected");
  const c10::cuda::CUDAGuard device(tensors[0].device());
  const int64_t P = static_cast<int64_t>(tensors.size());
  const auto t = tensors[0].scalar_type();
  const int64_t elem = static_cast<int64_t>(tensors[0].element_size());
  // the device table of pieces: (address, length), each tensor cut into kPieceChunk-element pieces
  std::vector<int64_t> table, first(P + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    const auto base = reinterpret_cast<uintptr_t>(list.data[p]);
    for (int64_t b = 0; b < list.lengths[p]; b += kPieceChunk)
      table.insert(table.end(), {static_cast<int64_t>(base + static_cast<uintptr_t>(b * elem)),
                                 std::min(kPieceChunk, list.lengths[p] - b)});
    first[p + 1] = static_cast<int64_t>(table.size() / 2);
  }
  const int64_t W = static_cast<int64_t>(table.size() / 2);
  if (W == 0) table = {0, 0};  // a list of empty tensors: no pieces, but from_blob needs memory to point at
  const auto opts = at::TensorOptions().dtype(at::kLong);
  const at::Tensor dev_table =
      at::from_blob(table.data(), {static_cast<int64_t>(table.size())}, opts).to(tensors[0].device());
  const at::Tensor dev_first = at::from_blob(first.data(), {P + 1}, opts).to(tensors[0].device());
  at::Tensor out = at::empty({P}, tensors[0].options().dtype(acc_of(t)));
  at::Tensor workspace = at::empty({std::max<int64_t>(W, 1)}, out.options());
  check(tensor_sq_norms(dev_table.const_data_ptr<int64_t>(), W, dev_first.const_data_ptr<int64_t>(), P,
                        dtype_code(t, "tensor_sq_norms"), out.data_ptr(), workspace.data_ptr(),
                        stream_of(tensors[0])));
  return out;
}

std::tuple<at::Tensor, at::Tensor> moments_cuda(const at::Tensor& G) {
  guard_cuda(G, "G", "moments");
  TORCH_CHECK(G.dim() == 3, "moments: G must be [M, K, D]");
  const c10::cuda::CUDAGuard device(G.device());
  const int64_t M = G.size(0), K = G.size(1), D = G.size(2);
  const auto opts = G.options().dtype(acc_of(G.scalar_type()));
  at::Tensor S1 = at::empty({M, D}, opts), S2 = at::empty({M, D}, opts);
  check(moments(G.const_data_ptr(), dtype_code(G.scalar_type(), "moments"), M, K, D, S1.data_ptr(), S2.data_ptr(),
                stream_of(G)));
  return {S1, S2};
}

void moments_accumulate_cuda(const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& g) {
  guard_cuda(S1, "S1", "moments_accumulate_");
  guard_cuda(S2, "S2", "moments_accumulate_");
  guard_cuda(g, "g", "moments_accumulate_");
  TORCH_CHECK(S1.sizes() == S2.sizes() && S1.numel() == g.numel() && S1.scalar_type() == S2.scalar_type() &&
                  (S1.scalar_type() == at::kFloat || S1.scalar_type() == at::kDouble),
              "moments_accumulate_: S1, S2 float32/float64 banks of g's size");
  const c10::cuda::CUDAGuard device(S1.device());
  check(moments_accumulate(S1.data_ptr(), S2.data_ptr(), dtype_code(S1.scalar_type(), "moments_accumulate_"),
                           g.const_data_ptr(), dtype_code(g.scalar_type(), "moments_accumulate_"), g.numel(),
                           stream_of(S1)));
}

namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor> aggregate_outputs(const at::Tensor& like, int64_t M, int64_t D,
                                                                 bool return_uncertainty, bool into_out = false) {
  // with `out` given the result goes there and the op returns an empty tensor in its place (csrc/ops.cpp)
  return {at::empty({into_out ? 0 : D}, like.options()),
          at::empty({M, 4}, like.options().dtype(acc_of(like.scalar_type()))),
          at::empty({return_uncertainty ? D : 0}, like.options())};
}
double eps_or_default(std::optional<double> eps, at::ScalarType t) {
  return eps.has_value() ? *eps : (t == at::kDouble ? 1e-30 : 1e-20);  // Op 4 defaults (docs/math.md)
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_cuda(const at::Tensor& S1, const at::Tensor& S2,
                                                                         const at::Tensor& n, double kappa,
                                                                         std::optional<double> eps,
                                                                         double evidence_max, bool return_uncertainty,
                                                                         const std::optional<at::Tensor>& out) {
  guard_cuda(S1, "S1", "calibrated_aggregate");
  guard_cuda(S2, "S2", "calibrated_aggregate");
  TORCH_CHECK(S1.dim() == 2 && S1.sizes() == S2.sizes() && S1.scalar_type() == S2.scalar_type(),
              "calibrated_aggregate: S1 and S2 must be [M, D] of one dtype");
  const int64_t M = S1.size(0), D = S1.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxModalities && D >= 1, "calibrated_aggregate: need 1 <= M <= 16 and D >= 1");
  TORCH_CHECK(n.dim() == 1 && n.size(0) == M, "calibrated_aggregate: n must be [M]");
  TORCH_CHECK(kappa > 0 && evidence_max > 0, "calibrated_aggregate: kappa and evidence_max must be > 0");
  if (out) cpu::check_aggregate_out(*out, S1, D, {S1, S2, n}, "calibrated_aggregate");
  const c10::cuda::CUDAGuard device(S1.device());
  const auto t = S1.scalar_type();
  auto [fresh, stats, uncertainty] = aggregate_outputs(S1, M, D, return_uncertainty, out.has_value());
  const at::Tensor& result = out ? *out : fresh;
  const at::Tensor counts = n.to(S1.device(), acc_of(t)).contiguous();
  at::Tensor workspace = at::empty({calibrated_aggregate_workspace(M, D, dtype_code(t, "calibrated_aggregate"))},
                                   S1.options().dtype(at::kByte));
  check(calibrated_aggregate(S1.const_data_ptr(), S2.const_data_ptr(), counts.const_data_ptr(),
                             dtype_code(t, "calibrated_aggregate"), M, D, kappa, eps_or_default(eps, t), evidence_max,
                             result.data_ptr(), return_uncertainty ? uncertainty.data_ptr() : nullptr, stats.data_ptr(),
                             workspace.data_ptr(), stream_of(S1)));
  return {fresh, stats, uncertainty};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_samples_cuda(const at::Tensor& G, double kappa,
                                                                                 std::optional<double> eps,
                                                                                 double evidence_max,
                                                                                 bool return_uncertainty) {
  guard_cuda(G, "G", "calibrated_aggregate_samples");
  TORCH_CHECK(G.dim() == 3, "calibrated_aggregate_samples: G must be [M, K, D]");
  const int64_t M = G.size(0), K = G.size(1), D = G.size(2);
  TORCH_CHECK(K >= 2 && K <= 64 && M >= 1 && M <= kMaxModalities && D >= 1,
              "calibrated_aggregate_samples: need 2 <= K <= 64, 1 <= M <= 16 and D >= 1");
  TORCH_CHECK(kappa > 0 && evidence_max > 0, "calibrated_aggregate_samples: kappa and evidence_max must be > 0");
  const c10::cuda::CUDAGuard device(G.device());
  const auto t = G.scalar_type();
  auto [out, stats, uncertainty] = aggregate_outputs(G, M, D, return_uncertainty);
  at::Tensor workspace = at::empty({calibrated_aggregate_workspace(M, D, dtype_code(t, "calibrated_aggregate"))},
                                   G.options().dtype(at::kByte));
  check(calibrated_aggregate_samples(G.const_data_ptr(), dtype_code(t, "calibrated_aggregate_samples"), M, K, D, kappa,
                                     eps_or_default(eps, t), evidence_max, out.data_ptr(),
                                     return_uncertainty ? uncertainty.data_ptr() : nullptr, stats.data_ptr(),
                                     workspace.data_ptr(), stream_of(G)));
  return {out, stats, uncertainty};
}

at::Tensor gram_cuda(const at::Tensor& X) {
  guard_cuda(X, "X", "gram");
  TORCH_CHECK(X.dim() == 2 && X.size(0) >= 1 && X.size(0) <= 64, "gram: X must be [R, D] with 1 <= R <= 64");
  const c10::cuda::CUDAGuard device(X.device());
  const int64_t R = X.size(0), D = X.size(1);
  const DType t = dtype_code(X.scalar_type(), "gram");
  at::Tensor out = at::empty({R, R}, X.options());
  at::Tensor workspace = at::empty({gram_workspace(R, D, t)}, X.options().dtype(at::kByte));
  check(gram(X.const_data_ptr(), t, R, D, out.data_ptr(), workspace.data_ptr(), stream_of(X)));
  return out;
}

at::Tensor weighted_sum_cuda(const at::Tensor& X, const at::Tensor& w) {
  guard_cuda(X, "X", "weighted_sum");
  guard_cuda(w, "w", "weighted_sum");
  TORCH_CHECK(X.dim() == 2, "weighted_sum: X must be [R, D]");
  const int64_t R = X.size(0), D = X.size(1);
  const bool per_element = w.dim() == 2;
  TORCH_CHECK(per_element ? (w.sizes() == X.sizes() && w.scalar_type() == X.scalar_type())
                          : (w.dim() == 1 && w.size(0) == R && w.scalar_type() == acc_of(X.scalar_type())),
              "weighted_sum: w must be [R] in the accumulation dtype or [R, D] in X's dtype");
  const c10::cuda::CUDAGuard device(X.device());
  at::Tensor out = at::empty({D}, X.options());
  check(weighted_sum(X.const_data_ptr(), w.const_data_ptr(), per_element, dtype_code(X.scalar_type(), "weighted_sum"),
                     R, D, out.data_ptr(), stream_of(X)));
  return out;
}

void segment_scale_cuda(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& scale,
                        const std::optional<at::Tensor>& noise_std, int64_t seed, int64_t offset) {
  guard_cuda(x, "x", "segment_scale_");
  TORCH_CHECK(x.dim() == 1, "segment_scale_: x must be [D]");
  const c10::cuda::CUDAGuard device(x.device());
  const int64_t D = x.size(0);
  const Pieces pc = pieces_for(offsets, D, x, "segment_scale_");
  const int64_t P = pc.first.size(0) - 1;
  const auto acc = acc_of(x.scalar_type());
  guard_cuda(scale, "scale", "segment_scale_");
  TORCH_CHECK(scale.scalar_type() == acc && scale.numel() == P, "segment_scale_: scale must be [P] in the accumulation dtype");
  if (noise_std) {
    guard_cuda(*noise_std, "noise_std", "segment_scale_");
    TORCH_CHECK(noise_std->scalar_type() == acc && noise_std->numel() == P,
                "segment_scale_: noise_std must be [P] in the accumulation dtype");
  }
  check(segment_scale(x.data_ptr(), dtype_code(x.scalar_type(), "segment_scale_"), pc.table.const_data_ptr<int64_t>(),
                      pc.count, scale.const_data_ptr(), noise_std ? noise_std->const_data_ptr() : nullptr,
                      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), stream_of(x)));
}

at::Tensor segment_moments_cuda(const at::Tensor& x, const at::Tensor& offsets) {
  guard_cuda(x, "x", "segment_moments");
  TORCH_CHECK(x.dim() == 2, "segment_moments: x must be [R, D]");
  const c10::cuda::CUDAGuard device(x.device());
  const int64_t R = x.size(0), D = x.size(1);
  const Pieces pc = pieces_for(offsets, D, x, "segment_moments");
  const int64_t P = pc.first.size(0) - 1;
  at::Tensor out = at::empty({R, P, 2}, x.options().dtype(at::kDouble));
  at::Tensor workspace = at::empty({std::max<int64_t>(2 * R * pc.count, 1)}, out.options());
  check(segment_moments(x.const_data_ptr(), dtype_code(x.scalar_type(), "segment_moments"), R, D,
                        pc.table.const_data_ptr<int64_t>(), pc.count, pc.first.const_data_ptr<int64_t>(), P,
                        out.data_ptr(), workspace.data_ptr(), stream_of(x)));
  return out;
}

}  // namespace modfuse::cuda
