import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, RTOL, assert_close, noncontiguous

import modfuse as mf
from modfuse import reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("R,D", [(1, 1), (2, 7), (3, 4099), (16, 4099), (4, 1 << 20)])
def test_matches_reference(R, D, dtype, gen, target):
    # scaled so that sums of D squares stay inside float16's range (the result is in X's dtype)
    X = (torch.randn(R, D, generator=gen) * 4 / D**0.5).to(dtype)
    out = mf.gram(target(X), backend=target.backend)
    assert out.dtype == dtype and out.shape == (R, R)
    expected = reference.gram(X.double())
    # off-diagonal entries cancel: absolute scale from the diagonal (|X_i . X_j| <= |X_i| |X_j|)
    scale = expected.diagonal().max().item()
    rtol = max(RTOL[dtype], 1e-5)
    assert_close(out, expected, dtype, scale=scale, rtol=rtol)
    assert torch.equal(out, out.T)


def test_noncontiguous(gen, target):
    X = noncontiguous(torch.randn(5, 4099, generator=gen))
    assert_close(
        mf.gram(noncontiguous(target(X)), backend=target.backend),
        reference.gram(X.double()),
        torch.float32,
        rtol=1e-5,
        scale=reference.gram(X.double()).diagonal().max().item(),
    )


def test_nan_policy(gen, target):
    X = torch.randn(3, 100, generator=gen)
    X[2, 5] = float("nan")
    X = target(X)
    out = mf.gram(X, backend=target.backend)
    assert out[2].isnan().all() and out[:, 2].isnan().all() and out[:2, :2].isfinite().all()
    with pytest.raises(ValueError, match="X has NaN or Inf values in modality 2"):
        mf.gram(X, check_finite=True)
