import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, RTOL, assert_close, noncontiguous

import modfuse as mf
from modfuse import reference


@pytest.mark.parametrize("per_element", [False, True], ids=["w[R]", "w[R,D]"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("R,D", [(1, 1), (2, 7), (3, 4099), (16, 4099), (3, 1 << 20)])
def test_matches_reference(R, D, dtype, per_element, gen, target):
    target.skip_unless("weighted_sum")
    X = torch.randn(R, D, generator=gen).to(dtype)
    w = torch.randn(R, D, generator=gen).to(dtype) if per_element else torch.randn(R, generator=gen)
    out = mf.weighted_sum(target(X), target(w), backend=target.backend)
    assert out.dtype == dtype and out.shape == (D,)
    expected = reference.weighted_sum(X.double(), w.double())
    scale = (w.double().abs().reshape(R, -1) * X.double().abs()).sum(0).max().item()
    assert_close(out, expected, dtype, scale=scale, rtol=max(RTOL[dtype], 1e-6))


def test_noncontiguous_and_weight_dtypes(gen, target):
    target.skip_unless("weighted_sum")
    X = noncontiguous(torch.randn(3, 4099, generator=gen).bfloat16())
    w = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)  # any float dtype for w[R]
    Xt = noncontiguous(target(X))
    assert_close(
        mf.weighted_sum(Xt, target(w), backend=target.backend), reference.weighted_sum(X.double(), w), torch.bfloat16
    )
    W = noncontiguous(torch.randn(3, 4099, generator=gen).bfloat16())
    assert_close(
        mf.weighted_sum(Xt, noncontiguous(target(W)), backend=target.backend),
        reference.weighted_sum(X.double(), W.double()),
        torch.bfloat16,
    )


def test_nan_policy(gen, target):
    target.skip_unless("weighted_sum")
    X = torch.randn(3, 50, generator=gen)
    X[1, 9] = float("inf")
    out = mf.weighted_sum(target(X), target(torch.ones(3)), backend=target.backend).cpu()
    assert not out[9].isfinite() and out[torch.arange(50) != 9].isfinite().all()
    with pytest.raises(ValueError, match="X has NaN or Inf values in modality 1"):
        mf.weighted_sum(X, torch.ones(3), check_finite=True)
