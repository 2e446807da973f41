"""Build modfuse._C against the torch that is already installed.

The CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built only when the installed torch has
CUDA (torch.version.cuda); with a CPU-only torch, CUDAExtension cannot link (torch_cuda is absent). A GPU is not
needed to build them: without one the arch list defaults to sm_80 and sm_90 (setup_helpers.py).

Environment:
  MODFUSE_ARCH_FLAGS    compiler flags for the CPU instruction set (default "-march=native": the extension is
                        built from source on the machine that runs it; set "-march=x86-64-v3" or "" for a
                        portable build).
  MODFUSE_NO_CUDA=1     build the CPU kernels only, even with a CUDA torch.
  CUDA_HOME/CUDA_PATH   the CUDA toolkit (default: the toolkit the `nvcc` on PATH belongs to).
  TORCH_CUDA_ARCH_LIST  the GPU architectures (default: the visible GPUs', else "8.0;9.0").
Progress: the compiler runs under ninja, one line per file; pip shows those lines with -v.
"""

import glob
import os
import sys

from setuptools import setup

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import setup_helpers  # noqa: E402 - a file beside setup.py, not an installed module

try:
    import torch
except ImportError:  # pragma: no cover - build-time guidance only
    sys.exit(setup_helpers.ISOLATED_BUILD_MESSAGE)

cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + ["csrc/ops.cpp", "csrc/module.cpp"]
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
with_cuda = torch.version.cuda is not None and bool(cuda_sources) and os.environ.get("MODFUSE_NO_CUDA") != "1"
if with_cuda:
    # Both before torch.utils.cpp_extension reads them: it finds CUDA_HOME at import, and reads the arch list
    # from the visible GPUs (IndexError without one) unless TORCH_CUDA_ARCH_LIST is set.
    cuda_home = setup_helpers.find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    arch_list = setup_helpers.cuda_arch_list(gpu_visible=torch.cuda.is_available())
    if arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list

from torch.utils import cpp_extension  # noqa: E402 - after CUDA_HOME and the arch list are set: it reads them at import

# The standard this torch's headers require (C++17 before torch 2.14, C++20 from 2.14), for g++ and nvcc alike.
std = "-std=" + setup_helpers.cxx_standard(os.path.join(os.path.dirname(torch.__file__), "include"))
arch_flags = os.environ.get("MODFUSE_ARCH_FLAGS", "-march=native").split()
print(
    f"modfuse: building against torch {torch.__version__} with {std}, "
    + (
        f"CUDA kernels, CUDA_HOME={cuda_home or '(torch decides)'}, TORCH_CUDA_ARCH_LIST={arch_list or '(the GPUs)'}"
        if with_cuda
        else "CPU kernels only"
    ),
    flush=True,
)
cxx_flags = ["-O3", "-fopenmp", std, *arch_flags]
define_macros = [("MODFUSE_ARCH_FLAGS", '"' + " ".join(arch_flags) + '"')]
if with_cuda:
    define_macros.append(("MODFUSE_WITH_CUDA", "1"))
extension_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
extra_compile_args = {"cxx": cxx_flags}
if with_cuda:
    extra_compile_args["nvcc"] = ["-O3", std]

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
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
