"""Smoke test of `python -m bench.overlap` (tiny sizes, 2 gloo processes): it runs every row side by side and
writes its table, every row with positive step times and its ratios."""

from __future__ import annotations

import json

from bench.overlap import main


def test_bench_overlap_quick(tmp_path):
    stem = main(["--quick", "--out", str(tmp_path)])
    data = json.loads(stem.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in data["results"]}
    assert len(rows) == 8
    for name, r in rows.items():
        assert r["steps"] == data["setup"]["steps"] and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"], name
        assert r["vs_ddp"] > 0 and (r["vs_before"] is None) == name.startswith("DDP"), name
    table = stem.with_suffix(".md").read_text()
    assert "| Balancer none, bucket_cap_mb=inf (one all-reduce after the backward: before) |" in table
