"""The GPU proof in one command, stage by stage (each fits one 10-minute command on an H100; `all` 25 minutes):

    python -m bench.gpu_proof --stage build      # pip install --no-build-isolation -v -e . against the torch there,
                                                 # then: every op has a CUDA kernel registered
    python -m bench.gpu_proof --stage test       # the GPU tests (CUDA and Triton targets of the op matrix, opcheck,
                                                 # tests/test_gpu.py)
    python -m bench.gpu_proof --stage sanitize   # compute-sanitizer memcheck and racecheck over the CUDA op tests
    python -m bench.gpu_proof --stage bench      # python -m bench.gpu: bench/results/<date>-<gpu>.{json,md}
    python -m bench.gpu_proof --stage all
    python -m bench.gpu_proof --stage all --dry-run   # rehearsal on the CPU (CI): the same code paths with CPU
                                                      # tensors and small sizes; needs no GPU, nvcc or sanitizer

Run it from the repository root. Every stage appends to <out>/<date>-<device>-proof.log (the commands and their
output) and rewrites <out>/<date>-<device>-proof.json (device, driver, CUDA, torch, triton; each stage's
commands, exit codes and seconds). Exit status: 0 when every command of the stage(s) passed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("build", "test", "sanitize", "bench")
STAGE_SECONDS = 470  # each stage inside 8 minutes, so one stage is one 10-minute command
OP_TESTS = [
    "tests/test_segment_sq_norms.py",
    "tests/test_moments.py",
    "tests/test_linear_moments.py",
    "tests/test_calibrated_aggregate.py",
    "tests/test_gram.py",
    "tests/test_weighted_sum.py",
    "tests/test_segment_scale.py",
    "tests/test_segment_moments.py",
]
# Registration check: run after the build in a fresh interpreter, so it sees the extension just built.
CHECK_REGISTRATION = """
import torch, modfuse, modfuse._C as C
from modfuse.ops import OPS
keys = ["CPU", "CUDA"] if C.with_cuda else ["CPU"]
missing = [(op, key) for op in OPS for key in keys
           if not torch._C._dispatch_has_kernel_for_dispatch_key("modfuse::" + op, key)]
assert not missing, f"ops without a kernel: {missing}"
print(f"modfuse._C: with_cuda={C.with_cuda}; {len(OPS)} ops have kernels for {', '.join(keys)}")
"""


def pytest_command(files: list[str], select: str | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        *(["-k", select] if select else []),
        *files,
    ]


def build_commands(dry_run: bool) -> list[list[str]]:
    if dry_run:  # setup.py's whole configuration (torch, C++ standard, CUDA home, arch list), no compiling
        build = [sys.executable, "setup.py", "--version"]
    else:
        build = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-v",
            "-e",
            ".",
        ]
    return [build, [sys.executable, "-c", CHECK_REGISTRATION]]


def test_commands(dry_run: bool) -> list[list[str]]:
    if dry_run:  # the GPU test file (it skips without a GPU) and the registration test, quick on the CPU
        return [pytest_command(["tests/test_gpu.py"]), pytest_command(["tests/test_opcheck.py"], "one_name")]
    return [
        pytest_command(["tests/test_gpu.py"]),
        pytest_command(["tests/test_opcheck.py", *OP_TESTS], "cuda or triton or one_name"),
    ]


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    sys.path.insert(0, str(ROOT))
    import setup_helpers

    home = setup_helpers.find_cuda_home()
    candidate = Path(home or "/usr/local/cuda") / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.is_file() else None


def sanitize_commands(dry_run: bool) -> list[list[str]]:
    """memcheck (out-of-bounds and misaligned accesses, leaks) and racecheck (shared-memory races) over the CUDA
    kernels' tests, minus the hypothesis suites (their many small launches would not fit the stage's time)."""
    if dry_run:  # the same pytest selection on the CPU target of one op file, without the sanitizer
        return [pytest_command(["tests/test_weighted_sum.py"], "cpu and not hypothesis")]
    tool = sanitizer()
    if tool is None:
        raise SystemExit("compute-sanitizer not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)")
    tests = pytest_command(OP_TESTS, "cuda and not hypothesis")
    return [
        [tool, "--tool", name, "--error-exitcode", "1", "--target-processes", "all", *tests]
        for name in ("memcheck", "racecheck")
    ]


def bench_commands(dry_run: bool, out: Path) -> list[list[str]]:
    if dry_run:
        return [[sys.executable, "-m", "bench.gpu", "--device", "cpu", "--smoke", "--out", str(out)]]
    return [[sys.executable, "-m", "bench.gpu", "--out", str(out)]]


def commands(stage: str, dry_run: bool, out: Path) -> list[list[str]]:
    return {
        "build": lambda: build_commands(dry_run),
        "test": lambda: test_commands(dry_run),
        "sanitize": lambda: sanitize_commands(dry_run),
        "bench": lambda: bench_commands(dry_run, out),
    }[stage]()


def run_stage(stage: str, dry_run: bool, out: Path, log) -> dict:
    """Run the stage's commands in order, stopping at the first failure; the stage shares one time budget."""
    record = {"stage": stage, "dry_run": dry_run, "commands": []}
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the rehearsal never touches a GPU, even where there is one
    deadline = time.monotonic() + STAGE_SECONDS
    for command in commands(stage, dry_run, out):
        line = " ".join(command) if "-c" not in command else f"{command[0]} -c <registration check>"
        log.write(f"\n$ {line}\n")
        log.flush()
        print(f"[{stage}] $ {line}", flush=True)
        started = time.monotonic()
        entry = {"command": line, "returncode": None, "seconds": None, "timed_out": False}
        record["commands"].append(entry)
        try:
            done = subprocess.run(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=max(deadline - time.monotonic(), 1),
                check=False,
            )
            entry["returncode"], output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as expired:
            entry["timed_out"], output = (
                True,
                (expired.stdout or b"").decode(errors="replace")
                if isinstance(expired.stdout, bytes)
                else (expired.stdout or ""),
            )
        entry["seconds"] = round(time.monotonic() - started, 1)
        log.write(output)
        log.flush()
        print(output[-4000:], flush=True)
        if entry["returncode"] != 0:
            break
    record["ok"] = all(c["returncode"] == 0 for c in record["commands"])
    record["seconds"] = round(sum(c["seconds"] for c in record["commands"]), 1)
    print(f"[{stage}] {'passed' if record['ok'] else 'FAILED'} in {record['seconds']} s", flush=True)
    return record


def proof_environment() -> dict:
    """Device, driver, CUDA, torch and triton, read in a fresh interpreter (after a build, it sees the new _C)."""
    code = (
        "import json, torch; from bench.harness import environment; "
        "print(json.dumps(environment('cuda' if torch.cuda.is_available() else 'cpu')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=(*STAGES, "all"), required=True)
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: CPU tensors, small sizes")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="where the log, the proof record and the benchmark tables go",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    tag = "dry-run" if args.dry_run else None
    records = []
    log_path = None
    for stage in stages:
        if tag is None:  # the GPU's name (after a build the environment can be read)
            from bench.harness import device_tag

            env = proof_environment()
            tag = device_tag(env) if "device" in env else "unknown"
        log_path = args.out / f"{date}-{tag}-proof.log"
        with log_path.open("a") as log:
            records.append(run_stage(stage, args.dry_run, args.out, log))
        if not records[-1]["ok"]:
            break
    record_path = args.out / f"{date}-{tag}-proof.json"
    previous = json.loads(record_path.read_text()) if record_path.exists() else {"stages": {}}
    previous["environment"] = proof_environment()
    previous["stages"].update({r["stage"]: r for r in records})
    record_path.write_text(json.dumps(previous, indent=1) + "\n")
    print(f"wrote {log_path} and {record_path}", flush=True)
    return 0 if all(r["ok"] for r in records) and len(records) == len(stages) else 1


if __name__ == "__main__":
    sys.exit(main())
