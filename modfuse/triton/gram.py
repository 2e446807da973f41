"""Op 5 (docs/math.md#op-5-gram) in Triton: out[R, R] = X X^T for R <= 64 rows, one pass over X.

Each program takes every PROGRAMS-th tile of BLOCK_D columns, loads all R rows of it (padded to RP >= 16, the
smallest tl.dot size), converts them to the accumulation dtype and accumulates tl.dot(x, x^T) in full precision
(no TF32). Per-program partials [programs, RP, RP] are added in program order afterwards (fixed shape:
deterministic); the result is symmetric by construction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from modfuse.triton import acc_dtype

BLOCK_D = 128
MAX_PROGRAMS = 256


@triton.jit
def _gram_kernel(X_ptr, partial_ptr, R, D, tiles, RP: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, RP)
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([RP, RP], dtype=ACC)
    for t in range(pid.to(tl.int64), tiles, programs):  # int64: tile * BLOCK_D may pass 2^31
        d = t * BLOCK_D + cols
        mask = (rows[:, None] < R) & (d[None, :] < D)
        x = tl.load(X_ptr + rows[:, None].to(tl.int64) * D + d[None, :], mask=mask, other=0.0).to(ACC)
        acc = tl.dot(x, tl.trans(x), acc, input_precision="ieee")  # acc given: result in ACC (float64 too)
    base = partial_ptr + pid.to(tl.int64) * RP * RP
    tl.store(base + rows[:, None] * RP + rows[None, :], acc)


@triton_op("modfuse_triton::gram", mutates_args=())
def gram(X: torch.Tensor) -> torch.Tensor:
    """X [R, D] contiguous (R <= 64) -> out [R, R] in X's dtype."""
    R, D = X.shape
    RP = max(16, triton.next_power_of_2(R))
    tiles = triton.cdiv(D, BLOCK_D)
    programs = max(1, min(tiles, MAX_PROGRAMS))
    acc = acc_dtype(X.dtype)
    partial = torch.empty(programs, RP, RP, dtype=acc, device=X.device)
    ACC = tl.float64 if acc == torch.float64 else tl.float32
    wrap_triton(_gram_kernel)[(programs,)](X, partial, R, D, tiles, RP=RP, BLOCK_D=BLOCK_D, ACC=ACC)
    return partial.sum(0)[:R, :R].to(X.dtype)
