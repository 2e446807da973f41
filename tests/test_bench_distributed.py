"""Smoke test of `python -m bench.distributed` (tiny sizes, 2 gloo processes): it runs, writes its table, and
its counter measures DDP's plain step exactly (one all-reduce of every gradient: 2(W-1)/W = 1x the gradient
bytes per rank for W = 2)."""

from __future__ import annotations

import argparse
import json

import bench.distributed as bd
from bench.distributed import main


def test_bench_distributed_quick(tmp_path):
    stem = main(
        [
            "--quick",
            "--models",
            "trainer",
            "--wrappers",
            "process group,DDP",
            "--methods",
            "none,calibrated",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads(stem.with_suffix(".json").read_text())["results"]
    table = stem.with_suffix(".md").read_text()
    by = {(r["wrapper"], r["case"]): r for r in rows}
    plain = by[("DDP", "plain step (no Balancer)")]
    assert plain["error"] is None and plain["collectives"] >= 1
    net, _ = bd.make_model("trainer", argparse.Namespace(**bd.QUICK))
    assert plain["bytes"] == sum(p.numel() * p.element_size() for p in net.parameters())
    assert plain["vs_ddp_bytes"] == 1.0
    for key in [("process group", "none"), ("process group", "calibrated, microbatch K=8"), ("DDP", "none")]:
        row = by[key]
        assert row["error"] is None, (key, row["error"])
        assert row["collectives"] >= 1 and row["bytes"] > 0 and row["vs_ddp_bytes"] > 0
    assert "| DDP | plain step (no Balancer) | " in table and "## Goals (issue 11, calibrated)" in table
