"""What every benchmark script shares: the timer, the environment record, the result writer, a shape label.

One timer for both devices: CUDA events around each call on a GPU, perf_counter on the CPU; median over
repeats after warm-up. Results go to bench/results/<date>-<device tag>[-suffix].{json,md}.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import modfuse

RESULTS = Path(__file__).resolve().parent / "results"


class Timer:
    def __init__(self, device: torch.device | str = "cpu", repeats: int = 15, warmup: int = 2):
        self.device, self.repeats, self.warmup = torch.device(device), repeats, warmup

    def ms(self, fn, repeats: int | None = None, warmup: int | None = None) -> float:
        """Median milliseconds of fn() over `repeats` calls after `warmup` calls."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        times = []
        for _ in range(self.repeats if repeats is None else repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def copy_ms(self, nbytes: int, repeats: int | None = None) -> float:
        """A plain copy of the op's bytes (half read, half written): the floor of a memory-bound op."""
        src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        return self.ms(lambda: dst.copy_(src), repeats)


def compiled(fn):
    """A fresh torch.compile per shape, so no case runs into dynamo's recompile limit and falls back to eager."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def element_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def size(D: int) -> str:
    """A size label: 16M for 16 * 2^20, else the number."""
    return f"{D >> 20}M" if D >= 1 << 20 and D % (1 << 20) == 0 else str(D)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})"


def _first_line(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def environment(device: torch.device | str = "cpu") -> dict:
    """What the figures depend on: the device, driver, CUDA, torch, triton, compiler and build flags."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "modfuse": modfuse.__version__,
        "python": platform.python_version(),
        "driver": _first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if device.type == "cuda"
        else None,
        "gcc": _first_line(["gcc", "--version"]) or "unknown",
        "arch_flags": getattr(modfuse.ops._C, "cpu_arch_flags", None),
        "cuda_build": modfuse.ops._cuda_built(),
    }


def device_tag(env: dict) -> str:
    """The file-name tag of a device: "cpu" or the GPU's name, e.g. nvidia-h100-80gb-hbm3."""
    if env["device"].startswith("cpu"):
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")


def write(out: Path, env: dict, rows: list, markdown: list[str], suffix: str = "") -> Path:
    """Write <out>/<date>-<device><suffix>.{json,md}; returns the stem."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{env['date'][:10]}-{device_tag(env)}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(markdown) + "\n")
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}", flush=True)
    return stem
