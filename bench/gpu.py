"""GPU benchmark of issue 4: modfuse's CUDA and Triton kernels side by side with the eager reference,
torch.compile(reference), torch._foreach_norm (Op 1) and a device-to-device copy of the same bytes, in one run.
Prints ratios and the fraction of the measured copy bandwidth; writes bench/results/<date>-<gpu>.{json,md}.

    python -m bench.gpu                 # the full table (a GPU with >= 16 GB; a few minutes)
    python -m bench.gpu --quick         # fewer sizes and repeats
    python -m bench.gpu --smoke --device cpu --out /tmp/x   # tiny shapes: checks the script itself (CI)

Bytes are what each op must read plus write (its floor); GB/s = bytes / median time; "of copy" = modfuse GB/s /
the GB/s of `dst.copy_(src)` moving the same number of bytes (half read, half written). Working sets are
>= 256 MB (well above the 50 MB L2 of an H100) except the ResNet-18 parameter set Op 1 is held to.
Times: CUDA events around each call, median over repeats, after warm-up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import modfuse
from bench import cases
from bench.harness import (
    RESULTS,
    Timer,
    compiled,
    device_name,
    element_size,
    environment,
    size,
)
from bench.harness import write as write_results
from modfuse import reference

BARS = """Bars (issue 4): Op 4 >= 85% of copy bandwidth for D >= 16M, M = 2, 3, 4, fp32 and bf16, >= 5x eager and
>= 1.5x torch.compile(reference); Op 1 at least as fast as torch._foreach_norm over the ResNet-18 set; Op 3 (T = 1)
no slower than eager (gy*gy).T @ (x*x) + gy.T @ x, and T > 1 in O(O*I) memory."""


def backends(device: torch.device) -> list[str]:
    """The modfuse backends to time on this device."""
    if device.type != "cuda":
        return ["cpu"]
    have = modfuse.available_backends()
    return [b for b in ("cuda", "triton") if b in have]


def run(rows, timer, op, shape, dtype, nbytes, ours: dict, others: dict, note: str = ""):
    """ours: 'modfuse <backend>' -> fn; others: competitor name -> fn. Records times, GB/s, ratios."""
    times = {name: timer.ms(fn) for name, fn in {**ours, **others}.items()}
    copy = timer.copy_ms(nbytes)
    best = min(ours, key=lambda k: times[k])
    row = {
        "op": op,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": nbytes,
        "ms": times,
        "copy_ms": copy,
        "copy_GBps": nbytes / copy / 1e6,
        "GBps": {k: nbytes / times[k] / 1e6 for k in ours},
        "fraction_of_copy": {k: copy / times[k] for k in ours},
        "ratio_vs_best_modfuse": {k: times[k] / times[best] for k in others},
        "best": best,
        "note": note,
    }
    rows.append(row)
    ours_txt = "  ".join(
        f"{k} {times[k]:.3f} ms {row['GBps'][k]:.0f} GB/s ({100 * row['fraction_of_copy'][k]:.0f}% of copy)"
        for k in ours
    )
    others_txt = "  ".join(f"{k} {v:.2f}x" for k, v in row["ratio_vs_best_modfuse"].items())
    print(f"{op:28s} {shape:20s} {row['dtype']:8s} {ours_txt} | {others_txt}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 repeats: checks the script runs")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per case (default 50 on a GPU; 2 on the CPU, where this run only proves "
        "that every line works at the real sizes)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (use --smoke --device cpu to check the script)")
    on_gpu = device.type == "cuda"
    default_repeats = (10 if args.quick else 50) if on_gpu else 2
    timer = Timer(device, 2 if args.smoke else (args.repeats or default_repeats), warmup=3 if on_gpu else 1)
    M_ = 1 << 20
    sizes = [1 << 12] if args.smoke else ([16 * M_] if args.quick else [16 * M_, 64 * M_])
    ours_backends = backends(device)
    print(
        f"modfuse {modfuse.__version__} | torch {torch.__version__} | {device_name(device)} | backends "
        f"{ours_backends}\nratios: competitor time / best modfuse time (higher = modfuse faster)\n",
        flush=True,
    )
    rows = []
    dev = lambda t: t.to(device)

    def ours(fn):
        return {f"modfuse {b}": (lambda b=b: fn(b)) for b in ours_backends}

    # Op 4, moments form: reads 2 M D, writes D.
    for dtype in (torch.float32, torch.bfloat16):
        for D in sizes:
            for M in (2, 3, 4):
                S1, S2, n = (dev(t) for t in cases.moment_banks(M, D, dtype))
                fast = compiled(reference.calibrated_aggregate)
                run(
                    rows,
                    timer,
                    "calibrated_aggregate",
                    f"M={M} D={size(D)}",
                    dtype,
                    (2 * M * D + D) * element_size(dtype),
                    ours(lambda b: modfuse.calibrated_aggregate(S1, S2, n, backend=b)),
                    {
                        "eager reference": lambda: reference.calibrated_aggregate(S1, S2, n),
                        "torch.compile(reference)": lambda: fast(S1, S2, n),
                    },
                )
                S1 = S2 = None  # free it before the next case

    # Op 4, samples form: reads M K D, writes D.
    for dtype in (torch.float32, torch.bfloat16):
        D, M, K = sizes[0], 3, 8
        G = dev(cases.samples(M, K, D, dtype))
        fast = compiled(reference.calibrated_aggregate_samples)
        run(
            rows,
            timer,
            "calibrated_aggregate_samples",
            f"M={M} K={K} D={size(D)}",
            dtype,
            (M * K * D + D) * element_size(dtype),
            {
                f"modfuse {b}": (lambda b=b: modfuse.calibrated_aggregate_samples(G, backend=b))
                for b in ours_backends
                if b != "triton"
            },
            {
                "eager reference": lambda: reference.calibrated_aggregate_samples(G),
                "torch.compile(reference)": lambda: fast(G),
            },
        )
        G = None  # free it before the next case

    # Op 1: the ResNet-18 parameter set (per-segment results) vs torch._foreach_norm over its tensors; and a
    # large two-row bank.
    for dtype in (torch.float32, torch.bfloat16):
        flat, offsets, tensors = cases.resnet18_like(dtype)
        flat, tensors = dev(flat), [dev(t) for t in tensors]
        fast = compiled(reference.segment_sq_norms)
        off_dev = dev(offsets)
        run(
            rows,
            timer,
            "segment_sq_norms",
            "resnet18 62 seg 11.7M",
            dtype,
            flat.numel() * element_size(dtype),
            ours(lambda b: modfuse.segment_sq_norms(flat, offsets, backend=b)),
            {
                "torch._foreach_norm": lambda: torch._foreach_norm(tensors),
                "eager reference": lambda: reference.segment_sq_norms(flat[None], off_dev),
                "torch.compile(reference)": lambda: fast(flat[None], off_dev),
            },
        )
        flat = tensors = None  # free it before the next case
    D = sizes[-1]
    x = dev(torch.randn(2, D))
    offsets = torch.tensor([0, D // 3, D // 3 + 7, D])
    fast = compiled(reference.segment_sq_norms)
    run(
        rows,
        timer,
        "segment_sq_norms",
        f"R=2 D={size(D)} 3 seg",
        torch.float32,
        x.numel() * 4,
        ours(lambda b: modfuse.segment_sq_norms(x, offsets, backend=b)),
        {
            "torch._foreach_norm": lambda: torch._foreach_norm(list(x.split([D // 3, 7, D - D // 3 - 7], 1))),
            "eager reference": lambda: reference.segment_sq_norms(x, dev(offsets)),
            "torch.compile(reference)": lambda: fast(x, dev(offsets)),
        },
    )
    x = None  # free it before the next case

    # Op 3, T = 1: one GEMM pass for S1 and S2 vs the two eager GEMMs.
    N, I, O = (64, 32, 32) if args.smoke else (8192, 4096, 4096)
    x, gy = dev(torch.randn(N, I)), dev(torch.randn(N, O))
    run(
        rows,
        timer,
        "linear_moments",
        f"T=1 N={N} I={I} O={O}",
        torch.float32,
        (N * I + N * O + 2 * O * I) * 4,
        {f"modfuse {b}": (lambda b=b: modfuse.linear_moments(x, gy, backend=b)) for b in ours_backends},
        {"eager gy.T@x + (gy*gy).T@(x*x)": lambda: (gy.T @ x, (gy * gy).T @ (x * x))},
        note="ratios > 1: modfuse faster; the fp32 GEMMs here run without TF32 on both sides",
    )
    # Op 3, T > 1: time, and peak memory against the per-sample route that materialises W_n.
    N, T, I, O = (4, 8, 16, 16) if args.smoke else (64, 128, 1024, 1024)
    x, gy = dev(torch.randn(N, T, I)), dev(torch.randn(N, T, O))

    def per_sample_route():
        W = torch.einsum("nto,nti->noi", gy, x)
        return W.sum(0), W.square().sum(0)

    run(
        rows,
        timer,
        "linear_moments",
        f"T={T} N={N} I={I} O={O}",
        torch.float32,
        (N * T * (I + O) + 2 * O * I) * 4,
        {f"modfuse {b}": (lambda b=b: modfuse.linear_moments(x, gy, backend=b)) for b in ours_backends},
        {"per-sample einsum route": per_sample_route},
    )
    if device.type == "cuda":
        peaks = {}
        for name, fn in [
            *((f"modfuse {b}", lambda b=b: modfuse.linear_moments(x, gy, backend=b)) for b in ours_backends),
            ("per-sample einsum route", per_sample_route),
        ]:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows[-1]["peak_extra_MiB"] = peaks
        print("  peak extra memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    x = gy = None  # free it before the next case

    # Ops 5, 6, 2 at the largest size, M = 3 (gram R = 4).
    D = sizes[-1]
    X = dev(torch.randn(4, D))
    fast = compiled(reference.gram)
    run(
        rows,
        timer,
        "gram",
        f"R=4 D={size(D)}",
        torch.float32,
        X.numel() * 4,
        ours(lambda b: modfuse.gram(X, backend=b)),
        {"eager reference": lambda: reference.gram(X), "torch.compile(reference)": lambda: fast(X)},
    )
    X3, w = X[:3].contiguous(), dev(torch.tensor([0.5, 1.0, 2.0]))
    X = None  # free it before the next case
    fast = compiled(reference.weighted_sum)
    cuda_only = [b for b in ours_backends if b != "triton"]  # Triton has no weighted_sum or moments
    run(
        rows,
        timer,
        "weighted_sum",
        f"R=3 D={size(D)}",
        torch.float32,
        4 * D * 4,
        {f"modfuse {b}": (lambda b=b: modfuse.weighted_sum(X3, w, backend=b)) for b in cuda_only},
        {"eager reference": lambda: reference.weighted_sum(X3, w), "torch.compile(reference)": lambda: fast(X3, w)},
    )
    G = dev(cases.samples(3, 4, sizes[0]))
    fast = compiled(reference.moments)
    run(
        rows,
        timer,
        "moments",
        f"M=3 K=4 D={size(sizes[0])}",
        torch.float32,
        (3 * 4 + 6) * sizes[0] * 4,
        {f"modfuse {b}": (lambda b=b: modfuse.moments(G, backend=b)) for b in cuda_only},
        {"eager reference": lambda: reference.moments(G), "torch.compile(reference)": lambda: fast(G)},
    )
    return write_table(rows, args, device)


def write_table(rows, args, device):
    env = environment(device)
    lines = [
        f"# modfuse GPU benchmark, {env['date']}",
        "",
        f"{env['device']}, driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, triton "
        f"{env['triton']}. Median ms over CUDA events; GB/s and % of a device-to-device copy of the same "
        "bytes; competitors as time / best modfuse time.",
        "",
        BARS,
        "",
        "| op | shape | dtype | modfuse (ms, GB/s, % of copy) | copy GB/s | competitors (x slower than modfuse) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = "<br>".join(
            f"{k}: {r['ms'][k]:.3f} ms, {r['GBps'][k]:.0f} GB/s, {100 * r['fraction_of_copy'][k]:.0f}%"
            for k in r["GBps"]
        )
        others = "<br>".join(f"{k}: {r['ms'][k]:.3f} ms ({v:.2f}x)" for k, v in r["ratio_vs_best_modfuse"].items())
        if "peak_extra_MiB" in r:
            others += "<br>peak MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in r["peak_extra_MiB"].items())
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {ours} | {r['copy_GBps']:.0f} | {others} |")
    return write_results(args.out, env, rows, lines, "-smoke" if args.smoke else "-quick" if args.quick else "")


if __name__ == "__main__":
    main()
