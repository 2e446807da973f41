import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_close, noncontiguous

import modfuse as mf
from modfuse import reference


def random_offsets(D, P, gen):
    """P segments over [0, D], including empty ones and one as long as the rest together."""
    cuts = torch.randint(0, D + 1, (P - 1,), generator=gen).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([D])])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("R,D,P", [(1, 1, 1), (2, 7, 3), (3, 4099, 5), (16, 4099, 9), (2, 1 << 20, 62)])
def test_matches_reference(R, D, P, dtype, gen, target):
    x = torch.randn(R, D, generator=gen).to(dtype)
    off = random_offsets(D, P, gen)
    out = mf.segment_sq_norms(target(x), off, backend=target.backend)
    assert out.device == target.device
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (R, P)
    # accumulation is float32 (float64): compare with that precision, not the input's
    assert_close(
        out,
        reference.segment_sq_norms(x.double(), off),
        torch.float64 if dtype == torch.float64 else torch.float32,
        rtol=1e-10 if dtype == torch.float64 else 1e-5,
    )


def test_empty_segments_give_zero_and_1d_input(gen, target):
    x = torch.randn(10, generator=gen)
    out = mf.segment_sq_norms(target(x), [0, 0, 4, 4, 10, 10], backend=target.backend).cpu()
    assert out.shape == (5,)
    assert out[0] == 0 and out[2] == 0 and out[4] == 0
    assert_close(
        out[[1, 3]], torch.stack([x[:4].double().square().sum(), x[4:].double().square().sum()]), torch.float32
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noncontiguous(dtype, gen, target):
    x = noncontiguous(torch.randn(3, 4099, generator=gen).to(dtype))
    off = random_offsets(4099, 7, gen)
    assert_close(
        mf.segment_sq_norms(noncontiguous(target(x)), off, backend=target.backend),
        reference.segment_sq_norms(x.double(), off),
        torch.float64 if dtype == torch.float64 else torch.float32,
        rtol=1e-5 if dtype != torch.float64 else 1e-10,
    )


def test_resnet18_like_matches_foreach_norm(gen, target):
    """62 segments, 11.7M elements: the same numbers torch._foreach_norm gives, squared."""
    sizes = [9408, 64, 64] + [36864, 64, 64] * 4 + [73728, 128, 128, 147456, 128, 128, 8192, 128, 128]
    sizes += [147456, 128, 128] * 2 + [294912, 256, 256, 589824, 256, 256, 32768, 256, 256]
    sizes += [589824, 256, 256] * 2 + [1179648, 512, 512, 2359296, 512, 512, 131072, 512, 512]
    sizes += [2359296, 512, 512] * 2
    sizes = sizes[:61] + [11_700_000 - sum(sizes[:61])]
    x = torch.randn(sum(sizes), generator=gen)
    off = torch.tensor([0] + sizes).cumsum(0)
    expected = torch.stack(torch._foreach_norm([t.double() for t in x.split(sizes)])).square()
    assert_close(mf.segment_sq_norms(target(x), off, backend=target.backend), expected, torch.float32, rtol=1e-5)


def test_nan_propagates_to_its_segment_only(gen, target):
    x = torch.randn(2, 100, generator=gen)
    x[1, 42] = float("nan")
    x = target(x)
    out = mf.segment_sq_norms(x, [0, 40, 60, 100], backend=target.backend)
    assert out[1, 1].isnan() and out[0].isfinite().all() and out[1, [0, 2]].isfinite().all()
    with pytest.raises(ValueError, match="x has NaN or Inf values in modality 1"):
        mf.segment_sq_norms(x, [0, 40, 60, 100], check_finite=True)


def test_result_independent_of_thread_count(gen):
    x = torch.randn(2, 300_001, generator=gen)
    off = [0, 1, 250_000, 300_001]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mf.segment_sq_norms(x, off)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, mf.segment_sq_norms(x, off))
