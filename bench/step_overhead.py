"""Step-time overhead of every balancing method against a plain training step of the same model, side by side in
one run, printed as ratios. Writes bench/results/<date>-<device>-step-overhead.{json,md}.

    python -m bench.step_overhead            # CPU (or --device cuda)
    python -m bench.step_overhead --quick

Model: late fusion of two MLP encoders (input dims of the mfeat pix and zer views, 240 and 47) and a shared head
(Linear-ReLU-Linear) applied to each embedding (unimodal logits) and to their mean (fused logits). One step is
forward + Balancer.backward + Adam.step. "modfuse ops" is the time spent inside the fused ops (Op 1-6) during the
step, measured by wrapping them: the rest of a method's extra cost is the extra backward passes or forwards it
needs by definition (calibrated microbatch: R*K backwards into the head; mmpareto: M+1 backwards; utilization:
M extra forwards).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import modfuse
from bench.harness import RESULTS, environment
from modfuse.train.timing import op_timer

CASES = [  # (label, method, options, pass unimodal losses)
    ("none (fused only)", "none", {}, False),
    ("none + unimodal (control)", "none", {}, True),
    ("calibrated, per_sample", "calibrated", {"moments": "per_sample"}, True),
    ("calibrated, microbatch K=8", "calibrated", {"moments": "microbatch", "microbatches": 8}, True),
    ("ogm_ge", "ogm_ge", {}, False),
    ("greedy", "greedy", {"window_steps": 10**9}, False),
    ("mmpareto", "mmpareto", {}, True),
    ("utilization", "utilization", {}, False),
    ("mimo", "mimo", {}, True),
    ("i2m2", "i2m2", {}, False),
]


class LateFusion(nn.Module):
    def __init__(self, dims, hidden, classes=10):
        super().__init__()
        self.enc = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
                for m, d in dims.items()
            }
        )
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, xs):
        hs = {m: self.enc[m](xs[m]) for m in self.enc}
        return self.head(torch.stack(list(hs.values())).mean(0)), {m: self.head(h) for m, h in hs.items()}


def measure(label, method, options, unimodal, args, device):
    torch.manual_seed(0)
    dims = {"pix": 240, "zer": 47}
    net = LateFusion(dims, args.hidden).to(device)
    xs = {m: torch.randn(args.batch, d, device=device) for m, d in dims.items()}
    y = torch.randint(0, 10, (args.batch,), device=device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    with op_timer(device) as spent:
        balancer = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method, **options)

        def step():
            fused, uni = net(xs)
            kw = dict(logits=uni, fused_logits=fused, target=y, forward=lambda d: net(d)[0], inputs=xs)
            if method != "i2m2":
                kw["fused"] = F.cross_entropy(fused, y, reduction="none")
            if unimodal:
                kw["unimodal"] = {m: F.cross_entropy(v, y, reduction="none") for m, v in uni.items()}
            optimizer.zero_grad(set_to_none=True)
            balancer.backward(**kw)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(args.warmup):
            step()
        times, op_times = [], []
        for _ in range(args.repeats):
            before = spent[0]
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            op_times.append(spent[0] - before)
    # (the wrapped timing adds a perf_counter pair per op call: negligible against these steps)
    return {
        "case": label,
        "method": method,
        "options": options,
        "unimodal": unimodal,
        "step_ms": statistics.median(times) * 1e3,
        "ops_ms": statistics.median(op_times) * 1e3,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="5 repeats, hidden 256")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.hidden = 5, 256
    device = torch.device(args.device)
    env = environment()
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"step overhead | {env['device']} {env['cpu'] if device.type == 'cpu' else ''} | torch {torch.__version__} | "
        f"hidden {args.hidden}, batch {args.batch}\n",
        flush=True,
    )
    rows = [measure(*case, args, device) for case in CASES]
    base, control = rows[0]["step_ms"], rows[1]["step_ms"]
    for row in rows:
        row["vs_none"] = row["step_ms"] / base
        row["vs_control"] = row["step_ms"] / control
        row["ops_fraction"] = row["ops_ms"] / row["step_ms"]
        print(
            f"{row['case']:30s} step {row['step_ms']:8.2f} ms  x{row['vs_none']:5.2f} vs none  "
            f"x{row['vs_control']:5.2f} vs control  modfuse ops {row['ops_ms']:6.2f} ms "
            f"({100 * row['ops_fraction']:4.1f}% of the step)",
            flush=True,
        )
    write(rows, env, args)


def write(rows, env, args):
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if env["device"] == "cpu" else env["device"].replace(" ", "-").lower()
    stem = args.out / f"{env['date'][:10]}-{tag}-step-overhead{'-quick' if args.quick else ''}"
    setup = {"hidden": args.hidden, "batch": args.batch, "repeats": args.repeats}
    stem.with_suffix(".json").write_text(
        json.dumps({"environment": env, "setup": setup, "results": rows}, indent=1) + "\n"
    )
    lines = [
        f"# modfuse step overhead, {env['date']}",
        "",
        f"{env['device']} ({env['cpu']}, {env['threads']} threads), torch {env['torch']}. Late fusion of two "
        f"MLP encoders (240 and 47 inputs, hidden {args.hidden}) with a shared Linear-ReLU-Linear head, batch "
        f"{args.batch}, Adam. Median of {args.repeats} steps. 'control' = fused + unimodal losses, plain "
        "gradients.",
        "",
        "| method | step ms | vs none | vs control | modfuse ops ms | ops share of step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['step_ms']:.2f} | {r['vs_none']:.2f}x | {r['vs_control']:.2f}x | "
            f"{r['ops_ms']:.2f} | {100 * r['ops_fraction']:.1f}% |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
