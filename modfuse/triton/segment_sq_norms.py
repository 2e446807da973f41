"""Op 1 (docs/math.md#op-1-segment_sq_norms) in Triton: squared L2 norm of every segment of every row, one pass over x.

Segments are cut into pieces of at most PIECE elements (as the CUDA kernel does), one program per (piece, row)
sums x^2 over its piece; a second kernel adds each segment's pieces in piece order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from modfuse.triton import acc_dtype

PIECE = 16384
BLOCK = 1024


def pieces(offsets: torch.Tensor, chunk: int = PIECE) -> tuple[list[int], list[int]]:
    """Flat (begin, end) pairs of every piece and first[P + 1], the first piece of each segment (host offsets)."""
    bounds, first = [], []
    off = offsets.tolist()
    for p in range(len(off) - 1):
        first.append(len(bounds) // 2)
        for b in range(off[p], off[p + 1], chunk):
            bounds += [b, min(b + chunk, off[p + 1])]
    first.append(len(bounds) // 2)
    return bounds, first


@triton.jit
def _pieces_kernel(x_ptr, bounds_ptr, partial_ptr, D, W, BLOCK: tl.constexpr, ACC: tl.constexpr):
    w = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    begin = tl.load(bounds_ptr + 2 * w)
    end = tl.load(bounds_ptr + 2 * w + 1)
    acc = tl.zeros([BLOCK], dtype=ACC)
    row = x_ptr + r * D
    for start in range(begin, end, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        v = tl.load(row + idx, mask=idx < end, other=0.0).to(ACC)
        acc += v * v
    tl.store(partial_ptr + r * W + w, tl.sum(acc, axis=0))


@triton.jit
def _combine_kernel(partial_ptr, first_ptr, out_ptr, P, W, ACC: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    r = i // P
    p = i % P
    lo = tl.load(first_ptr + p)
    hi = tl.load(first_ptr + p + 1)
    s = tl.zeros([1], dtype=ACC)
    for w in range(lo, hi):  # piece order: deterministic
        s += tl.load(partial_ptr + r * W + w + tl.arange(0, 1))
    tl.store(out_ptr + i + tl.arange(0, 1), s)


def piece_tensors(offsets: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The piece table of host offsets as int64 tensors on `device` (made outside the op: torch.compile traces
    the op with fake tensors, whose values cannot be read)."""
    bounds, first = pieces(offsets)
    return (
        torch.tensor(bounds, dtype=torch.int64, device=device),
        torch.tensor(first, dtype=torch.int64, device=device),
    )


@triton_op("modfuse_triton::segment_sq_norms", mutates_args=())
def segment_sq_norms(x: torch.Tensor, bounds: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """x [R, D] contiguous, piece table (piece_tensors) -> out [R, P] in the accumulation dtype."""
    R, D = x.shape
    P = first.numel() - 1
    W = bounds.numel() // 2
    acc = acc_dtype(x.dtype)
    out = torch.empty(R, P, dtype=acc, device=x.device)
    partial = torch.empty(max(R * W, 1), dtype=acc, device=x.device)
    ACC = tl.float64 if acc == torch.float64 else tl.float32
    if W > 0 and R > 0:
        wrap_triton(_pieces_kernel)[(W, R)](x, bounds, partial, D, W, BLOCK=BLOCK, ACC=ACC)
    if R * P > 0:
        wrap_triton(_combine_kernel)[(R * P,)](partial, first, out, P, W, ACC=ACC)
    return out
