"""The examples run as documented: examples/balancer_quickstart.py as a script, and its loop with every method,
leaving the statistics the README's Balancer section lists for each method."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import modfuse

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "balancer_quickstart.py"

# What Balancer.stats() returns per method after a step (README, "stats() per method"); {m} is each modality.
STATS_KEYS = {
    "none": set(),
    "calibrated": {
        "{m}/belief",
        "{m}/zero_evidence",
        "{m}/kept_norm",
        "fused/belief",
        "fused/zero_evidence",
        "fused/kept_norm",
    },
    "ogm_ge": {"{m}/coefficient"},
    "greedy": {"{m}/holds", "{m}/speed_log_ratio"},
    "mmpareto": {"{m}/cos", "conflicts"},
    "utilization": {"{m}/utilization", "lambda_", "empty_steps"},
    "mimo": {"{m}/weight"},
    "i2m2": set(),
    "inforeg": {"{m}/window", "{m}/beta", "{m}/fisher_trace"},
    "agm": {"{m}/coefficient"},
    "pmr": {"{m}/prototype_score", "{m}/pce_coefficient"},
    "cggm": {"{m}/coefficient", "{m}/classifier_accuracy", "{m}/cos", "direction_loss"},
}


def _quickstart():
    spec = importlib.util.spec_from_file_location("balancer_quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_has_its_stats_documented():
    assert set(STATS_KEYS) == set(modfuse.methods.names())
    readme = (ROOT / "README.md").read_text()
    for keys in STATS_KEYS.values():
        for key in keys:
            assert f"`{key}`" in readme, f"README's Balancer section does not list the stats key {key}"


@pytest.mark.parametrize("method", sorted(STATS_KEYS))
def test_quickstart_loop_learns_with_every_method(method):
    result = _quickstart().main(method, epochs=3, verbose=False)
    acc = result["accuracy"]
    assert acc["fused"] > 0.9, acc  # chance is 0.25; plain training reaches 0.99 on this data
    expected = {k.replace("{m}", m) for k in STATS_KEYS[method] for m in ("audio", "video")}
    assert set(result["stats"]) == expected
    assert all(isinstance(v, float) for v in result["stats"].values())


def test_quickstart_runs_as_a_script_and_the_readme_shows_it():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(QUICKSTART), "--epochs", "2", "--option", "alpha=0.5"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("epoch 2: test accuracy fused"), result.stdout
    assert "audio/coefficient" in lines[-1]
    assert "examples/balancer_quickstart.py" in (ROOT / "README.md").read_text()
