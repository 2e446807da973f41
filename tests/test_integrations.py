"""The Balancer inside PyTorch Lightning (manual optimization, DDP strategy) and HF Accelerate
(`accelerator.prepare`, DDP), each on 2 CPU processes with gloo: the example scripts in examples/ (the README's
code) run as a user would run them, and every rank's last gradients and its parameters after 3 SGD steps must
equal one process running the plain Balancer on the concatenated batches (the samples both ranks saw, rank 0's
first). The README's snippets must be the examples' code verbatim.

Lightning and Accelerate are optional extras (pip install -e ".[lightning,accelerate]"); CI installs both, so
there these tests run. Skipped only where the extra is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modfuse

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# method -> its options for one process on both ranks' samples (the examples run calibrated with 2 microbatches
# per rank, so 4 over the concatenated batch). Run in this order, one launch per framework.
CASES = {"none": {}, "ogm_ge": {}, "mmpareto": {}, "calibrated": {"microbatches": 4}}
TIMEOUT = 240  # seconds for one 2-process run; the process groups themselves time out after 60 s


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_two_processes(command: list[str], tmp_path: Path) -> dict:
    """Run a 2-process example for every method of CASES in one launch; each method's records, or why not."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    out = tmp_path / "record"
    command = command + ["--methods", ",".join(CASES), "--microbatches", "2", "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    failure = f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    runs = {}
    for method in CASES:
        files = [Path(f"{out}.{method}.{rank}") for rank in range(2)]
        runs[method] = [torch.load(f) for f in files] if all(f.exists() for f in files) else failure
    return runs


def one_process_reference(example, records, method, options, lr=0.1):
    """The plain Balancer (no wrapper, no process group) on each step's concatenated batch, in float64."""
    data = example.make_data()
    net = example.make_net().double()
    balancer = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method, **options)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for step in range(len(records[0]["indices"])):
        index = torch.tensor(records[0]["indices"][step] + records[1]["indices"][step])
        _, *xs, y = data[index]
        fused, unimodal = net({m: x.double() for m, x in zip(example.SHAPES, xs)})
        optimizer.zero_grad()
        assert balancer.backward(
            fused=F.cross_entropy(fused, y, reduction="none"),
            unimodal={m: F.cross_entropy(v, y, reduction="none") for m, v in unimodal.items()},
            logits=unimodal,
            target=y,
        )
        optimizer.step()
    return net


def assert_matches_one_process(records, net):
    assert len(records[0]["indices"]) == 3, "expected 3 optimizer steps"
    for rank, record in enumerate(records):
        for name, p in net.named_parameters():
            torch.testing.assert_close(
                record["grads"][name],
                p.grad,
                rtol=1e-9,
                atol=1e-12,
                msg=f"rank {rank}: .grad of {name} differs from one process",
            )
            torch.testing.assert_close(
                record["params"][name],
                p.detach(),
                rtol=1e-9,
                atol=1e-12,
                msg=f"rank {rank}: {name} after 3 steps differs from one process",
            )
    # the ranks saw different samples (else the test would not test the reduction)
    seen = [{i for step in record["indices"] for i in step} for record in records]
    assert not seen[0] & seen[1]


def readme_snippet_matches(example: str, tag: str):
    """The README's code block for `tag` is the example's code between its `# [readme: tag]` markers (dedented)."""
    source = (EXAMPLES / f"{example}.py").read_text()
    match = re.search(rf"# \[readme: {tag}\]\n(.*?)# \[/readme: {tag}\]\n", source, re.DOTALL)
    assert match, f"examples/{example}.py has no [readme: {tag}] block"
    assert textwrap.dedent(match.group(1)) in (ROOT / "README.md").read_text(), (
        f"README.md's {tag} example differs from examples/{example}.py: copy the marked block into the README"
    )


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    pytest.importorskip("lightning", reason="the 'lightning' extra is not installed (pip install -e '.[lightning]')")
    # Lightning's own launcher: it starts the second process by re-running the script
    return run_two_processes(
        [sys.executable, str(EXAMPLES / "lightning_ddp.py"), "--precision", "64-true"],
        tmp_path_factory.mktemp("lightning"),
    )


@pytest.mark.parametrize("method", list(CASES))
def test_lightning_ddp_two_cpu_processes_equal_one_process(method, lightning_runs):
    records = lightning_runs[method]
    assert not isinstance(records, str), records
    assert [r["world"] for r in records] == [2, 2]
    reference = one_process_reference(load_example("lightning_ddp"), records, method, CASES[method])
    assert_matches_one_process(records, reference)


def test_lightning_readme_example_is_the_tested_code():
    readme_snippet_matches("lightning_ddp", "lightning")


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory):
    pytest.importorskip("accelerate", reason="the 'accelerate' extra is not installed (pip install -e '.[accelerate]')")
    return run_two_processes(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(EXAMPLES / "accelerate_ddp.py"),
            "--double",
        ],
        tmp_path_factory.mktemp("accelerate"),
    )


@pytest.mark.parametrize("method", list(CASES))
def test_accelerate_ddp_two_cpu_processes_equal_one_process(method, accelerate_runs):
    records = accelerate_runs[method]
    assert not isinstance(records, str), records
    assert [r["world"] for r in records] == [2, 2]
    reference = one_process_reference(load_example("accelerate_ddp"), records, method, CASES[method])
    assert_matches_one_process(records, reference)


def test_accelerate_readme_example_is_the_tested_code():
    readme_snippet_matches("accelerate_ddp", "accelerate")
