"""Issue 15's list and per-sample benchmarks, every competitor side by side in one run, with ratios
(peer time / modfuse time: above 1 means modfuse is faster). Writes bench/results/<date>-<device>-lists.{json,md}.

    python -m bench.lists            # both tables at 1 and 2 threads
    python -m bench.lists --quick    # fewer repeats

1. Squared norms of a list of tensors where they are (Op 1b): modfuse.tensor_sq_norms against
   torch._foreach_norm (squared), a per-tensor loop of torch.linalg.vector_norm, and the gather-first form
   torch.cat + modfuse.segment_sq_norms, on a ResNet-50-like list (161 tensors, 25.6M elements) and a
   ResNet-18-like list (62 tensors, 11.7M), float32 and bfloat16.
2. linear_moments T = 1 (Op 3) after an ordinary backward, against BackPACK's SumGradSquared (the same S2): each
   column is one forward + backward of an nn.Linear with output gradient gy, so the ordinary weight gradient
   exists in every column; "plain" computes nothing else. modfuse s1= takes S1 from that gradient (one GEMM),
   modfuse without it recomputes S1 (two GEMMs). Also the statistics' own cost (column minus plain).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import modfuse
from bench import cases
from bench.harness import RESULTS, Timer, environment, write


def resnet50_sizes() -> list[int]:
    """torchvision's ResNet-50 parameter tensors in order: 161 tensors, 25,557,032 elements."""
    sizes = [64 * 3 * 7 * 7, 64, 64]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            sizes += [width * inplanes, width, width, width * width * 9, width, width, 4 * width * width]
            sizes += [4 * width, 4 * width]
            if b == 0:
                sizes += [4 * width * inplanes, 4 * width, 4 * width]  # the downsample branch
            inplanes = 4 * width
    return sizes + [1000 * 2048, 1000]


def interleaved_ms(competitors: dict, repeats: int) -> dict:
    """Median ms of each competitor, timed in turns (one call of each per round, after a warm-up round), so that
    a change of machine load during the run hits every competitor alike (this machine's 2 cores are shared)."""
    for fn in competitors.values():
        fn()
    times: dict = {name: [] for name in competitors}
    for _ in range(repeats):
        for name, fn in competitors.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def lists_table(timer, rows, md, threads):
    g = torch.Generator().manual_seed(0)
    for name, sizes in (("ResNet-50-like", resnet50_sizes()), ("ResNet-18-like", cases.RESNET18_SIZES)):
        for dtype in (torch.float32, torch.bfloat16):
            tensors = [torch.randn(n, generator=g).to(dtype) for n in sizes]
            offsets = torch.tensor([0] + list(sizes)).cumsum(0)
            competitors = {
                "modfuse tensor_sq_norms": lambda: modfuse.tensor_sq_norms(tensors),
                "torch._foreach_norm": lambda: torch.stack(torch._foreach_norm(tensors)).float().square(),
                "per-tensor loop": lambda: torch.stack(
                    [torch.linalg.vector_norm(t, dtype=torch.float32).square() for t in tensors]
                ),
                "cat + segment_sq_norms": lambda: modfuse.segment_sq_norms(torch.cat(tensors), offsets),
            }
            want = torch.stack([t.double().square().sum() for t in tensors])
            for fn in competitors.values():  # every competitor computes the same numbers
                torch.testing.assert_close(fn().double(), want, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=0)
            ms = interleaved_ms(competitors, timer.repeats)
            ours = ms["modfuse tensor_sq_norms"]
            ratios = {k: v / ours for k, v in ms.items() if k != "modfuse tensor_sq_norms"}
            shape = f"{name} ({len(sizes)} tensors, {sum(sizes) / 1e6:.1f}M)"
            dt = str(dtype).removeprefix("torch.")
            rows.append({"table": "lists", "shape": shape, "dtype": dt, "threads": threads, "ms": ms, "ratios": ratios})
            cells = " | ".join(f"{ms[k]:.2f} ({ratios[k]:.2f}x)" for k in ratios)
            md.append(f"| {shape} | {dt} | {threads} | {ours:.2f} | {cells} |")
            print(md[-1], flush=True)


def per_sample_table(timer, rows, md, threads):
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    # BackPACK's module hooks warn that the input needs no gradient: here only the weight's is wanted
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    g = torch.Generator().manual_seed(0)
    for width in (256, 1024, 2048):
        for N in (8, 64):
            layer = extend(torch.nn.Linear(width, width, bias=False))
            x = torch.randn(N, width, generator=g)
            gy = torch.randn(N, width, generator=g)

            def backward():
                layer.weight.grad = None
                (layer(x) * gy).sum().backward()  # output gradient gy: weight.grad = gy^T x = S1

            def with_backpack():
                layer.weight.grad = None
                with backpack(SumGradSquared()):
                    (layer(x) * gy).sum().backward()
                return layer.weight.sum_grad_squared

            def with_s1():
                backward()
                return modfuse.linear_moments(x, gy, s1=layer.weight.grad)[1]

            def without_s1():
                backward()
                return modfuse.linear_moments(x, gy)[1]

            want = with_backpack().double()
            for fn in (with_s1, without_s1):
                torch.testing.assert_close(fn().double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
            ms = interleaved_ms(
                {
                    "plain backward": backward,
                    "modfuse s1=": with_s1,
                    "modfuse (S1 recomputed)": without_s1,
                    "BackPACK SumGradSquared": with_backpack,
                },
                timer.repeats,
            )
            plain = ms["plain backward"]
            own = {k: max(v - plain, 1e-6) for k, v in ms.items() if k != "plain backward"}
            ratio_total = ms["BackPACK SumGradSquared"] / ms["modfuse s1="]
            ratio_own = own["BackPACK SumGradSquared"] / own["modfuse s1="]
            ratio_s1 = own["modfuse (S1 recomputed)"] / own["modfuse s1="]
            shape = f"I = O = {width}, N = {N}"
            rows.append(
                {
                    "table": "linear_moments T=1",
                    "shape": shape,
                    "threads": threads,
                    "ms": ms,
                    "own_ms": own,
                    "backpack_over_s1_total": ratio_total,
                    "backpack_over_s1_own": ratio_own,
                    "recomputed_over_s1_own": ratio_s1,
                }
            )
            md.append(
                f"| {shape} | {threads} | {plain:.2f} | {ms['modfuse s1=']:.2f} | {ms['modfuse (S1 recomputed)']:.2f} | "
                f"{ms['BackPACK SumGradSquared']:.2f} | {ratio_total:.2f}x | {ratio_own:.2f}x | {ratio_s1:.2f}x |"
            )
            print(md[-1], flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    timer = Timer("cpu", repeats=5 if args.quick else 15)
    rows: list = []
    lists_md = [
        "## Squared norms of a list of tensors (ms, and peer / modfuse)",
        "",
        "| list | dtype | threads | modfuse tensor_sq_norms | torch._foreach_norm | per-tensor loop | "
        "cat + segment_sq_norms |",
        "|---|---|---|---|---|---|---|",
    ]
    moments_md = [
        "## linear_moments T = 1 after an ordinary backward, vs BackPACK SumGradSquared (ms per forward + backward)",
        "",
        "| shape | threads | plain backward | modfuse s1= | modfuse (S1 recomputed) | BackPACK | "
        "BackPACK / s1= (total) | BackPACK / s1= (statistics only) | recomputed / s1= (statistics only) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    previous = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(lists_md[2] if threads == args.threads[0] else "", flush=True)
            lists_table(timer, rows, lists_md, threads)
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(moments_md[2] if threads == args.threads[0] else "", flush=True)
            per_sample_table(timer, rows, moments_md, threads)
    finally:
        torch.set_num_threads(previous)
    env = environment("cpu")
    header = [f"# bench.lists on {env['cpu']} ({env['cores']} cores), torch {env['torch']}, {env['date']}", ""]
    write(RESULTS, env, rows, header + lists_md + [""] + moments_md, suffix="-lists")


if __name__ == "__main__":
    main()
