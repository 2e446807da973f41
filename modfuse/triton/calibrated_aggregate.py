"""Op 4 (docs/math.md), moments form, in Triton: one pass over S1[M, D] and S2[M, D].

Each program owns BLOCK elements: per modality (a compile-time loop over M) mean, variance, evidence and belief
stay in registers; it writes out[D] (and the fused uncertainty) and its row of per-program stats partials
[programs, M, 4], which are added in program order in float64 afterwards (fixed shape: deterministic). The math
is the CPU and CUDA kernels' opinion, step for step (csrc/calibrated_opinion.h).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from modfuse.triton import acc_dtype

BLOCK = 1024


@triton.jit
def _aggregate_kernel(
    S1_ptr,
    S2_ptr,
    n_ptr,
    out_ptr,
    u_ptr,
    partial_ptr,
    D,
    kappa,
    eps,
    evidence_max,
    M: tl.constexpr,
    BLOCK: tl.constexpr,
    WRITE_U: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < D
    o = tl.zeros([BLOCK], dtype=ACC)
    uu = tl.full([BLOCK], 1.0, dtype=ACC)
    for m in tl.static_range(M):
        n = tl.load(n_ptr + m).to(ACC)
        x1 = tl.load(S1_ptr + m * D + idx, mask=mask, other=0.0).to(ACC)
        x2 = tl.load(S2_ptr + m * D + idx, mask=mask, other=0.0).to(ACC)
        mu = x1 * (1.0 / n)
        ssd = x2 - x1 * mu
        ssd = tl.where(ssd < 0.0, 0.0, ssd)  # rounding; NaN fails the test and passes through
        # the opinion of csrc/calibrated_opinion.h, step for step: no intermediate overflows where the reference's
        # does not (t2 is inf only when n mu^2 is; b = 0, u = 1 at e = 0 for any kappa > 0)
        t2 = n * (mu * mu) / (ssd * (1.0 / (n - 1.0)) + eps)
        e = t2 - 1.0
        e = tl.where(e < 0.0, 0.0, e)
        e = tl.where(e > evidence_max, evidence_max, e)
        total = e + kappa
        b = e / total
        bmu = b * mu
        o += bmu
        uu *= kappa / total
        zero = tl.zeros([BLOCK], dtype=ACC)
        row = partial_ptr + (pid.to(tl.int64) * M + m) * 4
        tl.store(row + 0, tl.sum(tl.where(mask, mu * mu, zero), axis=0))
        tl.store(row + 1, tl.sum(tl.where(mask, bmu * bmu, zero), axis=0))
        tl.store(row + 2, tl.sum(tl.where(mask, b, zero), axis=0))
        tl.store(row + 3, tl.sum(tl.where(mask & (e == 0.0), zero + 1.0, zero), axis=0))
    tl.store(out_ptr + idx, o.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_U:
        tl.store(u_ptr + idx, uu.to(u_ptr.dtype.element_ty), mask=mask)


@triton_op("modfuse_triton::calibrated_aggregate", mutates_args=("out",))
def calibrated_aggregate(
    S1: torch.Tensor,
    S2: torch.Tensor,
    n: torch.Tensor,
    kappa: float,
    eps: float,
    evidence_max: float,
    return_uncertainty: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S1, S2 [M, D] contiguous, n [M] (accumulation dtype, on S1's device) -> (out [D], stats [M, 4], u [D or 0]).
    With `out` (contiguous [D], S1's dtype; checked by modfuse.ops) the result is written there and the first
    return is empty, as in the C++ op's schema (csrc/ops.cpp)."""
    M, D = S1.shape
    acc = acc_dtype(S1.dtype)
    programs = triton.cdiv(D, BLOCK)
    fresh = torch.empty(0 if out is not None else D, dtype=S1.dtype, device=S1.device)
    target = fresh if out is None else out
    u = torch.empty(D if return_uncertainty else 0, dtype=S1.dtype, device=S1.device)
    partial = torch.empty(programs, M, 4, dtype=acc, device=S1.device)
    ACC = tl.float64 if acc == torch.float64 else tl.float32
    wrap_triton(_aggregate_kernel)[(programs,)](
        S1,
        S2,
        n,
        target,
        u if return_uncertainty else target,
        partial,
        D,
        kappa,
        eps,
        evidence_max,
        M=M,
        BLOCK=BLOCK,
        WRITE_U=return_uncertainty,
        ACC=ACC,
    )
    sums = partial.to(torch.float64).sum(0)
    stats = torch.stack([sums[:, 0], sums[:, 1], sums[:, 2] / D, sums[:, 3] / D], 1).to(acc)
    return fresh, stats, u
