import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_close, gradient_samples, noncontiguous

import modfuse as mf
from modfuse import reference


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,K,D", [(2, 2, 1), (3, 5, 7), (16, 5, 4099), (2, 64, 4099), (3, 2, 1 << 20)])
def test_moments_matches_reference(M, K, D, dtype, gen, target):
    target.skip_unless("moments")
    G = gradient_samples(M, K, D, dtype, gen)
    S1, S2 = mf.moments(target(G), backend=target.backend)
    r1, r2 = reference.moments(G.double())
    assert S1.dtype == S2.dtype == acc(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(S1, r1, acc(dtype), rtol=rtol)
    assert_close(S2, r2, acc(dtype), rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_moments_noncontiguous(dtype, gen, target):
    target.skip_unless("moments")
    G = noncontiguous(gradient_samples(3, 5, 4099, dtype, gen))
    S1, S2 = mf.moments(noncontiguous(target(G)), backend=target.backend)
    r1, r2 = reference.moments(G.double())
    assert_close(S1, r1, acc(dtype), rtol=1e-5 if dtype != torch.float64 else 1e-12)
    assert_close(S2, r2, acc(dtype), rtol=1e-5 if dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_accumulate_equals_moments(dtype, bank_dtype, gen, target):
    target.skip_unless("moments_accumulate_")
    M, K, D = 3, 4, 4099
    G = gradient_samples(M, K, D, dtype, gen)
    S1 = target(torch.zeros(M, D, dtype=bank_dtype))
    S2 = target(torch.zeros(M, D, dtype=bank_dtype))
    for k in range(K):
        g = target(G[:, k])
        mf.moments_accumulate_(S1, S2, noncontiguous(g) if k % 2 else g, backend=target.backend)
    r1, r2 = reference.moments(G.double())
    rtol = 1e-12 if dtype == bank_dtype == torch.float64 else 1e-5
    assert_close(S1, r1, bank_dtype, rtol=rtol)
    assert_close(S2, r2, bank_dtype, rtol=rtol)


def test_moments_then_aggregate_equals_samples_form(gen):
    G = gradient_samples(3, 8, 4099, torch.float64, gen)
    S1, S2 = mf.moments(G)
    out, stats = mf.calibrated_aggregate(S1, S2, [8, 8, 8])
    out_s, stats_s = mf.calibrated_aggregate_samples(G)
    torch.testing.assert_close(out, out_s, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats, stats_s, rtol=1e-9, atol=1e-9)


def test_moments_nan_policy(gen):
    G = gradient_samples(2, 3, 10, torch.float32, gen)
    G[1, 2, 4] = float("nan")
    S1, S2 = mf.moments(G)
    assert S1[1, 4].isnan() and S2[1, 4].isnan()
    assert S1.isnan().sum() == 1 and S2.isnan().sum() == 1
    with pytest.raises(ValueError, match="G has NaN or Inf values in modality 1"):
        mf.moments(G, check_finite=True)


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_accumulate_agrees_exactly_with_the_reference(dtype, bank_dtype, gen, target):
    """Issue 14 item 9: S2 += g^2 contracted into fma(g, g, S2) differed from the reference by 1 ulp; banks that
    already hold sums (not zeros) expose it."""
    target.skip_unless("moments_accumulate_")
    M, D = 3, 40_003
    S1 = torch.randn(M, D, generator=gen, dtype=torch.float64).to(bank_dtype)
    S2 = (torch.rand(M, D, generator=gen, dtype=torch.float64) * 7).to(bank_dtype)
    g = (torch.randn(M, D, generator=gen) * 1.37).to(dtype)
    S1t, S2t = target(S1.clone()), target(S2.clone())
    mf.moments_accumulate_(S1t, S2t, target(g), backend=target.backend)
    reference.moments_accumulate_(S1, S2, g)
    assert torch.equal(S1t.cpu(), S1) and torch.equal(S2t.cpu(), S2)
