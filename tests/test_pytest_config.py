"""The default pytest output stays short: skips are counted, not listed, and torch's own deprecation warnings
(torch.jit.script_method, raised when torch.compile's inductor imports torch.utils.mkldnn) are filtered at their
source module, so a real warning from modfuse still shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = """
import warnings
import pytest

def test_needs_a_gpu():
    pytest.skip("needs a GPU")

def test_imports_what_torch_compile_imports():
    import torch.fx.experimental.optimization  # noqa: F401  (imports torch.utils.mkldnn: 14 script_method warnings)

def test_own_warning_still_shows():
    warnings.warn("a warning of our own", UserWarning)
"""


def test_default_output_counts_skips_and_filters_torch_jit_warnings(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    # The project's own [tool.pytest.ini_options], run on the sample in a fresh interpreter (torch not yet
    # imported, so the mkldnn import really happens there).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-p",
            "no:cacheprovider",
            str(tmp_path / "test_sample.py"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "1 skipped" in out and "2 passed" in out, out
    assert "SKIPPED" not in out, "skips must be counted, not listed one per line:\n" + out
    assert "script_method" not in out, out
    assert "1 warning" in out and "a warning of our own" in out, out
