"""Side-by-side benchmark tables: modfuse vs the eager reference vs torch.compile(reference) (vs
torch._foreach_norm for Op 1), in one run, with ratios. Writes bench/results/<date>-<device>.{json,md}.

    python -m bench            # the full grid of the foundation issue (a few minutes on 2 cores)
    python -m bench --quick    # D = 1M only, fewer repeats
    python -m bench --small    # only the small-size rows (1 and 2 threads side by side)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import modfuse
from bench import cases
from bench.harness import RESULTS, Timer, compiled, element_size, environment, write
from modfuse import reference

TIMER = Timer("cpu")


def run_case(rows, op, shape, dtype, nbytes, competitors, repeats, eager_repeats):
    """competitors: name -> callable; the first one is modfuse."""
    row = {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "bytes": nbytes}
    times = {}
    for name, fn in competitors.items():
        reps = eager_repeats if name == "eager reference" else repeats
        times[name] = TIMER.ms(fn, reps, warmup=1 if name == "eager reference" else 2)
    times["copy (floor)"] = TIMER.copy_ms(nbytes, repeats)
    row["ms"] = times
    ours = times["modfuse"]
    row["ratio_vs_modfuse"] = {k: v / ours for k, v in times.items() if k != "modfuse"}
    row["GBps_modfuse"] = nbytes / ours / 1e6
    rows.append(row)
    ratios = "  ".join(f"{k} {v:7.2f}x" for k, v in row["ratio_vs_modfuse"].items())
    print(
        f"{op:30s} {shape:22s} {row['dtype']:9s} modfuse {ours:8.2f} ms {row['GBps_modfuse']:6.1f} GB/s | {ratios}",
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="D = 1M only and fewer repeats")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the .json and .md results go")
    parser.add_argument("--small", action="store_true", help="only the small-size rows")
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else args.repeats
    eager_repeats = 3
    sizes = [1 << 20] if args.quick else [1 << 20, 4 << 20, 16 << 20]
    rows = []
    torch.manual_seed(0)
    print(
        f"modfuse {modfuse.__version__} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"{environment()['cpu']}\nratios: competitor time / modfuse time (higher = modfuse faster)\n",
        flush=True,
    )
    small_cases(rows)
    if args.small:
        return write_results(rows, args.out, quick=True)

    # Op 4, moments form: reads 2*M*D, writes D.
    for dtype in (torch.float32, torch.bfloat16):
        for D in sizes:
            for M in (2, 3, 4):
                S1, S2, n = cases.moment_banks(M, D, dtype)
                ref = reference.calibrated_aggregate
                fast = compiled(ref)
                run_case(
                    rows,
                    "calibrated_aggregate",
                    f"M={M} D={D >> 20}M",
                    dtype,
                    (2 * M * D + D) * element_size(dtype),
                    {
                        "modfuse": lambda: modfuse.calibrated_aggregate(S1, S2, n),
                        "eager reference": lambda: ref(S1, S2, n),
                        "torch.compile(reference)": lambda: fast(S1, S2, n),
                    },
                    repeats,
                    eager_repeats,
                )
                S1 = S2 = None  # free it before the next case

    # Op 4, samples form: reads M*K*D, writes D.
    for dtype in (torch.float32, torch.bfloat16):
        for D in sizes[:2]:
            M, K = 3, 8
            G = cases.samples(M, K, D, dtype)
            ref = reference.calibrated_aggregate_samples
            fast = compiled(ref)
            run_case(
                rows,
                "calibrated_aggregate_samples",
                f"M={M} K={K} D={D >> 20}M",
                dtype,
                (M * K * D + D) * element_size(dtype),
                {
                    "modfuse": lambda: modfuse.calibrated_aggregate_samples(G),
                    "eager reference": lambda: ref(G),
                    "torch.compile(reference)": lambda: fast(G),
                },
                repeats,
                eager_repeats,
            )
            G = None  # free it before the next case

    # Op 1 over a ResNet-18-like parameter set: per-segment results vs torch._foreach_norm over the tensors.
    for dtype in (torch.float32, torch.bfloat16):
        flat, offsets, tensors = cases.resnet18_like(dtype)
        x = flat[None]
        ref = reference.segment_sq_norms
        fast = compiled(ref)
        run_case(
            rows,
            "segment_sq_norms",
            "resnet18 62 seg 11.7M",
            dtype,
            flat.numel() * element_size(dtype),
            {
                "modfuse": lambda: modfuse.segment_sq_norms(flat, offsets),
                "torch._foreach_norm": lambda: torch._foreach_norm(tensors),
                "eager reference": lambda: ref(x, offsets),
                "torch.compile(reference)": lambda: fast(x, offsets),
            },
            repeats,
            eager_repeats,
        )

    # Ops 2, 5, 6 at D = 4M (1M with --quick), M = 3, float32.
    D, M, K = sizes[min(1, len(sizes) - 1)], 3, 4
    G = cases.samples(M, K, D)
    X = G[:, 0].contiguous()
    w = torch.tensor([0.5, 1.0, 2.0])
    for op, nbytes, ours, ref in (
        ("moments", (M * K * D + 2 * M * D) * 4, lambda: modfuse.moments(G), reference.moments),
        ("gram", M * D * 4, lambda: modfuse.gram(X), reference.gram),
        ("weighted_sum", (M * D + D) * 4, lambda: modfuse.weighted_sum(X, w), reference.weighted_sum),
    ):
        args_ = (G,) if op == "moments" else (X,) if op == "gram" else (X, w)
        fast = compiled(ref)
        run_case(
            rows,
            op,
            f"M={M} D={D >> 20}M" + (f" K={K}" if op == "moments" else ""),
            torch.float32,
            nbytes,
            {
                "modfuse": ours,
                "eager reference": (lambda r=ref, a=args_: r(*a)),
                "torch.compile(reference)": (lambda f=fast, a=args_: f(*a)),
            },
            repeats,
            eager_repeats,
        )

    write_results(rows, args.out, quick=args.quick)


def small_cases(rows, repeats=301):
    """Small inputs (one small parameter, a few modalities), where thread start-up can cost more than the work:
    every op at 1 and at 2 threads, each beside the eager reference at the same thread count."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, generator=g)
    G = torch.randn(2, 5, 40, generator=g)
    S1, S2 = reference.moments(G)
    n = torch.full((2,), 5.0)
    x1 = torch.randn(300, generator=g)
    w = torch.tensor([0.5, 2.0])
    lx, lgy = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    ops = (
        (
            "segment_sq_norms",
            "R=2 D=40",
            lambda: modfuse.segment_sq_norms(x, [0, 17, 40]),
            lambda: reference.segment_sq_norms(x, torch.tensor([0, 17, 40])),
        ),
        ("moments", "M=2 K=5 D=40", lambda: modfuse.moments(G), lambda: reference.moments(G)),
        (
            "moments_accumulate_",
            "M=2 D=40",
            lambda: modfuse.moments_accumulate_(S1, S2, x),
            lambda: reference.moments_accumulate_(S1, S2, x),
        ),
        (
            "linear_moments",
            "N=8 I=16 O=4",
            lambda: modfuse.linear_moments(lx, lgy),
            lambda: reference.linear_moments(lx, lgy),
        ),
        (
            "calibrated_aggregate",
            "M=2 D=40",
            lambda: modfuse.calibrated_aggregate(S1, S2, n),
            lambda: reference.calibrated_aggregate(S1, S2, n),
        ),
        (
            "calibrated_aggregate_samples",
            "M=2 K=5 D=40",
            lambda: modfuse.calibrated_aggregate_samples(G),
            lambda: reference.calibrated_aggregate_samples(G),
        ),
        ("gram", "R=2 D=40", lambda: modfuse.gram(x), lambda: reference.gram(x)),
        ("weighted_sum", "R=2 D=40", lambda: modfuse.weighted_sum(x, w), lambda: reference.weighted_sum(x, w)),
        (
            "segment_scale_",
            "D=300 noise",
            lambda: modfuse.segment_scale_(x1, [0, 100, 300], [1.0, 1.0], noise_std=[0.01, 0.01]),
            lambda: reference.segment_scale_(
                x1, torch.tensor([0, 100, 300]), torch.tensor([1.0, 1.0]), torch.tensor([0.01, 0.01])
            ),
        ),
    )
    threads = torch.get_num_threads()
    try:
        for op, shape, ours, ref in ops:
            for t in (1, 2):
                torch.set_num_threads(t)
                run_case(
                    rows,
                    op,
                    f"{shape} {t} thr",
                    torch.float32,
                    0,
                    {"modfuse": ours, "eager reference": ref},
                    repeats,
                    repeats,
                )
    finally:
        torch.set_num_threads(threads)


def write_results(rows, out: Path, quick: bool):
    env = environment()
    names = []
    for row in rows:
        names += [k for k in row["ms"] if k not in names]
    lines = [
        f"# modfuse CPU benchmark, {env['date']}",
        "",
        f"{env['cpu']}, {env['threads']} threads, torch {env['torch']}, {env['gcc']}, "
        f"flags `{env['arch_flags']}`. Median ms; in brackets: that time / modfuse time.",
        "",
        "| op | shape | dtype | modfuse GB/s | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for row in rows:
        cells = []
        for name in names:
            if name not in row["ms"]:
                cells.append("")
            elif name == "modfuse":
                cells.append(f"{row['ms'][name]:.2f}")
            else:
                cells.append(f"{row['ms'][name]:.2f} ({row['ratio_vs_modfuse'][name]:.2f}x)")
        lines.append(
            f"| {row['op']} | {row['shape']} | {row['dtype']} | {row['GBps_modfuse']:.1f} | " + " | ".join(cells) + " |"
        )
    write(out, env, rows, lines, "-quick" if quick else "")


if __name__ == "__main__":
    main()
