"""Op 3 (docs/math.md#op-3-linear_moments) in Triton: per-sample gradient moments of an nn.Linear weight, one GEMM pass.

Each program owns a [BLOCK_O, BLOCK_I] tile of S1 = sum_n W_n and S2 = sum_n W_n^2, W_n = sum_t gy[n, t]^T x[n, t].
- T = 1: W_n is an outer product, so S1 = gy^T x and S2 = (gy^2)^T (x^2): the program walks N in BLOCK_N steps,
  loads each x and gy tile once, and feeds both products from the same registers (two tl.dot per step). For S2,
  sample n's gy and x are first scaled by 2^s_n and 2^-s_n (exact; the CPU's balanced_squares shifts), so gy^2 and
  x^2 overflow only where the reference's W_n^2 does.
- T > 1: for every sample n the program forms its W_n tile in registers (tl.dot over T in BLOCK_T steps) and
  adds W_n and W_n^2 to its accumulators, so memory stays O(O * I): per-sample gradients are never stored.
With s1 given (the caller's weight gradient of the summed loss) the kernels neither form nor store S1 (HAS_S1: the
T = 1 kernel runs one tl.dot per step instead of two) and S1 comes back empty, as from the compiled op.
Programs of the first I-tile column also accumulate the bias moments sum_n b_n and sum_n b_n^2, b_n = sum_t gy[n, t].
Products run in the accumulation dtype (float64 when x and gy are float64, else float32) at full precision
(no TF32), because S2 squares small gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_O = 32
BLOCK_I = 32
BLOCK_N = 32
BLOCK_T = 16


@triton.jit
def _store_moments(S1_ptr, S2_ptr, B1_ptr, B2_ptr, s1, s2, b1, b2, o, i, pi, I, O, HAS_S1: tl.constexpr):
    """Write a program's [BLOCK_O, BLOCK_I] tile of S2 (and of S1 unless the caller gave it); the first I-tile
    column also writes the bias moments."""
    mask = (o[:, None] < O) & (i[None, :] < I)
    offs = o[:, None].to(tl.int64) * I + i[None, :]
    if not HAS_S1:
        tl.store(S1_ptr + offs, s1, mask=mask)
    tl.store(S2_ptr + offs, s2, mask=mask)
    if pi == 0:
        tl.store(B1_ptr + o, b1, mask=o < O)
        tl.store(B2_ptr + o, b2, mask=o < O)


@triton.jit
def _moments_t1_kernel(
    x_ptr,
    gy_ptr,
    fg_ptr,
    fx_ptr,
    S1_ptr,
    S2_ptr,
    B1_ptr,
    B2_ptr,
    N,
    I,
    O,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    HAS_S1: tl.constexpr,
):
    po = tl.program_id(0)
    pi = tl.program_id(1)
    o = po * BLOCK_O + tl.arange(0, BLOCK_O)
    i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    s1 = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    s2 = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    b1 = tl.zeros([BLOCK_O], dtype=ACC)
    b2 = tl.zeros([BLOCK_O], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        g = tl.load(gy_ptr + n[:, None] * O + o[None, :], mask=(n[:, None] < N) & (o[None, :] < O), other=0.0).to(
            ACC
        )  # [BLOCK_N, BLOCK_O]
        x = tl.load(x_ptr + n[:, None] * I + i[None, :], mask=(n[:, None] < N) & (i[None, :] < I), other=0.0).to(
            ACC
        )  # [BLOCK_N, BLOCK_I]
        fg = tl.load(fg_ptr + n, mask=n < N, other=1.0)  # [BLOCK_N] powers of two
        fx = tl.load(fx_ptr + n, mask=n < N, other=1.0)
        gb = tl.trans(g * fg[:, None])
        xb = x * fx[:, None]
        # the accumulator is passed in, so the products come out in ACC (tl.dot alone gives float32)
        if not HAS_S1:
            s1 = tl.dot(tl.trans(g), x, s1, input_precision="ieee")
        s2 = tl.dot(gb * gb, xb * xb, s2, input_precision="ieee")
        b1 += tl.sum(g, axis=0)
        b2 += tl.sum(g * g, axis=0)
    _store_moments(S1_ptr, S2_ptr, B1_ptr, B2_ptr, s1, s2, b1, b2, o, i, pi, I, O, HAS_S1)


@triton.jit
def _moments_seq_kernel(
    x_ptr,
    gy_ptr,
    S1_ptr,
    S2_ptr,
    B1_ptr,
    B2_ptr,
    N,
    T,
    I,
    O,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ACC: tl.constexpr,
    HAS_S1: tl.constexpr,
):
    po = tl.program_id(0)
    pi = tl.program_id(1)
    o = po * BLOCK_O + tl.arange(0, BLOCK_O)
    i = pi * BLOCK_I + tl.arange(0, BLOCK_I)
    s1 = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    s2 = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    b1 = tl.zeros([BLOCK_O], dtype=ACC)
    b2 = tl.zeros([BLOCK_O], dtype=ACC)
    for n in range(0, N):
        w = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)  # W_n tile, in registers only
        bn = tl.zeros([BLOCK_O], dtype=ACC)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            row = (n * T + t).to(tl.int64)
            g = tl.load(gy_ptr + row[:, None] * O + o[None, :], mask=(t[:, None] < T) & (o[None, :] < O), other=0.0).to(
                ACC
            )  # [BLOCK_T, BLOCK_O]
            x = tl.load(x_ptr + row[:, None] * I + i[None, :], mask=(t[:, None] < T) & (i[None, :] < I), other=0.0).to(
                ACC
            )  # [BLOCK_T, BLOCK_I]
            w = tl.dot(tl.trans(g), x, w, input_precision="ieee")
            bn += tl.sum(g, axis=0)
        s1 += w
        s2 += w * w
        b1 += bn
        b2 += bn * bn
    _store_moments(S1_ptr, S2_ptr, B1_ptr, B2_ptr, s1, s2, b1, b2, o, i, pi, I, O, HAS_S1)


def balancing_factors(x: torch.Tensor, gy: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample powers of two (2^s_n for gy, 2^-s_n for x) that bring max|gy_n| and max|x_n| to about
    sqrt(max|W_n|), so that their squares overflow only where W_n^2 does: csrc/cpu/linear_moments.cpp's shifts."""
    N = x.shape[0]
    if x.shape[1] == 0 or gy.shape[1] == 0:
        ones = torch.ones(N, dtype=acc, device=x.device)
        return ones, ones
    limit = 1022 if acc == torch.float64 else 126  # 2^limit stays a normal number
    eg = torch.frexp(gy.to(acc).abs().amax(1)).exponent
    ex = torch.frexp(x.to(acc).abs().amax(1)).exponent
    shift = torch.div(ex - eg, 2, rounding_mode="floor").clamp(-limit, limit).double()
    return torch.exp2(shift).to(acc), torch.exp2(-shift).to(acc)


@triton_op("modfuse_triton::linear_moments", mutates_args=())
def linear_moments(
    x: torch.Tensor, gy: torch.Tensor, s1: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, (T,) I], gy [N, (T,) O], optional s1 [O, I] -> (S1 [O, I] (empty when s1 is given), S2 [O, I],
    B1 [O], B2 [O]) in the accumulation dtype."""
    x, gy = x.contiguous(), gy.contiguous()
    acc = torch.float64 if x.dtype == gy.dtype == torch.float64 else torch.float32
    N, I, O = x.shape[0], x.shape[-1], gy.shape[-1]
    has_s1 = s1 is not None
    S1 = torch.empty(0 if has_s1 else (O, I), dtype=acc, device=x.device)
    S2 = torch.empty(O, I, dtype=acc, device=x.device)
    B1 = torch.empty(O, dtype=acc, device=x.device)
    B2 = torch.empty(O, dtype=acc, device=x.device)
    ACC = tl.float64 if acc == torch.float64 else tl.float32
    grid = (triton.cdiv(O, BLOCK_O), triton.cdiv(I, BLOCK_I))
    if x.dim() == 2:
        fg, fx = balancing_factors(x, gy, acc)
        wrap_triton(_moments_t1_kernel)[grid](
            x, gy, fg, fx, S1, S2, B1, B2, N, I, O, BLOCK_O, BLOCK_I, BLOCK_N, ACC=ACC, HAS_S1=has_s1
        )
    else:
        wrap_triton(_moments_seq_kernel)[grid](
            x, gy, S1, S2, B1, B2, N, x.shape[1], I, O, BLOCK_O, BLOCK_I, BLOCK_T, ACC=ACC, HAS_S1=has_s1
        )
    return S1, S2, B1, B2
