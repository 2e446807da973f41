"""Step time with the gradient all-reduces overlapped with the backward (issue 11), beside DDP's plain step.
2 gloo processes on the CPU, one thread each; writes bench/results/<date>-cpu-overlap.{json,md}.

    OMP_NUM_THREADS=1 python -m bench.overlap            # 6 x 1024x1024 layers, batch 64, 25 steps per row
    python -m bench.overlap --quick                      # tiny sizes (a smoke test)

Model: two encoders of 2 Linear(1024, 1024)-ReLU layers each, a fusion trunk of 2 such layers on the mean of the
embeddings, a Linear(1024, 10) head (6.3M float32 parameters, 25 MB of gradients). One step is forward + backward
(+ the gradient all-reduces) + SGD.step, timed on every rank after a barrier; a step's time is the slowest rank's.
Rows, run in one job and interleaved (every row takes a few steps in turn, so a load change of the shared machine
touches all rows alike), median over the timed steps after warm-up:
- DDP's plain step (its reducer: ~25 MB buckets, the first 1 MB, all-reduced as the backward produces them), at
  its default bucket_cap_mb and at the same cap as the Balancer's smaller buckets;
- the Balancer, method "none", plain process group: bucket_cap_mb=inf (one packed all-reduce per dtype after the
  backward has finished: the path before issue 11's overlap), the default 25 MB, and a smaller cap;
- the same for "ogm_ge" (its encoder banks reduced where they lie).
Ratios: every row's median against DDP's default step and against the Balancer's own inf row. For the Balancer's
rows also the time it waits after the backward for its all-reduces (the communication the backward did not hide).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import modfuse
from bench.distributed import free_port
from bench.harness import RESULTS, environment

QUICK = {"width": 64, "batch": 8, "steps": 3, "warmup": 1, "rounds": 1}


class Net(nn.Module):
    """Two encoders, a fusion trunk and a head: 6 width x width layers (the issue's 'MLP of 6 x 1024x1024')."""

    def __init__(self, width: int, classes: int = 10):
        super().__init__()

        def block():
            return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())

        self.enc = nn.ModuleDict({"a": block(), "b": block()})
        self.trunk = block()
        self.head = nn.Linear(width, classes)

    def forward(self, xs):
        hs = {m: self.enc[m](x) for m, x in xs.items()}
        return self.head(self.trunk(torch.stack(list(hs.values())).mean(0))), {m: self.head(h) for m, h in hs.items()}


def rows_of(args) -> list[tuple[str, str, dict]]:
    """(label, kind, options): kind "ddp" (DDP's plain step) or a Balancer method."""
    small = args.small_cap
    out = [("DDP, bucket_cap_mb=25 (default)", "ddp", {}), (f"DDP, bucket_cap_mb={small:g}", "ddp", {"cap": small})]
    for method in ("none", "ogm_ge"):
        for cap, note in ((float("inf"), " (one all-reduce after the backward: before)"), (25, ""), (small, "")):
            out.append((f"Balancer {method}, bucket_cap_mb={cap:g}{note}", method, {"cap": cap}))
    return out


def worker(rank, world, port, args, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        g = torch.Generator().manual_seed(1 + rank)
        xs = {m: torch.randn(args.batch, args.width, generator=g) for m in ("a", "b")}
        y = torch.randint(0, 10, (args.batch,), generator=g)
        runs = []
        for label, kind, options in rows_of(args):
            torch.manual_seed(0)
            net = Net(args.width)
            if kind == "ddp":
                from torch.nn.parallel import DistributedDataParallel as DDP

                model = DDP(net, bucket_cap_mb=options.get("cap", 25))
                balancer = None
            else:
                model = net
                balancer = modfuse.Balancer(
                    net, encoders=dict(net.enc), shared=net.head, method=kind, bucket_cap_mb=options["cap"]
                )
            runs.append((label, model, net, balancer, torch.optim.SGD(net.parameters(), lr=1e-3), []))

        def step(model, net, balancer, opt):
            opt.zero_grad(set_to_none=True)
            fused, uni = model(xs)
            loss = F.cross_entropy(fused, y, reduction="none")
            unimodal = {m: F.cross_entropy(v, y, reduction="none") for m, v in uni.items()}
            if balancer is None:
                (loss.mean() + sum(v.mean() for v in unimodal.values())).backward()
            else:
                assert balancer.backward(fused=loss, unimodal=unimodal, logits=uni, target=y)
            opt.step()

        for _label, model, net, balancer, opt, _ in runs:  # warm-up: every row's buffers and gloo pairs
            for _ in range(args.warmup):
                step(model, net, balancer, opt)
        # the Balancer's wait after the backward (launching what is left, waiting for every bucket, writing .grad):
        # the communication the backward did not hide
        finish, waits = modfuse.groups._Step.finish, []

        def timed_finish(self):
            start = time.perf_counter()
            finish(self)
            waits.append(time.perf_counter() - start)

        modfuse.groups._Step.finish = timed_finish
        per_round = max(1, args.steps // args.rounds)
        for _ in range(args.rounds):
            for _label, model, net, balancer, opt, times in runs:
                for _ in range(per_round):
                    dist.barrier()
                    waits.clear()
                    start = time.perf_counter()
                    step(model, net, balancer, opt)
                    elapsed = torch.tensor([time.perf_counter() - start, sum(waits)], dtype=torch.float64)
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
                    times.append(elapsed.tolist())
        if rank == 0:
            torch.save([(label, times) for label, *_, times in runs], path)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per row")
    parser.add_argument("--rounds", type=int, default=5, help="the timed steps are taken in this many turns")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--small-cap", type=float, default=5.0, help="MB (MiB, as DDP): the smaller cap (about a layer per bucket here)"
    )
    parser.add_argument("--timeout", type=float, default=120, help="process-group timeout, seconds")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
        args.small_cap = 0.01
    env = environment()
    env["threads"] = 1
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=Path(__file__).parent
    )
    env["git"] = commit.stdout.strip() or "unknown"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.pt")
        mp.spawn(worker, args=(2, free_port(), args, path), nprocs=2, join=True)
        measured = torch.load(path)
    medians = {label: statistics.median(t for t, _ in times) for label, times in measured}
    ddp = medians[rows_of(args)[0][0]]
    # each method's row at bucket_cap_mb=inf: one all-reduce after the backward, the path before the overlap
    before = {kind: medians[label] for label, kind, o in rows_of(args) if o.get("cap") == float("inf")}
    results = []
    for label, kind, _ in rows_of(args):
        times = [t for t, _ in dict(measured)[label]]
        waits = [w for _, w in dict(measured)[label]]
        results.append(
            {
                "row": label,
                "median_ms": 1e3 * medians[label],
                "wait_after_backward_ms": None if kind == "ddp" else 1e3 * statistics.median(waits),
                "min_ms": 1e3 * min(times),
                "max_ms": 1e3 * max(times),
                "steps": len(times),
                "vs_ddp": medians[label] / ddp,
                "vs_before": medians[label] / before[kind] if kind in before else None,
            }
        )
    return write(results, env, args)


def write(results, env, args):
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{env['date'][:10]}-cpu-overlap{'-quick' if args.quick else ''}"
    setup = {k: getattr(args, k) for k in ("width", "batch", "steps", "rounds", "warmup", "small_cap")}
    setup["world"] = 2
    stem.with_suffix(".json").write_text(
        json.dumps({"environment": env, "setup": setup, "results": results}, indent=1) + "\n"
    )
    lines = [
        f"# Gradient all-reduces overlapped with the backward, {env['date']}",
        "",
        (
            f"2 gloo processes on {env['cpu']} ({env['cores']} cores, shared), 1 thread each, torch {env['torch']}, "
            f"modfuse at commit {env['git']}. Model: 6 Linear({args.width}, {args.width}) layers in two encoders "
            f"and a fusion trunk, plus a {args.width}x10 head, float32; batch {args.batch} per rank, SGD. Step = "
            f"forward + backward + all-reduces + optimizer step, the slower rank's time; median of {args.steps} "
            f"timed steps per row after {args.warmup} warm-up steps, the rows interleaved in {args.rounds} turns "
            "(`python -m bench.overlap`). Ratios are times: below 1 is faster."
        ),
        "",
        (
            "| row | median ms | min ms | max ms | wait after the backward, median ms | vs DDP default | "
            "vs the same method at bucket_cap_mb=inf |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        vs_before = "-" if r["vs_before"] is None else f"{r['vs_before']:.2f}x"
        wait = "-" if r["wait_after_backward_ms"] is None else f"{r['wait_after_backward_ms']:.1f}"
        lines.append(
            f"| {r['row']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['max_ms']:.1f} | {wait} | "
            f"{r['vs_ddp']:.2f}x | {vs_before} |"
        )
    lines += [
        "",
        (
            "Wait after the backward: the Balancer's time from the end of the backward to its `.grad` written "
            "(launching the buckets not yet started, waiting for every all-reduce), i.e. the communication the "
            "backward did not hide; the slower rank's, median over the timed steps."
        ),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return stem


if __name__ == "__main__":
    main()
