// Tensor-level implementations registered in ops.cpp, one per op and backend.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace modfuse::cpu {
at::Tensor segment_sq_norms_cpu(const at::Tensor& x, const at::Tensor& offsets);
at::Tensor tensor_sq_norms_cpu(c10::ArrayRef<at::Tensor> tensors);
std::tuple<at::Tensor, at::Tensor> moments_cpu(const at::Tensor& G);
void moments_accumulate_cpu(const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& g);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_moments_cpu(const at::Tensor& x,
                                                                              const at::Tensor& gy,
                                                                              const std::optional<at::Tensor>& s1);
std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_cpu(const at::Tensor& S1, const at::Tensor& S2,
                                                                        const at::Tensor& n, double kappa,
                                                                        std::optional<double> eps,
                                                                        double evidence_max, bool return_uncertainty,
                                                                        const std::optional<at::Tensor>& out);
std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_samples_cpu(const at::Tensor& G, double kappa,
                                                                                std::optional<double> eps,
                                                                                double evidence_max,
                                                                                bool return_uncertainty);
at::Tensor gram_cpu(const at::Tensor& X);
at::Tensor weighted_sum_cpu(const at::Tensor& X, const at::Tensor& w);
void segment_scale_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& scale,
                       const std::optional<at::Tensor>& noise_std, int64_t seed, int64_t offset);
at::Tensor segment_moments_cpu(const at::Tensor& x, const at::Tensor& offsets);
}  // namespace modfuse::cpu

#ifdef MODFUSE_WITH_CUDA
namespace modfuse::cuda {
at::Tensor segment_sq_norms_cuda(const at::Tensor& x, const at::Tensor& offsets);
at::Tensor tensor_sq_norms_cuda(c10::ArrayRef<at::Tensor> tensors);
std::tuple<at::Tensor, at::Tensor> moments_cuda(const at::Tensor& G);
void moments_accumulate_cuda(const at::Tensor& S1, const at::Tensor& S2, const at::Tensor& g);
std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_cuda(const at::Tensor& S1, const at::Tensor& S2,
                                                                         const at::Tensor& n, double kappa,
                                                                         std::optional<double> eps,
                                                                         double evidence_max, bool return_uncertainty,
                                                                         const std::optional<at::Tensor>& out);
std::tuple<at::Tensor, at::Tensor, at::Tensor> calibrated_aggregate_samples_cuda(const at::Tensor& G, double kappa,
                                                                                 std::optional<double> eps,
                                                                                 double evidence_max,
                                                                                 bool return_uncertainty);
at::Tensor gram_cuda(const at::Tensor& X);
at::Tensor weighted_sum_cuda(const at::Tensor& X, const at::Tensor& w);
void segment_scale_cuda(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& scale,
                        const std::optional<at::Tensor>& noise_std, int64_t seed, int64_t offset);
at::Tensor segment_moments_cuda(const at::Tensor& x, const at::Tensor& offsets);
}  // namespace modfuse::cuda
#endif
