"""The Balancer's own per-step cost (issue 15 item 3), this tree beside a baseline checkout, side by side.

    python -m bench.bookkeeping --before /tmp/main

Model: bench/step_overhead.py's toy late-fusion model (two MLP encoders, shared Linear-ReLU-Linear head), hidden
256, batch 128, Adam; a bare `loss.backward()` step beside Balancer steps with method "none" and "ogm_ge". Each tree
runs in its own subprocess, alternating, `--rounds` times; printed is the median over rounds of each run's median
step CPU time (time.process_time, robust to other processes sharing the cores) and the ratio to the bare step.
First, in this process: the non-finite gradient checks main ran (before issue 15: `_foreach_norm(ord=inf)`; after
its first round: `_foreach_norm` 2-norms) beside this tree's `Groups.check_finite` (Op 1b's squared norms + exact
confirm), and the same when a method's own reduction already proves every tensor finite (greedy's norms, ogm_ge's
moments: `proven=`), on three parameter sets, min CPU time of 3 x 20 calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("bare", "none", "ogm_ge")


def worker(steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    import modfuse
    from bench.step_overhead import LateFusion

    out = {}
    for case in CASES:
        torch.manual_seed(0)
        dims = {"pix": 240, "zer": 47}
        net = LateFusion(dims, 256)
        xs = {m: torch.randn(128, d) for m, d in dims.items()}
        y = torch.randint(0, 10, (128,))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        balancer = (
            None if case == "bare" else modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=case)
        )
        times = []
        for i in range(steps + 10):
            start = time.process_time()
            fused, uni = net(xs)
            optimizer.zero_grad(set_to_none=True)
            if balancer is None:
                F.cross_entropy(fused, y).backward()
            else:
                assert balancer.backward(fused=F.cross_entropy(fused, y, reduction="none"), logits=uni, target=y)
            optimizer.step()
            if i >= 10:
                times.append(time.process_time() - start)
        out[case] = statistics.median(times) * 1e3
    return out


def check_finite_comparison() -> list[tuple[str, float, float, float, float, float]]:
    """(parameter set, millions of elements, ms of: main's inf-norm check, the _foreach_norm 2-norm check,
    Groups.check_finite, Groups.check_finite with every tensor proven by a method)."""
    import torch
    from torch import nn

    import modfuse
    from bench.banks import resnet18_encoder
    from bench.step_overhead import LateFusion

    def inf_norm_check(grads):  # main's Groups.check_finite body
        maxima = torch.stack([m.double() for m in torch._foreach_norm(grads, ord=float("inf"))])
        return (~torch.isfinite(maxima)).nonzero().flatten().tolist()

    def two_norm_check(grads):  # Groups.check_finite's body after issue 15's first round
        norms = torch.stack(torch._foreach_norm(grads, 2)).to(torch.float64)
        return (~torch.isfinite(norms)).nonzero().flatten().tolist()

    sets = [
        ("toy, hidden 256", LateFusion({"pix": 240, "zer": 47}, 256)),
        ("toy, hidden 1024", LateFusion({"pix": 240, "zer": 47}, 1024)),
        ("two ResNet-18", nn.ModuleDict({"a": resnet18_encoder(1), "v": resnet18_encoder(3)})),
    ]
    out = []
    for name, model in sets:
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        encoders = {"only": model}
        groups = modfuse.Balancer(model, encoders=encoders, method="none").groups
        grads = [p.grad for p in params]
        bound = torch.stack(torch._foreach_norm(grads, 2)).double().norm().reshape(1)  # what a method would hand in
        checks = {
            "inf": lambda: inf_norm_check(grads),
            "two": lambda: two_norm_check(grads),
            "now": lambda: groups.check_finite(params),
            "proven": lambda: groups.check_finite(params, proven=[(params, bound)]),
        }
        best = {}
        for _ in range(3):
            for label, check in checks.items():
                check()
                for _ in range(20):
                    start = time.process_time()
                    check()
                    best[label] = min(best.get(label, 1e9), time.process_time() - start)
        out.append((name, sum(p.numel() for p in params) / 1e6, *(best[k] * 1e3 for k in checks)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout of the baseline tree (its modfuse/_C*.so built)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.steps)))
        return
    import torch

    torch.set_num_threads(1)
    print(
        "non-finite gradient check, min CPU ms: inf-norm (main before issue 15) | _foreach_norm 2-norm (its first "
        "round) | Groups.check_finite | the same, every tensor proven by the method; ratios to the 2-norm check"
    )
    for name, millions, inf, two, now, proven in check_finite_comparison():
        print(
            f"  {name:18s} {millions:6.2f}M elements  {inf:8.2f} | {two:7.2f} | {now:7.2f} ({two / now:4.2f}x) | "
            f"{proven:6.3f} ({two / proven:5.0f}x) ms"
        )
    print()
    here = Path(__file__).resolve().parent.parent
    trees = {"after": here} | ({"before": args.before.resolve()} if args.before else {})
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree, path in trees.items():
            # modfuse (and bench.step_overhead's model, the same file in both) from the tree measured
            env = dict(os.environ, PYTHONPATH=str(path), OMP_NUM_THREADS="1")
            cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps)]
            done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            runs[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"Balancer bookkeeping | toy model, hidden 256, batch 128 | median of {args.rounds} runs x {args.steps} steps"
    )
    print(f"{'case':8s}" + "".join(f" | {t:>6s} CPU ms/step  vs bare" for t in trees))
    for case in CASES:
        cells = []
        for tree in trees:
            ms = statistics.median(r[case] for r in runs[tree])
            bare = statistics.median(r["bare"] for r in runs[tree])
            cells.append(f" | {ms:17.2f}  {ms / bare:7.2f}")
        print(f"{case:8s}" + "".join(cells))


if __name__ == "__main__":
    main()
