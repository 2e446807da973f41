// modfuse._C: importing it loads the operator registrations of ops.cpp; it also reports how it was built.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#ifndef MODFUSE_ARCH_FLAGS
#define MODFUSE_ARCH_FLAGS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "modfuse compiled kernels (operators are registered under torch.ops.modfuse)";
#ifdef MODFUSE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("torch_version") = TORCH_VERSION;
  m.attr("cpu_arch_flags") = MODFUSE_ARCH_FLAGS;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
