"""Op 4 (calibrated_aggregate) allocating its output vs writing into a reused buffer (out=) vs a plain copy of the
same bytes, side by side in one run (issue 15: at D >= 16M first-touching a fresh output was about half the time).

    python -m bench.op4_out                  # D = 1M, 4M, 16M, 64M; M = 2, 3; float32; 1 thread
    python -m bench.op4_out --sizes 1 4      # D in Mi elements

The three competitors are timed round by round (one call each per round, median over the rounds), so they see
the same machine load. "copy" moves the op's bytes (2 M D read + D written, in float32) as one copy of half of them
into a persistent buffer: the floor of a memory-bound op. Fraction of copy speed = copy ms / op ms (1 = as fast as
copying its bytes). Writes bench/results/<date>-cpu-op4-out.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import modfuse
from bench import cases
from bench.harness import RESULTS, environment, write


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run(M: int, D: int, rounds: int) -> dict:
    S1, S2, n = cases.moment_banks(M, D, torch.float32)
    nbytes = (2 * M * D + D) * 4
    src = torch.ones(nbytes // 2, dtype=torch.uint8)
    dst = torch.ones_like(src)  # persistent and touched: the copy pays no first touch
    out = torch.ones(D)
    competitors = {
        "allocating": lambda: modfuse.calibrated_aggregate(S1, S2, n),
        "out=": lambda: modfuse.calibrated_aggregate(S1, S2, n, out=out),
        "copy": lambda: dst.copy_(src),
    }
    assert torch.equal(competitors["out="]()[0], competitors["allocating"]()[0])  # the same result, bit for bit
    for fn in competitors.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in competitors}
    for _ in range(rounds):
        for name, fn in competitors.items():
            times[name].append(timed(fn))
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {
        "M": M,
        "D": D,
        "bytes": nbytes,
        "ms": ms,
        "fraction_of_copy_speed": {name: ms["copy"] / ms[name] for name in ("allocating", "out=")},
        "out_speedup": ms["allocating"] / ms["out="],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="D in Mi elements")
    parser.add_argument("--modalities", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the .json and .md results go")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"modfuse {modfuse.__version__} | torch {torch.__version__} | {args.threads} thread(s) | {env['cpu']}")
    header = (
        "| M | D | allocating ms | out= ms | copy ms | allocating / copy speed | out= / copy speed | out= speed-up |"
    )
    markdown = [
        "# Op 4: allocating vs out= vs a plain copy of the same bytes (python -m bench.op4_out)",
        "",
        f"{env['cpu']}, torch {torch.__version__}, {args.threads} thread(s), float32, median of {args.rounds} "
        "interleaved rounds. Fraction of copy speed = copy ms / op ms; speed-up = allocating ms / out= ms.",
        "",
        header,
        "|---|---|---|---|---|---|---|---|",
    ]
    print(header)
    rows = []
    for D in args.sizes:
        for M in args.modalities:
            row = run(M, D << 20, args.rounds)
            rows.append(row)
            ms, frac = row["ms"], row["fraction_of_copy_speed"]
            line = (
                f"| {M} | {D}M | {ms['allocating']:.2f} | {ms['out=']:.2f} | {ms['copy']:.2f} | "
                f"{frac['allocating']:.2f} | {frac['out=']:.2f} | {row['out_speedup']:.2f}x |"
            )
            print(line, flush=True)
            markdown.append(line)
    write(args.out, env, rows, markdown, suffix="-op4-out")


if __name__ == "__main__":
    main()
