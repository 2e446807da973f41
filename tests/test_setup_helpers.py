"""setup_helpers.py: the C++ standard, the CUDA toolkit and the arch list setup.py builds with (no GPU needed)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import setup_helpers as helpers  # noqa: E402 - a file beside setup.py, found through the path above

DRYRUN = """#$ _HERE_=/opt/toolkit/cuda-13.0/bin
#$ TOP=/opt/toolkit/cuda-13.0/bin/..
#$ NVVMIR_LIBRARY_DIR=/opt/toolkit/cuda-13.0/bin/../nvvm/libdevice
"""


@pytest.mark.parametrize(
    "guard, expected",
    [
        ("#error C++17 or later compatible compiler is required to use ATen.", "c++17"),
        ("#error C++20 or later compatible compiler is required to use ATen.", "c++20"),
        ("#pragma once", "c++17"),
    ],
)
def test_cxx_standard_follows_the_torch_headers(tmp_path, guard, expected):
    (tmp_path / "ATen").mkdir()
    (tmp_path / "ATen" / "ATen.h").write_text(f"#pragma once\n#if !defined(__cplusplus)\n{guard}\n#endif\n")
    assert helpers.cxx_standard(tmp_path) == expected


def test_cxx_standard_of_the_installed_torch():
    import torch

    std = helpers.cxx_standard(Path(torch.__file__).parent / "include")
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    assert std == ("c++20" if (major, minor) >= (2, 14) else "c++17")


def test_cuda_home_from_the_environment_first():
    never = lambda *a, **k: pytest.fail("nvcc must not be asked when CUDA_HOME/CUDA_PATH is set")
    assert helpers.find_cuda_home({"CUDA_HOME": "/a", "CUDA_PATH": "/b"}, which=never, run=never) == "/a"
    assert helpers.find_cuda_home({"CUDA_PATH": "/b"}, which=never, run=never) == "/b"


def test_cuda_home_from_the_toolkit_nvcc_belongs_to(tmp_path):
    """The nvcc on PATH may be a wrapper elsewhere: the toolkit is the one its --dryrun names (TOP)."""
    home = tmp_path / "cuda-13.0"
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda_runtime.h").write_text("")
    out = DRYRUN.replace("/opt/toolkit/cuda-13.0", str(home))
    run = lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout="", stderr=out)
    assert helpers.find_cuda_home({}, which=lambda _: "/usr/local/bin/nvcc", run=run) == str(home)
    # a TOP without the CUDA headers is not a toolkit: leave the choice to torch
    (home / "include" / "cuda_runtime.h").unlink()
    assert helpers.find_cuda_home({}, which=lambda _: "/usr/local/bin/nvcc", run=run) is None
    assert helpers.find_cuda_home({}, which=lambda _: None, run=run) is None


def test_cuda_home_parse():
    assert helpers.cuda_home_from_nvcc_dryrun(DRYRUN) == "/opt/toolkit/cuda-13.0"
    assert helpers.cuda_home_from_nvcc_dryrun("nvcc fatal: something") is None


def test_arch_list():
    assert helpers.cuda_arch_list({}, gpu_visible=False) == "8.0;9.0"
    assert helpers.cuda_arch_list({}, gpu_visible=True) is None
    assert helpers.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0a"}, gpu_visible=False) == "9.0a"
    assert helpers.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6"}, gpu_visible=True) == "8.6"


def test_isolated_build_names_the_cause_and_the_command():
    """setup.py run where torch cannot be imported (what pip's build isolation does) explains itself."""
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "build isolation" in done.stderr and "pip install --no-build-isolation -v -e ." in done.stderr


def test_wheel_does_not_install_bench():
    import tomllib

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["modfuse*"]
