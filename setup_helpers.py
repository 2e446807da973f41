"""Build-time helpers for setup.py (imported by it; not installed). Each answers one question about the machine
that builds modfuse._C, and none needs a GPU, so a build box or CI runner builds the same extension a GPU
machine would (tests/test_build.py covers them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

# Used when no GPU is visible to read the arch from: A100 and H100 (TORCH_CUDA_ARCH_LIST overrides).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"
ISOLATED_BUILD_MESSAGE = (
    "modfuse builds against the torch you already have, and this build cannot see it: pip's build isolation "
    "runs setup.py in a fresh environment without torch. Install torch first (CPU: `pip install torch==2.13.0`), "
    "then build without isolation: `pip install --no-build-isolation -v -e .` (-v shows the compiler's progress)."
)


def cxx_standard(torch_include_dir: str | os.PathLike) -> str:
    """The C++ standard the installed torch's headers require, read from the #error guard in ATen/ATen.h
    ("C++17 or later" before torch 2.14, "C++20 or later" from 2.14); C++17 when the guard is not found."""
    header = Path(torch_include_dir) / "ATen" / "ATen.h"
    try:
        match = re.search(r"C\+\+(\d\d) or later", header.read_text(errors="replace"))
    except OSError:
        match = None
    return f"c++{match.group(1)}" if match else "c++17"


def cuda_home_from_nvcc_dryrun(output: str) -> str | None:
    """The toolkit root from `nvcc --dryrun` output (its `#$ TOP=<root>/bin/..` line), which names the toolkit
    the compiler really belongs to even when the `nvcc` on PATH is a wrapper script elsewhere."""
    match = re.search(r"^#\$ TOP=(.+?)\s*$", output, re.MULTILINE)
    return os.path.normpath(match.group(1)) if match else None


def find_cuda_home(environ=os.environ, which=shutil.which, run=subprocess.run) -> str | None:
    """CUDA_HOME or CUDA_PATH when set, else the toolkit of the `nvcc` on PATH (via `nvcc --dryrun`), else None
    (torch's own search then applies). The toolkit must hold include/cuda_runtime.h."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(name):
            return environ[name]
    nvcc = which("nvcc")
    if nvcc is None:
        return None
    try:
        done = run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    home = cuda_home_from_nvcc_dryrun(done.stdout + done.stderr)
    if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
        return home
    return None


def cuda_arch_list(environ=os.environ, gpu_visible: bool = False) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to build with: the user's when set; None (torch reads the visible GPUs) when
    there is a GPU; else DEFAULT_CUDA_ARCH_LIST (torch would fail with IndexError looking for a GPU)."""
    if environ.get("TORCH_CUDA_ARCH_LIST"):
        return environ["TORCH_CUDA_ARCH_LIST"]
    return None if gpu_visible else DEFAULT_CUDA_ARCH_LIST
