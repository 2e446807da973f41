"""bench/gpu.py (the GPU benchmark of issue 4) and bench/gpu_proof.py (the one GPU command) run end to end here on
the CPU, so a GPU session finds working scripts. Nothing they measure in this form is worth reporting. (.ci/run
also runs bench.gpu at its real sizes on the CPU.)"""

import json
import subprocess
import sys

from bench import gpu_proof
from bench.harness import size

OPS = {
    "calibrated_aggregate",
    "calibrated_aggregate_samples",
    "segment_sq_norms",
    "linear_moments",
    "gram",
    "weighted_sum",
    "moments",
}


def test_size_labels():
    """size() once called itself for D >= 1M (RecursionError at every real size)."""
    assert (size(4096), size(1 << 20), size(16 << 20), size(64 << 20), size((1 << 20) + 1)) == (
        "4096",
        "1M",
        "16M",
        "64M",
        str((1 << 20) + 1),
    )


def test_gpu_benchmark_script_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("*-smoke.json")
    data = json.loads(result.read_text())
    assert {r["op"] for r in data["results"]} == OPS
    for r in data["results"]:
        assert r["copy_GBps"] > 0 and all(v > 0 for v in r["GBps"].values())
    assert {"device", "driver", "cuda", "torch", "triton"} <= set(data["environment"])


def test_gpu_proof_commands():
    """The GPU stages name what they must: the no-isolation build, the CUDA op tests, both sanitizer tools, the
    benchmark; each stage has a budget inside one 10-minute command."""
    build = gpu_proof.commands("build", False, None)[0]
    assert build[-6:] == ["--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."]
    tests = gpu_proof.commands("test", False, None)
    assert any("cuda or triton" in c for c in tests[1]) and set(gpu_proof.OP_TESTS) <= set(tests[1])
    if gpu_proof.sanitizer():
        tools = [c[2] for c in gpu_proof.commands("sanitize", False, None)]
        assert tools == ["memcheck", "racecheck"]
    assert gpu_proof.commands("bench", False, "out")[0][-3:] == ["bench.gpu", "--out", "out"]
    assert gpu_proof.STAGE_SECONDS < 8 * 60


def test_gpu_proof_dry_run(tmp_path):
    """Every stage rehearsed on the CPU: the record says each passed, the log holds the commands."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_proof", "--stage", "all", "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (record,) = tmp_path.glob("*-dry-run-proof.json")
    data = json.loads(record.read_text())
    assert set(data["stages"]) == set(gpu_proof.STAGES)
    assert all(stage["ok"] for stage in data["stages"].values())
    assert {"device", "torch", "triton", "cuda", "driver"} <= set(data["environment"])
    log = next(tmp_path.glob("*-dry-run-proof.log")).read_text()
    assert "ops have kernels for CPU" in log and "bench.gpu" in log
    assert list(tmp_path.glob("*-smoke.md"))
