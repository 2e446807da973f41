"""The Triton kernels (Ops 1, 3, 4, 5) against the reference, on the CPU under Triton's interpreter.

conftest.py sets TRITON_INTERPRET=1 when there is no GPU, before triton is imported. The interpreter runs each
program in numpy, so the shapes are small, but they still cover size 1, odd sizes, sizes that are not a multiple
of the block (and more than one block), several segments and pieces, T > 1, non-contiguous inputs and the NaN
policy. Outputs are NaN-poisoned (conftest) so an unwritten element fails. bfloat16 is left to the GPU runs of
the shared matrix (the `target` fixture): the interpreter has no bfloat16 arithmetic. On a GPU machine the same
kernels run through that matrix instead, and this file skips.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import RTOL, assert_close, gradient_samples, noncontiguous

import modfuse as mf
from modfuse import reference

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the Triton kernels run in the shared matrix"),
]
DTYPES = [torch.float32, torch.float16, torch.float64]
IDS = ["fp32", "fp16", "fp64"]


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "R,D,offsets",
    [(1, 1, [0, 1]), (2, 7, [0, 0, 3, 7]), (3, 2053, [0, 1, 1030, 1030, 2053]), (2, 40_000, [0, 5, 17_000, 40_000])],
)  # 40k: pieces of 16384
def test_segment_sq_norms(R, D, offsets, dtype, gen):
    x = torch.randn(R, D, generator=gen).to(dtype)
    out = mf.segment_sq_norms(x, offsets, backend="triton")
    assert out.dtype == acc(dtype) and out.shape == (R, len(offsets) - 1)
    expected = reference.segment_sq_norms(x.double(), torch.tensor(offsets))
    assert_close(out, expected, acc(dtype), rtol=1e-10 if dtype == torch.float64 else 1e-5)
    assert (out[:, [p for p in range(len(offsets) - 1) if offsets[p] == offsets[p + 1]]] == 0).all()


def test_segment_sq_norms_noncontiguous_and_nan(gen):
    x = noncontiguous(torch.randn(3, 1500, generator=gen))
    off = [0, 700, 1500]
    assert_close(
        mf.segment_sq_norms(x, off, backend="triton"),
        reference.segment_sq_norms(x.double(), torch.tensor(off)),
        torch.float32,
        rtol=1e-5,
    )
    x = x.contiguous()
    x[2, 800] = float("nan")
    out = mf.segment_sq_norms(x, off, backend="triton")
    assert out[2, 1].isnan() and out[2, 0].isfinite() and out[:2].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("M,D", [(1, 1), (2, 7), (3, 1025), (16, 300), (2, 3000)])  # blocks of 1024
def test_calibrated_aggregate(M, D, dtype, gen):
    K = 5
    S1, S2 = reference.moments(gradient_samples(M, K, D, torch.float64, gen))
    S1, S2 = S1.to(dtype), S2.to(dtype)
    n = torch.tensor([float(K + m % 3) for m in range(M)])
    out, stats, u = mf.calibrated_aggregate(S1, S2, n, kappa=0.7, return_uncertainty=True, backend="triton")
    r_out, r_stats, r_u = reference.calibrated_aggregate(
        S1.double(), S2.double(), n, kappa=0.7, return_uncertainty=True
    )
    assert out.dtype == u.dtype == dtype and stats.dtype == acc(dtype)
    assert_close(out, r_out, dtype)
    assert_close(u, r_u, dtype, scale=1.0)
    stat_rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for j in range(2):
        assert_close(stats[:, j], r_stats[:, j], dtype, rtol=stat_rtol)
    torch.testing.assert_close(stats[:, 2:].double(), r_stats[:, 2:], rtol=0, atol=stat_rtol + 2.0 / D)


def test_calibrated_aggregate_noncontiguous_nan_and_repeats(gen):
    S1, S2 = reference.moments(gradient_samples(3, 5, 1500, torch.float64, gen))
    S1, S2 = S1.float(), S2.float()
    first = mf.calibrated_aggregate(noncontiguous(S1), noncontiguous(S2), [5] * 3, backend="triton")
    again = mf.calibrated_aggregate(S1, S2, [5] * 3, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # deterministic, layout-independent
    assert_close(first[0], reference.calibrated_aggregate(S1.double(), S2.double(), [5] * 3)[0], torch.float32)
    S1[1, 1200] = float("nan")
    out, stats = mf.calibrated_aggregate(S1, S2, [5] * 3, backend="triton")
    assert out[1200].isnan() and out[torch.arange(1500) != 1200].isfinite().all()
    assert stats[1, 0].isnan() and stats[[0, 2]].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("M,D", [(1, 1), (2, 7), (3, 1025), (2, 3000)])
def test_calibrated_aggregate_out(M, D, dtype, gen):
    """out=: every element of a NaN-poisoned buffer written, the same bits as the allocating form."""
    S1, S2 = reference.moments(gradient_samples(M, 5, D, torch.float64, gen))
    S1, S2 = noncontiguous(S1.to(dtype)), S2.to(dtype)
    out = torch.full((D,), float("nan"), dtype=dtype)
    got, stats, u = mf.calibrated_aggregate(S1, S2, [5] * M, return_uncertainty=True, out=out, backend="triton")
    want = mf.calibrated_aggregate(S1, S2, [5] * M, return_uncertainty=True, backend="triton")
    assert got is out
    for a, b in zip((out, stats, u), want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("R,D", [(1, 1), (2, 7), (3, 300), (17, 129)])  # tiles of 128 columns, rows padded to 16+
def test_gram(R, D, dtype, gen):
    X = (torch.randn(R, D, generator=gen) * 4 / D**0.5).to(dtype)
    out = mf.gram(X, backend="triton")
    expected = reference.gram(X.double())
    assert out.dtype == dtype and torch.equal(out, out.T)
    assert_close(out, expected, dtype, scale=expected.diagonal().max().item(), rtol=max(RTOL[dtype], 1e-5))


def test_gram_noncontiguous_and_nan(gen):
    X = noncontiguous(torch.randn(4, 300, generator=gen))
    expected = reference.gram(X.double())
    assert_close(
        mf.gram(X, backend="triton"), expected, torch.float32, rtol=1e-5, scale=expected.diagonal().max().item()
    )
    X = X.contiguous()
    X[2, 5] = float("nan")
    out = mf.gram(X, backend="triton")
    assert out[2].isnan().all() and out[:, 2].isnan().all() and out[[0, 1, 3]][:, [0, 1, 3]].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "shape", [(1, None, 1, 1), (9, None, 7, 5), (40, None, 33, 35), (6, 4, 7, 5), (3, 17, 33, 2)]
)  # (N, T, I, O): odd sizes, > one 32-tile, T > 1 past BLOCK_T
def test_linear_moments(shape, dtype, gen):
    N, T, I, O = shape
    lead = (N,) if T is None else (N, T)
    x = torch.randn(*lead, I, generator=gen).to(dtype)
    gy = torch.randn(*lead, O, generator=gen).to(dtype)
    got = mf.linear_moments(x, gy, bias=True, backend="triton")
    want = reference.linear_moments(x.double(), gy.double())
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        assert g.dtype == acc(dtype)
        assert_close(g, w, acc(dtype), rtol=rtol)


@pytest.mark.parametrize("shape", [(9, None, 7, 5), (40, None, 33, 35), (3, 17, 33, 2)])
def test_linear_moments_with_s1(shape, gen):
    """s1 given: the kernels skip S1's product and store; S1 is s1 in the accumulation dtype, the rest unchanged."""
    N, T, I, O = shape
    lead = (N,) if T is None else (N, T)
    x, gy = torch.randn(*lead, I, generator=gen), torch.randn(*lead, O, generator=gen)
    s1 = reference.linear_moments(x.double(), gy.double())[0].half()  # any float dtype
    got = mf.linear_moments(x, gy, bias=True, s1=s1, backend="triton")
    want = reference.linear_moments(x.double(), gy.double(), s1)
    assert torch.equal(got[0], s1.float())
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, torch.float32, rtol=1e-5)


def test_linear_moments_noncontiguous_and_mixed_dtypes(gen):
    x = noncontiguous(torch.randn(6, 3, 8, generator=gen))
    gy = noncontiguous(torch.randn(6, 3, 4, generator=gen))
    r = reference.linear_moments(x.double(), gy.double())
    out = mf.linear_moments(x, gy, backend="triton")
    assert_close(out[1], r[1], torch.float32, rtol=1e-5)
    x2, gy2 = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen).half()  # autocast-style mix
    S1, S2 = mf.linear_moments(x2, gy2, backend="triton")
    assert S1.dtype == torch.float32
    assert_close(S2, reference.linear_moments(x2.double(), gy2.double())[1], torch.float32, rtol=1e-5)


def test_backend_choice():
    assert "triton" in mf.available_backends()
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="backend='triton' has no kernel for moments"):
        mf.moments(x[None], backend="triton")
    # auto never picks the interpreter for CPU tensors: the C++ kernels run them
    torch.testing.assert_close(mf.gram(x), mf.gram(x, backend="cpu"))


# The kernel also sums the unscaled g^2 for the bias moments (unused here: bias=False), which overflows to inf at
# |gy| = 1e20 as the reference's would; the interpreter runs on numpy, which warns about that product.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_linear_moments_squares_do_not_overflow(gen):
    """Issue 14 item 4 in the Triton T = 1 kernel: gy^2 and x^2 balanced per sample, as on the CPU."""
    x = torch.randn(40, 33, generator=gen) * 1e-10
    gy = torch.randn(40, 35, generator=gen) * 1e20
    x[3] *= 1e-3  # samples of different magnitudes get their own shift
    _, S2 = mf.linear_moments(x, gy, backend="triton")
    r = reference.linear_moments(x.double(), gy.double())
    assert S2.isfinite().all()
    assert_close(S2, r[1], torch.float32, rtol=1e-5)
    assert_close(mf.linear_moments(x, gy, backend="cpu")[1], S2.double(), torch.float32, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{"eps": 1e-40}, {"kappa": 1e-20}, {"kappa": 1.2e-38, "eps": 1.4e-45}])
def test_calibrated_aggregate_tiny_eps_or_kappa_on_a_zero_column(kwargs, gen):
    S1, S2 = reference.moments(gradient_samples(3, 5, 1500, torch.float64, gen))
    S1, S2 = S1.float(), S2.float()
    S1[1, 7:20] = 0
    S2[1, 7:20] = 0
    out, stats, u = mf.calibrated_aggregate(S1, S2, [5] * 3, return_uncertainty=True, backend="triton", **kwargs)
    r_out, _, r_u = reference.calibrated_aggregate(S1, S2, [5] * 3, return_uncertainty=True, **kwargs)
    assert out.isfinite().all() and u.isfinite().all() and stats.isfinite().all()
    assert_close(out, r_out, torch.float32)
    assert_close(u, r_u, torch.float32, scale=1.0)
