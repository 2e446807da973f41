"""Communication per training step of every balancing method under torch.distributed, beside DDP's plain step.
2 gloo processes on the CPU; writes bench/results/<date>-cpu-distributed.{json,md}.

    python -m bench.distributed                  # both models, every wrapper and method
    python -m bench.distributed --quick          # tiny sizes (the CI smoke test)

Models: the reference trainer's late-fusion network (modfuse.train.models.LateFusionNet, mfeat pix + zer inputs,
hidden 64, shared head) and bench.step_overhead's network with a 1024x1024 shared head (Linear-ReLU-Linear).
Wrappers: a plain process group (the Balancer reduces itself), DistributedDataParallel, FSDP2 (`fully_shard` on
each encoder, the head and the root). One step is forward + Balancer.backward + SGD.step; the baseline is DDP's
plain step (loss.backward() of the fused + unimodal losses), and each wrapper's own plain step is run too.

Counted without modfuse's internals: every collective function of torch.distributed is wrapped (calls and
tensor sizes), and DDP's reducer is routed through the default all-reduce comm hook (its buckets then pass
through the wrapped torch.distributed.all_reduce). Where the Balancer registers a comm hook of its own, that
one is kept (and counted the same way, as long as it calls torch.distributed's functions). Bytes are per rank
on the wire under ring algorithms, for a buffer of S bytes (the whole buffer, before reduce-scatter or after
all-gather) and W ranks: all-reduce 2(W-1)/W*S, reduce-scatter and all-gather (W-1)/W*S, broadcast/reduce S.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import modfuse
from bench.__main__ import RESULTS, environment
from modfuse import methods as _methods

# (label, method, options); unimodal losses are always passed (the control every comparison needs)
CASES = [
    ("none", "none", {}),
    ("calibrated, microbatch K=8", "calibrated", {"microbatches": 8}),
    ("calibrated, K=8, all_reduce banks", "calibrated", {"microbatches": 8, "collectives": "all_reduce"}),
    ("calibrated, per_sample", "calibrated", {"moments": "per_sample"}),
    ("ogm_ge", "ogm_ge", {}),
    ("greedy", "greedy", {"window_steps": 10**9}),
    ("mmpareto", "mmpareto", {}),
    ("utilization", "utilization", {}),
    ("mimo", "mimo", {}),
    ("i2m2", "i2m2", {}),
    ("calibrated, per_sample, precision", "calibrated", {"moments": "per_sample", "evidence": "precision"}),
    ("inforeg", "inforeg", {}),
    ("agm", "agm", {}),
]
WRAPPERS = ("process group", "DDP", "FSDP2")
QUICK = {"batch": 8, "steps": 1, "warmup": 2, "trainer_hidden": 8, "head_hidden": 16, "pix": 6, "zer": 5}
# collective -> how its buffer size S (the largest tensor, or list of tensors, among its arguments) goes on the
# wire per rank, as a multiple of S for W ranks
WIRE = {
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "all_reduce_coalesced": lambda w: 2 * (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w,
    "reduce_scatter_tensor": lambda w: (w - 1) / w,
    "reduce_scatter_single": lambda w: (w - 1) / w,
    "_reduce_scatter_base": lambda w: (w - 1) / w,
    "all_gather": lambda w: (w - 1) / w,
    "all_gather_into_tensor": lambda w: (w - 1) / w,
    "all_gather_single": lambda w: (w - 1) / w,
    "_all_gather_base": lambda w: (w - 1) / w,
    "all_gather_coalesced": lambda w: (w - 1) / w,
    "broadcast": lambda w: 1.0,
    "reduce": lambda w: 1.0,
    "all_to_all": lambda w: (w - 1) / w,
    "all_to_all_single": lambda w: (w - 1) / w,
    "gather": lambda w: 1.0,
    "scatter": lambda w: 1.0,
    "barrier": lambda w: 0.0,
    "all_gather_object": lambda w: 0.0,
    "broadcast_object_list": lambda w: 0.0,
}


class Counter:
    """Wraps torch.distributed's collective functions; counts calls and wire bytes while `active`."""

    def __init__(self, world: int):
        self.world, self.active, self.calls, self.bytes, self.kinds = world, False, 0, 0.0, {}
        for name in WIRE:
            if hasattr(dist, name):
                setattr(dist, name, self.wrap(name, getattr(dist, name)))

    def wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.active:
                size = max([_nbytes(a) for a in list(args) + list(kwargs.values())] + [0])
                self.calls += 1
                self.bytes += WIRE[name](self.world) * size
                self.kinds[name] = self.kinds.get(name, 0) + 1
            return fn(*args, **kwargs)

        counted.__wrapped__ = fn
        return counted

    @contextmanager
    def counting(self):
        self.calls, self.bytes, self.kinds, self.active = 0, 0.0, {}, True
        try:
            yield self
        finally:
            self.active = False


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return sum(t.numel() * t.element_size() for t in x)
    return 0


def make_model(name: str, args):
    torch.manual_seed(0)
    if name == "trainer":
        from modfuse.train.models import LateFusionNet

        return LateFusionNet({"pix": (args.pix,), "zer": (args.zer,)}, 10, hidden=args.trainer_hidden), {
            "pix": args.pix,
            "zer": args.zer,
        }
    from bench.step_overhead import LateFusion

    return LateFusion({"pix": args.pix, "zer": args.zer}, args.head_hidden), {"pix": args.pix, "zer": args.zer}


def wrap(net, wrapper: str):
    if wrapper == "DDP":
        return torch.nn.parallel.DistributedDataParallel(net)
    if wrapper == "FSDP2":
        from torch.distributed.fsdp import fully_shard

        for encoder in net.enc.values():
            fully_shard(encoder)
        fully_shard(net.head)
        return fully_shard(net)
    return net


def route_ddp_through_python(model):
    """DDP's reducer all-reduces in C++; the default comm hook does the same through torch.distributed.all_reduce
    (so the Counter sees each bucket). Returns how DDP's own traffic is counted."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return "-"
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    try:
        model.register_comm_hook(None, default_hooks.allreduce_hook)
        return "DDP buckets via the default all-reduce hook"
    except RuntimeError:  # the Balancer registered its own hook: keep it, it is counted through the wrapped functions
        return "the Balancer's comm hook"


def run_row(counter, model_name, wrapper, case, args):
    """One row: a fresh model, wrapper, optimizer and (for a method) Balancer; warm-up steps, then counted ones."""
    label, method, options = case
    net, dims = make_model(model_name, args)
    model = wrap(net, wrapper)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    xs = {m: torch.randn(args.batch, d, generator=g) for m, d in dims.items()}
    y = torch.randint(0, 10, (args.batch,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    balancer = None
    if method is not None:
        balancer = modfuse.Balancer(model, encoders=dict(net.enc), shared=net.head, method=method, **options)
    counted_as = route_ddp_through_python(model)

    def step():
        fused, uni = model(xs)
        losses = {
            "fused": F.cross_entropy(fused, y, reduction="none"),
            "unimodal": {m: F.cross_entropy(v, y, reduction="none") for m, v in uni.items()},
        }
        optimizer.zero_grad(set_to_none=True)
        if balancer is None:
            (losses["fused"].mean() + sum(v.mean() for v in losses["unimodal"].values())).backward()
        else:
            if method == "i2m2":
                losses.pop("fused")
            balancer.backward(
                **losses, logits=uni, fused_logits=fused, target=y, forward=lambda d: model(d)[0], inputs=xs
            )
        optimizer.step()

    for _ in range(args.warmup):
        step()
    per_step = []
    for _ in range(args.steps):
        with counter.counting():
            step()
        per_step.append((counter.calls, counter.bytes, dict(counter.kinds)))
    calls, nbytes, kinds = per_step[-1]
    if any(c != calls or b != nbytes for c, b, _ in per_step):  # report the mean if steps differ
        calls = statistics.mean(c for c, _, _ in per_step)
        nbytes = statistics.mean(b for _, b, _ in per_step)
    return {
        "model": model_name,
        "wrapper": wrapper,
        "case": label,
        "method": method,
        "options": options,
        "collectives": calls,
        "bytes": nbytes,
        "kinds": kinds,
        "counted": counted_as,
        "error": None,
    }


def worker(rank, world, port, args, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout))
    torch.set_num_threads(1)
    counter = Counter(world)
    rows = []
    try:
        for model_name in args.models:
            for wrapper in args.wrappers:
                for case in [("plain step (no Balancer)", None, {})] + [c for c in CASES if c[1] in args.methods]:
                    if wrapper == "process group" and case[1] is None:
                        continue  # nothing synchronises a plain step without a wrapper
                    try:
                        row = run_row(counter, model_name, wrapper, case, args)
                    except Exception as error:  # noqa: BLE001 - a row that fails is reported, not fatal
                        row = {
                            "model": model_name,
                            "wrapper": wrapper,
                            "case": case[0],
                            "method": case[1],
                            "options": case[2],
                            "collectives": None,
                            "bytes": None,
                            "kinds": {},
                            "counted": "-",
                            "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}",
                        }
                        if rank == 0 and args.verbose:
                            traceback.print_exc()
                        dist.barrier()  # both ranks failed in the same row (they run the same code); realign
                    rows.append(row)
                    if rank == 0:
                        status = row["error"] or f"{row['collectives']} collectives, {row['bytes'] / 1e6:.3f} MB"
                        print(f"{model_name:8s} {wrapper:13s} {row['case']:28s} {status}", flush=True)
        if rank == 0:
            torch.save(rows, path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ratios(rows):
    base = {r["model"]: r for r in rows if r["wrapper"] == "DDP" and r["method"] is None and not r["error"]}
    own = {(r["model"], r["wrapper"]): r for r in rows if r["method"] is None and not r["error"]}
    for r in rows:
        b, o = base.get(r["model"]), own.get((r["model"], r["wrapper"]))
        ok = r["bytes"] is not None
        r["vs_ddp_bytes"] = r["bytes"] / b["bytes"] if ok and b and b["bytes"] else None
        r["vs_ddp_collectives"] = r["collectives"] / b["collectives"] if ok and b and b["collectives"] else None
        r["vs_wrapper_bytes"] = r["bytes"] / o["bytes"] if ok and o and o["bytes"] else None
    return rows


def goals(rows):
    """The issue's goals for calibrated: <= 1.25x DDP's bytes under FSDP2, <= 1.5x under DDP, and at most 2
    collectives per step of the Balancer's own (under FSDP2: beyond FSDP2's plain step)."""
    out = []
    for r in rows:
        if r["method"] != "calibrated" or r["wrapper"] == "process group":
            continue
        limit = 1.25 if r["wrapper"] == "FSDP2" else 1.5
        if r["error"]:
            out.append((r, limit, "MISSED, not run: " + r["error"]))
            continue
        own = r["collectives"]
        if r["wrapper"] == "FSDP2":
            own -= next(
                b["collectives"]
                for b in rows
                if b["model"] == r["model"] and b["wrapper"] == "FSDP2" and b["method"] is None and not b["error"]
            )
        met = r["vs_ddp_bytes"] is not None and r["vs_ddp_bytes"] <= limit and own <= 2
        message = (
            f"{'met' if met else 'MISSED'}: {r['vs_ddp_bytes']:.2f}x DDP's bytes (goal <= {limit}x), "
            f"{own:g} collectives of the Balancer per step (goal <= 2)"
        )
        out.append((r, limit, message))
    return out


def fmt(x, pattern="{:.2f}x"):
    return "-" if x is None else pattern.format(x)


def write(rows, env, args):
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{env['date'][:10]}-cpu-distributed{'-quick' if args.quick else ''}"
    setup = {k: getattr(args, k) for k in ("batch", "steps", "warmup", "trainer_hidden", "head_hidden", "pix", "zer")}
    setup["world"] = 2
    stem.with_suffix(".json").write_text(
        json.dumps(
            {"environment": env, "setup": setup, "results": rows, "goals": [m for _, _, m in goals(rows)]}, indent=1
        )
        + "\n"
    )
    lines = [
        f"# modfuse communication per step, {env['date']}",
        "",
        (
            f"2 gloo processes on {env['cpu']}, torch {env['torch']}, modfuse at commit {env['git']}. Batch "
            f"{args.batch} per rank, float32, SGD; counts of step {args.warmup + 1}..{args.warmup + args.steps} "
            "(after warm-up). Bytes: per rank on the wire (ring model, see bench/distributed.py). Ratios: against "
            "DDP's plain step of the same model, and against the same wrapper's plain step."
        ),
        "",
    ]
    for model_name in args.models:
        lines += [
            f"## {model_name}",
            "",
            (
                "| wrapper | case | collectives/step | MB/step | vs DDP bytes | "
                "vs DDP collectives | vs wrapper's plain step | collectives by kind |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["model"] != model_name:
                continue
            if r["error"]:
                lines.append(f"| {r['wrapper']} | {r['case']} | error: {r['error']} | | | | | |")
                continue
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items()))
            lines.append(
                f"| {r['wrapper']} | {r['case']} | {r['collectives']:g} | {r['bytes'] / 1e6:.3f} | "
                f"{fmt(r['vs_ddp_bytes'])} | {fmt(r['vs_ddp_collectives'])} | {fmt(r['vs_wrapper_bytes'])} "
                f"| {kinds} |"
            )
        lines.append("")
    lines += ["## Goals (issue 11, calibrated)", ""]
    lines += [f"- {r['model']}, {r['wrapper']}, {r['case']}: {message}" for r, _, message in goals(rows)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return stem


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="trainer,head1024", help="comma-separated: trainer, head1024")
    parser.add_argument("--wrappers", default=",".join(WRAPPERS), help="comma-separated: " + ", ".join(WRAPPERS))
    parser.add_argument("--methods", default=",".join(dict.fromkeys(c[1] for c in CASES)))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--trainer-hidden", type=int, default=64)
    parser.add_argument("--head-hidden", type=int, default=1024)
    parser.add_argument("--pix", type=int, default=240)
    parser.add_argument("--zer", type=int, default=47)
    parser.add_argument("--timeout", type=float, default=60, help="process-group timeout, seconds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: batch 8, hidden 8, 1 counted step")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failing row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.models, args.wrappers, args.methods = (s.split(",") for s in (args.models, args.wrappers, args.methods))
    for name, given, known in (
        ("--models", args.models, ("trainer", "head1024")),
        ("--wrappers", args.wrappers, WRAPPERS),
        ("--methods", args.methods, _methods.names()),
    ):
        unknown = [x for x in given if x not in known]
        if unknown:
            parser.error(f"{name}: unknown {unknown[0]!r}; choose from {', '.join(known)}")
    if args.quick:
        vars(args).update(QUICK)
    env = environment()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent,
    )
    env["git"] = commit.stdout.strip() or "unknown"
    print(f"communication per step | 2 gloo processes | {env['cpu']} | torch {torch.__version__}\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.pt")
        mp.spawn(worker, args=(2, free_port(), args, path), nprocs=2, join=True)
        rows = ratios(torch.load(path))
    for r, _, message in goals(rows):
        print(f"goal | {r['model']}, {r['wrapper']}, {r['case']}: {message}")
    return write(rows, env, args)


if __name__ == "__main__":
    main()
