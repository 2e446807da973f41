"""Issue 14 item 8: small calls run on the calling thread, without waking OpenMP's worker threads.

Timing would make a flaky test; the thread count is exact: libgomp creates its workers at the first parallel
region of a process, so in a fresh process a small call must leave /proc/self/task as it was, and a large call
(the control) must grow it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, torch
import modfuse as mf
torch.set_num_threads(2)
def threads():
    return len(os.listdir("/proc/self/task"))
before = threads()
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 40, generator=g)
G = torch.randn(2, 5, 40, generator=g)
S1, S2 = mf.moments(G)
for _ in range(3):
    mf.segment_sq_norms(x, [0, 17, 40])
    mf.moments(G)
    mf.moments_accumulate_(S1.clone(), S2.clone(), G[:, 0])
    mf.calibrated_aggregate(S1, S2, [5, 5])
    mf.calibrated_aggregate_samples(G)
    mf.gram(x)
    mf.weighted_sum(x, torch.tensor([0.5, 2.0]))
    mf.segment_scale_(x[0].clone(), [0, 17, 40], [0.3, 2.0], noise_std=[0.1, 0.2], generator=g)
small = threads()
big = torch.randn(2, 1 << 20, generator=g)
mf.segment_sq_norms(big, [0, 1 << 19, 1 << 20])
print(before, small, threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_small_calls_open_no_parallel_region():
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="2"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    before, small, after_big = map(int, result.stdout.split())
    assert small == before, f"small calls started {small - before} thread(s)"
    assert after_big > small, "control: a large call should start OpenMP's worker thread"
