"""OGM-GE's modulation of one encoder's gradients, side by side (issue 15, "OGM-GE in one pass").

    python -m bench.ogm_ge_modulation [--repeats 7] [--threads 1]

A ResNet-18-size encoder: its 60 conv and BN tensors (11.18M float32 elements) in one flat gradient bank.
Every tensor is scaled by k = 0.6 and gets N(0, std^2) noise, std = the std of its unscaled gradient + 1e-8
(docs/math.md, ogm_ge; all 60 tensors modulated in every form). Competitors, on the same bank, in one run:

- official: the official code's per-parameter loop over separate tensors,
  `g = g * k + torch.zeros_like(g).normal_(0, g.std().item() + 1e-8)`;
- old path: what methods/ogm_ge.py did before: a fresh `torch.randn(D)` for the noise, the per-tensor std from
  segment_sq_norms plus `torch.segment_reduce` over a float64 copy of the bank, then the scale and the noise
  added from that buffer (the old fused kernel read the noise from memory; this build's kernel draws it itself, so
  the apply step is the eager `mul_` + `addcmul_` with the per-element std; its parts are timed separately below);
- new: what methods/ogm_ge.py does now: Op 7 (segment_moments, float64 sums) for the std, then segment_scale_
  drawing the noise in the kernel (Philox4x32-10 + Box-Muller, four normals per call).

Ratios are competitor time / new time (above 1: the new path is faster). Medians over --repeats after a warm-up.
"""

from __future__ import annotations

import argparse

import torch

import modfuse as mf
from bench.cases import RESNET18_SIZES
from bench.harness import Timer
from modfuse.methods.ogm_ge import OGMGE

# ResNet-18's conv and BN tensors (the 60 of RESNET18_SIZES before the fc layer): 11,176,512 elements.
SIZES = RESNET18_SIZES[:60]
K = 0.6


class _Layout:  # what OGMGE._noise_std reads of a parameter layout
    def __init__(self, offsets):
        self.offsets = offsets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(sum(SIZES), generator=g) * 1e-3
    offsets = torch.tensor([0] + SIZES).cumsum(0)
    P, D = len(SIZES), bank.numel()
    lengths = offsets[1:] - offsets[:-1]
    scale = torch.full((P,), K)
    mask = torch.ones(P, dtype=torch.bool)
    timer = Timer("cpu", repeats=args.repeats, warmup=1)
    work = bank.clone()
    tensors = [t.clone() for t in bank.split(SIZES)]

    def official():
        for i, t in enumerate(tensors):
            tensors[i] = t * K + torch.zeros_like(t).normal_(0, t.std().item() + 1e-8)

    def old_std():
        sq = mf.segment_sq_norms(work, offsets).double()
        sums = torch.segment_reduce(work.double(), "sum", lengths=lengths)
        n = lengths.double()
        var = torch.clamp(sq - sums.square() / n, min=0) / torch.clamp(n - 1, min=1)
        return var.sqrt() + 1e-8

    def old_apply(noise, std):
        work.mul_(torch.repeat_interleave(scale, lengths, output_size=D))
        work.addcmul_(noise, torch.repeat_interleave(std.float(), lengths, output_size=D))

    def old():
        noise = torch.randn(D)
        old_apply(noise, old_std())

    state = {"offset": 0}

    def new():
        std = OGMGE._noise_std(work, _Layout(offsets), mask)
        mf.segment_scale_(work, offsets, scale, noise_std=std, seed=0, offset=state["offset"])
        state["offset"] += D

    rows = [
        ("official per-parameter loop", timer.ms(official)),
        ("old path (randn + float64 std + segment_reduce + apply)", timer.ms(old)),
        ("new (segment_moments + segment_scale_ drawing the noise)", timer.ms(new)),
    ]
    parts = [
        ("old: torch.randn(D)", timer.ms(lambda: torch.randn(D))),
        ("old: float64 std (segment_sq_norms + segment_reduce)", timer.ms(old_std)),
        ("new: std from segment_moments", timer.ms(lambda: OGMGE._noise_std(work, _Layout(offsets), mask))),
        (
            "new: segment_scale_ with in-kernel noise",
            timer.ms(lambda: mf.segment_scale_(work, offsets, scale, noise_std=torch.full((P,), 1e-3), seed=0)),
        ),
        ("new: segment_scale_ without noise", timer.ms(lambda: mf.segment_scale_(work, offsets, scale))),
    ]
    new_ms = rows[-1][1]
    print(f"OGM-GE modulation, {P} tensors, {D:,} float32 elements, {torch.get_num_threads()} thread(s), CPU")
    print(f"{'':60s} {'ms':>9s} {'ratio':>7s}")
    for name, ms in rows:
        print(f"{name:60s} {ms:9.1f} {ms / new_ms:7.2f}")
    print("parts:")
    for name, ms in parts:
        print(f"  {name:58s} {ms:9.1f}")


if __name__ == "__main__":
    main()
