"""bench/gpu.py (the GPU benchmark of issue 4) runs end to end: here on the CPU with tiny shapes (--smoke), so a
GPU session finds a working script. It measures nothing worth reporting in this form."""
import json
import subprocess
import sys


def test_gpu_benchmark_script_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("*-smoke.json")
    rows = json.loads(result.read_text())["results"]
    ops = {r["op"] for r in rows}
    assert ops == {"calibrated_aggregate", "calibrated_aggregate_samples", "segment_sq_norms", "linear_moments",
                   "gram", "weighted_sum", "moments"}
    for r in rows:
        assert r["copy_GBps"] > 0 and all(v > 0 for v in r["GBps"].values())
