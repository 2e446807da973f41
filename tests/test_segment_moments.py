"""Op 7, segment_moments: per-segment sum and sum of squares in float64, against the float64 reference."""

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, noncontiguous
from test_segment_sq_norms import random_offsets

import modfuse as mf
from modfuse import reference


def assert_moments(out, x, off):
    """float64 accumulation: the sum to 1e-12 of the sum of |x| over its segment (order of addition differs), the
    sum of squares (no cancellation) to 1e-12 of itself."""
    if x.dim() == 1:
        x, out = x[None], out[None]
    expected = reference.segment_moments(x.double(), torch.as_tensor(off))
    magnitude = reference.segment_moments(x.double().abs(), torch.as_tensor(off))[..., 0]
    out = out.cpu()
    assert out.dtype == torch.float64 and out.shape == expected.shape
    assert ((out[..., 0] - expected[..., 0]).abs() <= 1e-12 * magnitude + 1e-300).all()
    torch.testing.assert_close(out[..., 1], expected[..., 1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("R,D,P", [(1, 1, 1), (2, 7, 3), (3, 4099, 5), (1, 33_000, 2), (2, 1 << 20, 62)])
def test_matches_reference(R, D, P, dtype, gen, target):
    target.skip_unless("segment_moments")
    x = (torch.randn(R, D, generator=gen) * 3 + 0.5).to(dtype)
    off = random_offsets(D, P, gen)
    out = mf.segment_moments(target(x), off, backend=target.backend)
    assert out.device == target.device
    assert_moments(out, x, off)


def test_float64_accumulation_beats_float32(gen):
    """Values whose float32 running sum loses digits: a mean of 1e4 with unit spread over 1M elements."""
    x = torch.randn(1 << 20, generator=gen) + 1e4
    out = mf.segment_moments(x, [0, 1 << 20])
    exact = x.double().sum()
    assert abs(out[0, 0].item() - exact.item()) <= 1e-12 * exact.abs().item()
    std = ((out[0, 1] - out[0, 0] ** 2 / x.numel()) / (x.numel() - 1)).sqrt()
    assert std.item() == pytest.approx(x.double().std().item(), rel=1e-6)


def test_empty_segments_and_1d_input(gen, target):
    target.skip_unless("segment_moments")
    x = torch.randn(10, generator=gen)
    out = mf.segment_moments(target(x), [0, 0, 4, 4, 10, 10], backend=target.backend).cpu()
    assert out.shape == (5, 2)
    assert (out[[0, 2, 4]] == 0).all()
    assert_moments(out, x, [0, 0, 4, 4, 10, 10])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noncontiguous(dtype, gen, target):
    target.skip_unless("segment_moments")
    x = noncontiguous(torch.randn(3, 4099, generator=gen).to(dtype))
    off = random_offsets(4099, 7, gen)
    assert_moments(mf.segment_moments(noncontiguous(target(x)), off, backend=target.backend), x, off)


def test_nan_propagates_to_its_segment_only(gen, target):
    target.skip_unless("segment_moments")
    x = torch.randn(2, 100, generator=gen)
    x[1, 42] = float("nan")
    out = mf.segment_moments(target(x), [0, 40, 60, 100], backend=target.backend).cpu()
    assert out[1, 1].isnan().all() and out[0].isfinite().all() and out[1, [0, 2]].isfinite().all()
    with pytest.raises(ValueError, match="x has NaN or Inf values in modality 1"):
        mf.segment_moments(x, [0, 40, 60, 100], check_finite=True)


def test_result_independent_of_thread_count(gen):
    x = torch.randn(2, 300_001, generator=gen)
    off = [0, 1, 250_000, 300_001]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mf.segment_moments(x, off)
        torch.set_num_threads(2)
        two = mf.segment_moments(x, off)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="x"):
        mf.segment_moments(torch.ones(4, dtype=torch.int32), [0, 4])
    with pytest.raises(ValueError, match="offsets"):
        mf.segment_moments(torch.ones(4), [0, 5])
