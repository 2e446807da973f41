"""Build modfuse._C against the torch that is already installed.

The CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built only when the installed torch has
CUDA (torch.version.cuda); with a CPU-only torch, CUDAExtension cannot link (torch_cuda is absent), so there the
.cu files are only compile-checked by `nvcc` in CI (.ci/run), and csrc/cuda_ops.cpp (their tensor wrappers) by
`g++ -fsyntax-only` against torch's CUDA headers.

Environment:
  MODFUSE_ARCH_FLAGS  compiler flags for the CPU instruction set (default "-march=native": the extension is
                      built from source on the machine that runs it; set "-march=x86-64-v3" or "" for a
                      portable build).
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - build-time guidance only
    sys.exit(
        "modfuse builds against the torch you already have. Install torch first "
        "(CPU: `pip install torch==2.13.0`), then `pip install --no-build-isolation -e .`"
    )

here = os.path.dirname(os.path.abspath(__file__))
cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + ["csrc/ops.cpp", "csrc/module.cpp"]
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
with_cuda = torch.version.cuda is not None and bool(cuda_sources) and os.environ.get("MODFUSE_NO_CUDA") != "1"

arch_flags = os.environ.get("MODFUSE_ARCH_FLAGS", "-march=native").split()
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", *arch_flags]
define_macros = [("MODFUSE_ARCH_FLAGS", '"' + " ".join(arch_flags) + '"')]
if with_cuda:
    define_macros.append(("MODFUSE_WITH_CUDA", "1"))
extension_cls = CUDAExtension if with_cuda else CppExtension
extra_compile_args = {"cxx": cxx_flags}
if with_cuda:
    extra_compile_args["nvcc"] = ["-O3", "-std=c++17"]

setup(
    ext_modules=[
        extension_cls(
            name="modfuse._C",
            sources=cpu_sources + (cuda_sources + ["csrc/cuda_ops.cpp"] if with_cuda else []),
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            # torch ships libgomp.so.1 under the same soname, so this reuses the runtime already loaded.
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
