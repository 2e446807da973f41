"""Two builds of the CPU kernels side by side: `python -m bench.vec_width --before A.so [--before-ops op=B.so ...]
--after C.so` times every CPU op at ResNet-18 size (D = 11.69M) and at small sizes, float32 and bfloat16, 1 thread.

Made for the tile-width change of csrc/cpu/common.h (64-byte vectors on AVX-512 only, one register's width
elsewhere). Two builds of modfuse._C cannot live in one process (both register torch.ops.modfuse), so each build
runs in its own worker process that loads only the .so; workers alternate build by build, round by round, and the
median of the rounds' medians is kept, so both builds see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from bench.cases import RESNET18_SIZES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OPS = (
    "segment_sq_norms",
    "tensor_sq_norms",
    "segment_moments",
    "moments",
    "moments_accumulate_",
    "calibrated_aggregate",
    "calibrated_aggregate_samples",
    "gram",
    "weighted_sum",
    "segment_scale_",
    "segment_scale_ noise",
)
SIZES = {"resnet18": RESNET18_SIZES, "small": [40, 7, 253], "mid": [65536, 3, 131075, 64]}


def cases(op: str, size: str, dtype: torch.dtype):
    """The call to time for one op at one size: a zero-argument function on fresh random inputs."""
    g = torch.Generator().manual_seed(0)
    sizes = SIZES[size]
    D = sum(sizes)
    offsets = torch.tensor([0] + sizes).cumsum(0)
    ops = torch.ops.modfuse

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if op == "segment_sq_norms":
        x = rand(2, D)
        return lambda: ops.segment_sq_norms(x, offsets)
    if op == "tensor_sq_norms":
        tensors = [rand(n) for n in sizes]
        return lambda: ops.tensor_sq_norms(tensors)
    if op == "segment_moments":
        x = rand(2, D)
        return lambda: ops.segment_moments(x, offsets)
    if op == "moments":
        G = rand(2, 2, D)
        return lambda: ops.moments(G)
    if op == "moments_accumulate_":
        acc = torch.float32
        S1, S2, gm = torch.zeros(2, D, dtype=acc), torch.zeros(2, D, dtype=acc), rand(2, D)
        return lambda: ops.moments_accumulate_(S1, S2, gm)
    if op == "calibrated_aggregate":
        S1 = rand(3, D)
        S2 = (S1.float().square() / 8 + 1 + torch.rand(3, D, generator=g)).to(dtype)
        n = torch.full((3,), 8.0)
        return lambda: ops.calibrated_aggregate(S1, S2, n)
    if op == "calibrated_aggregate_samples":
        G = rand(2, 4, D)
        return lambda: ops.calibrated_aggregate_samples(G)
    if op == "gram":
        X = rand(3, D)
        return lambda: ops.gram(X)
    if op == "weighted_sum":
        X, w = rand(3, D), torch.rand(3, generator=g)  # one float32 weight per row
        return lambda: ops.weighted_sum(X, w)
    if op.startswith("segment_scale_"):
        x = rand(D)
        acc = torch.float32
        scale = torch.ones(len(sizes), dtype=acc)
        noise = torch.full((len(sizes),), 1e-3, dtype=acc) if op.endswith("noise") else None
        return lambda: ops.segment_scale_(x, offsets, scale, noise, 1, 0)
    raise ValueError(op)


def worker(so: str, ops: list[str], sizes: list[str], repeats: int) -> dict:
    torch.set_num_threads(1)
    torch.ops.load_library(so)
    out = {}
    for op in ops:
        for size in sizes:
            for name, dtype in DTYPES.items():
                fn = cases(op, size, dtype)
                n = repeats if size == "resnet18" else repeats * 20
                fn()
                fn()
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
                out[f"{op}|{size}|{name}"] = statistics.median(times)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the .so of the old build")
    p.add_argument("--before-ops", nargs="*", default=[], help="op=path: an op timed from another old build")
    p.add_argument("--after", required=True, help="the .so of the new build")
    p.add_argument("--ops", nargs="*", default=list(OPS))
    p.add_argument("--sizes", nargs="*", default=list(SIZES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", help="write the medians here")
    p.add_argument("--worker", nargs=2, metavar=("SO", "OPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        so, ops = args.worker
        print(json.dumps(worker(so, ops.split(","), args.sizes, args.repeats)))
        return
    special = dict(s.split("=", 1) for s in args.before_ops)
    groups = {"after": [(args.after, args.ops)], "before": []}
    plain = [op for op in args.ops if op.split()[0] not in special]
    groups["before"].append((args.before, plain))
    for op in args.ops:
        if op.split()[0] in special:
            groups["before"].append((special[op.split()[0]], [op]))
    seen: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for _ in range(args.rounds):
        for build in ("before", "after"):
            for so, ops in groups[build]:
                if not ops:
                    continue
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.vec_width",
                    "--before",
                    "-",
                    "--after",
                    "-",
                    "--sizes",
                    *args.sizes,
                    "--repeats",
                    str(args.repeats),
                    "--worker",
                    so,
                    ",".join(ops),
                ]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                for k, v in res.items():
                    seen[build].setdefault(k, []).append(v)
    med = {b: {k: statistics.median(v) for k, v in d.items()} for b, d in seen.items()}
    print("| op | size | dtype | before ms | after ms | before / after |")
    print("|---|---|---|---|---|---|")
    for k in med["after"]:
        op, size, dtype = k.split("|")
        b, a = med["before"][k], med["after"][k]
        print(f"| {op} | {size} | {dtype} | {b:.3f} | {a:.3f} | {b / a:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "repeats": args.repeats, "median_ms": med}, f, indent=1)


if __name__ == "__main__":
    main()
