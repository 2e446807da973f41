"""Persistent gradient banks (issue 15): step time and fresh-page traffic per step, before and after, side by side.

    python -m bench.banks                          # this tree only
    python -m bench.banks --before /tmp/main       # and a checkout of the baseline (e.g. `git worktree add`)

Model: two ResNet-18 encoders (11.2M parameters and 60 tensors each; 1- and 3-channel 32x32 inputs) and a shared
Linear head applied to each embedding (unimodal logits) and to their mean (fused logits); batch 4, SGD. One step is
forward + Balancer.backward (or a bare `loss.backward()`) + SGD.step, after `zero_grad(set_to_none=True)`.
Times: the median step's CPU time of the process (time.process_time: robust to other processes sharing the
cores, unlike wall time, which is printed too) and the Balancer.backward part of it. Fresh pages: minor page faults (resource.getrusage ru_minflt) during the measured steps x the page size, per step:
the memory a step first-touches (freshly mapped buffers), which costs time and bandwidth beyond the step's work.
First it prints how to fill a persistent bank (one ResNet-18's gradients, 11.2M float32): zero_() then in-place
accumulation (what autograd does into a `.grad` view) against copying each gradient in (modfuse's post-accumulate
hook), and against main's fresh zeroed bank per step.
Every tree runs in its own subprocess (modfuse from that tree), the trees alternate method by method, and the table
prints after/before ratios. Writes bench/results/<date>-cpu-banks.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {  # label -> (method, options, pass unimodal losses)
    "bare loss.backward": (None, {}, False),
    "none": ("none", {}, False),
    "ogm_ge": ("ogm_ge", {}, False),
    "greedy": ("greedy", {"window_steps": 10**9}, False),
    "mmpareto": ("mmpareto", {}, True),
    "calibrated (per_sample)": ("calibrated", {"moments": "per_sample"}, True),
}


def resnet18_encoder(channels: int):
    """ResNet-18 without its classifier (torchvision's layout; torchvision is not installable here)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
            return (out + (x if self.down is None else self.down(x))).relu()

    layers = [nn.Conv2d(channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def worker(label: str, steps: int, warmup: int) -> dict:
    """Measure one case with the modfuse on sys.path (run in a subprocess per tree)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import modfuse

    method, options, unimodal = CASES[label]
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleDict({"audio": resnet18_encoder(1), "visual": resnet18_encoder(3)})
            self.head = nn.Linear(512, 10)

        def forward(self, xs):
            hs = {m: self.enc[m](xs[m]) for m in self.enc}
            return self.head(torch.stack(list(hs.values())).mean(0)), {m: self.head(h) for m, h in hs.items()}

    net = Net()
    xs = {"audio": torch.randn(4, 1, 32, 32), "visual": torch.randn(4, 3, 32, 32)}
    y = torch.randint(0, 10, (4,))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
    balancer = (
        None
        if method is None
        else modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method, **options)
    )

    def step():
        fused, uni = net(xs)
        optimizer.zero_grad(set_to_none=True)
        start = time.process_time()
        if balancer is None:
            F.cross_entropy(fused, y).backward()
        else:
            kw = {"fused": F.cross_entropy(fused, y, reduction="none"), "logits": uni, "target": y}
            if unimodal:
                kw["unimodal"] = {m: F.cross_entropy(v, y, reduction="none") for m, v in uni.items()}
            assert balancer.backward(**kw)
        backward = time.process_time() - start
        optimizer.step()
        return backward

    for _ in range(warmup):
        step()
    times, cpu, backwards = [], [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        backwards.append(step())
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {
        "case": label,
        "step_ms": statistics.median(times) * 1e3,
        "step_min_ms": min(times) * 1e3,
        "step_cpu_ms": statistics.median(cpu) * 1e3,
        "backward_cpu_ms": statistics.median(backwards) * 1e3,
        "fresh_MB_per_step": faults * resource.getpagesize() / steps / 1e6,
    }


def fill_comparison(repeats: int = 15) -> dict:
    """ms (min and median) to fill a ResNet-18 bank from its gradients, three ways (see the module docstring)."""
    import torch

    params = list(resnet18_encoder(3).parameters())
    grads = [torch.randn_like(p) for p in params]
    bank = torch.zeros(sum(p.numel() for p in params))
    views = list(torch.split(bank, [p.numel() for p in params]))

    def zero_then_add():
        bank.zero_()
        for view, g in zip(views, grads):
            view.add_(g.view(-1))

    def copy_in():
        for view, g in zip(views, grads):
            view.copy_(g.view(-1))

    def fresh_bank():
        fresh = torch.zeros(bank.numel())
        for view, g in zip(torch.split(fresh, [p.numel() for p in params]), grads):
            view.add_(g.view(-1))

    out = {}
    for name, fill in (("persistent, zero_() + add_", zero_then_add), ("persistent, copy_ in", copy_in)) + (
        ("fresh zeroed bank + add_ (main)", fresh_bank),
    ):
        fill()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fill()
            times.append(time.perf_counter() - start)
        out[name] = {"min_ms": min(times) * 1e3, "median_ms": statistics.median(times) * 1e3}
    return out


def run_tree(tree: Path, label: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", label, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout of the baseline tree (its modfuse/_C*.so built)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated labels")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup)))
        return
    import torch

    torch.set_num_threads(args.threads)
    fills = fill_comparison()
    print("filling one ResNet-18 bank (11.2M float32):")
    for name, t in fills.items():
        print(f"  {name:34s} min {t['min_ms']:7.2f} ms  median {t['median_ms']:7.2f} ms")
    print()
    here = Path(__file__).resolve().parent.parent
    trees = {"after": here} | ({"before": args.before.resolve()} if args.before else {})
    rows = []
    print(f"banks | {args.steps} steps after {args.warmup} warm-up, {args.threads} thread(s) | trees: {trees}\n")
    header = f"{'case':26s}" + "".join(f" | {t:>6s} cpu ms  wall ms  fresh MB" for t in trees)
    print(header + (" | cpu after/before  fresh after/before" if args.before else ""), flush=True)
    for label in args.cases.split(","):
        got = {tree: run_tree(path, label, args) for tree, path in trees.items()}
        row = {"case": label, **{tree: got[tree] for tree in trees}}
        line = f"{label:26s}" + "".join(
            f" | {got[t]['step_cpu_ms']:13.1f} {got[t]['step_ms']:8.1f} {got[t]['fresh_MB_per_step']:9.1f}"
            for t in trees
        )
        if args.before:
            a, b = got["after"], got["before"]
            row["step_ratio"] = a["step_ms"] / b["step_ms"]
            row["cpu_ratio"] = a["step_cpu_ms"] / b["step_cpu_ms"]
            row["fresh_ratio"] = a["fresh_MB_per_step"] / max(b["fresh_MB_per_step"], 1e-9)
            line += f" | {row['cpu_ratio']:16.2f}  {row['fresh_ratio']:18.2f}"
        print(line, flush=True)
        rows.append(row)
    write(rows, fills, args, trees)


def write(rows, fills, args, trees):
    import platform

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    stem = args.out / f"{date[:10]}-cpu-banks"
    setup = {
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "trees": {k: str(v) for k, v in trees.items()},
    }
    stem.with_suffix(".json").write_text(
        json.dumps({"date": date, "setup": setup, "fill": fills, "results": rows}, indent=1) + "\n"
    )
    lines = [
        f"# modfuse persistent banks, {date}",
        "",
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, {args.threads} thread(s). Two ResNet-18 encoders "
        "(11.2M parameters, 60 tensors each), shared Linear head, batch 4, SGD. Median of "
        f"{args.steps} steps after {args.warmup} (CPU time of the process, and wall time); fresh MB = minor page faults x page size per step.",
        "",
        "| case | "
        + " | ".join(f"{t} step CPU ms | {t} backward CPU ms | {t} step wall ms | {t} fresh MB/step" for t in trees)
        + (" | CPU after/before | wall after/before | fresh after/before |" if len(trees) > 1 else " |"),
        "|---|" + "---|---|---|---|" * len(trees) + ("---|---|---|" if len(trees) > 1 else ""),
    ]
    lines[-2:-2] = [
        "Filling one ResNet-18 bank (11.2M float32): "
        + "; ".join(f"{name} {t['min_ms']:.1f} ms (min), {t['median_ms']:.1f} ms (median)" for name, t in fills.items())
        + ".",
        "",
    ]
    for r in rows:
        cells = " | ".join(
            f"{r[t]['step_cpu_ms']:.1f} | {r[t]['backward_cpu_ms']:.1f} | {r[t]['step_ms']:.1f} | "
            f"{r[t]['fresh_MB_per_step']:.1f}"
            for t in trees
        )
        ratios = (
            f" | {r['cpu_ratio']:.2f} | {r['step_ratio']:.2f} | {r['fresh_ratio']:.2f} |" if len(trees) > 1 else " |"
        )
        lines.append(f"| {r['case']} | {cells}{ratios}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
