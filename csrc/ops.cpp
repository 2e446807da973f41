// The modfuse operator library: schemas (the contract torch.compile, export and the profiler see) and the CPU
// implementations. Python fake (meta) kernels are in modfuse/ops.py; user-facing argument checks too.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(modfuse, m) {
  m.def("segment_sq_norms(Tensor x, Tensor offsets) -> Tensor");
  m.def("tensor_sq_norms(Tensor[] tensors) -> Tensor");
  m.def("moments(Tensor G) -> (Tensor, Tensor)");
  m.def("moments_accumulate_(Tensor(a!) S1, Tensor(b!) S2, Tensor g) -> ()");
  // s1: the caller's weight gradient of the summed loss (= S1); given, S1 is not formed (one GEMM, not two) and
  // the op returns an empty S1 (modfuse.ops.linear_moments returns s1 in its place).
  m.def("linear_moments(Tensor x, Tensor gy, Tensor? s1=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (out, stats, uncertainty); uncertainty is empty unless return_uncertainty. With `out` given, the result
  // is written into it and the first return is an empty tensor (modfuse.ops returns `out` in its place): one schema
  // with an optional mutable argument, not an aliasing `.out` overload, because torch.compile's auto_functionalize
  // takes a custom op that mutates an argument only if its returns are fresh tensors (no aliases of inputs), and
  // `(a!)` tells it, opcheck and the graph passes exactly which buffer is written, so the write is neither dropped
  // nor reordered.
  m.def("calibrated_aggregate(Tensor S1, Tensor S2, Tensor n, float kappa=1.0, float? eps=None, "
        "float evidence_max=1e6, bool return_uncertainty=False, Tensor(a!)? out=None) -> (Tensor, Tensor, Tensor)");
  m.def("calibrated_aggregate_samples(Tensor G, float kappa=1.0, float? eps=None, float evidence_max=1e6, "
        "bool return_uncertainty=False) -> (Tensor, Tensor, Tensor)");
  m.def("gram(Tensor X) -> Tensor");
  m.def("weighted_sum(Tensor X, Tensor w) -> Tensor");
  // noise: element d draws philox::normal(seed, offset + d) (csrc/philox_normal.h); seed and offset are the
  // unsigned 64-bit values' bits
  m.def("segment_scale_(Tensor(a!) x, Tensor offsets, Tensor scale, Tensor? noise_std=None, int seed=0, "
        "int offset=0) -> ()");
  m.def("segment_moments(Tensor x, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(modfuse, CPU, m) {
  using namespace modfuse::cpu;
  m.impl("segment_sq_norms", &segment_sq_norms_cpu);
  m.impl("tensor_sq_norms", &tensor_sq_norms_cpu);
  m.impl("moments", &moments_cpu);
  m.impl("moments_accumulate_", &moments_accumulate_cpu);
  m.impl("linear_moments", &linear_moments_cpu);
  m.impl("calibrated_aggregate", &calibrated_aggregate_cpu);
  m.impl("calibrated_aggregate_samples", &calibrated_aggregate_samples_cpu);
  m.impl("gram", &gram_cpu);
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("segment_scale_", &segment_scale_cpu);
  m.impl("segment_moments", &segment_moments_cpu);
}

#ifdef MODFUSE_WITH_CUDA
// CUDA kernels (csrc/cuda/<op>.cu through the wrappers in csrc/cuda_ops.cpp). linear_moments has no CUDA kernel
// of its own: its GPU kernel is the Triton GEMM (modfuse/triton/linear_moments.py); registered here is the same
// ATen composition as on the CPU (cuBLAS GEMMs), so torch.ops.modfuse.linear_moments works on CUDA tensors too.
TORCH_LIBRARY_IMPL(modfuse, CUDA, m) {
  using namespace modfuse::cuda;
  m.impl("segment_sq_norms", &segment_sq_norms_cuda);
  m.impl("tensor_sq_norms", &tensor_sq_norms_cuda);
  m.impl("moments", &moments_cuda);
  m.impl("moments_accumulate_", &moments_accumulate_cuda);
  m.impl("linear_moments", &modfuse::cpu::linear_moments_cpu);
  m.impl("calibrated_aggregate", &calibrated_aggregate_cuda);
  m.impl("calibrated_aggregate_samples", &calibrated_aggregate_samples_cuda);
  m.impl("gram", &gram_cuda);
  m.impl("weighted_sum", &weighted_sum_cuda);
  m.impl("segment_scale_", &segment_scale_cuda);
  m.impl("segment_moments", &segment_moments_cuda);
}
#endif
