import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_close

import modfuse as mf
from modfuse import reference


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "D,offsets", [(1, [0, 1]), (7, [0, 0, 3, 7]), (4099, [0, 1000, 1000, 4099]), (1 << 20, [0, 5, 70_000, 1 << 20])]
)
def test_scale_matches_reference(D, offsets, dtype, gen, target):
    target.skip_unless("segment_scale_")
    x = torch.randn(D, generator=gen).to(dtype)
    scale = torch.rand(len(offsets) - 1, generator=gen) + 0.25
    expected = reference.segment_scale_(x.double().clone(), torch.tensor(offsets), scale.double())
    y = target(x.clone())
    assert mf.segment_scale_(y, offsets, target(scale), backend=target.backend) is y
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noise_matches_reference_draw(dtype, target):
    target.skip_unless("segment_scale_")
    D, offsets = 4099, [0, 100, 100, 4099]
    x = target(torch.randn(D, generator=torch.Generator().manual_seed(1)).to(dtype))
    scale, std = [0.5, 1.0, 2.0], [0.1, 3.0, 0.01]
    y = mf.segment_scale_(
        x.clone(),
        offsets,
        scale,
        noise_std=std,
        generator=torch.Generator(x.device).manual_seed(7),
        backend=target.backend,
    )
    z = mf.segment_scale_(
        x.clone(),
        offsets,
        scale,
        noise_std=std,
        generator=torch.Generator(x.device).manual_seed(7),
        backend="reference",
    )
    y, z, x = y.cpu(), z.cpu(), x.cpu()
    assert torch.equal(y, z) if dtype != torch.float16 else torch.allclose(y, z, rtol=1e-3, atol=1e-3)
    noise = y.double() - x.double() * torch.tensor([0.5] * 100 + [2.0] * 3999, dtype=torch.float64)
    assert abs(noise[100:].std().item() / 0.01 - 1) < 0.1 or dtype in (torch.float16, torch.bfloat16)
    assert abs(noise[:100].std().item() / 0.1 - 1) < 0.3


def test_noise_statistics_and_reproducibility():
    x = torch.zeros(200_000)
    y = mf.segment_scale_(
        x.clone(), [0, 100_000, 200_000], [1.0, 1.0], noise_std=[0.5, 2.0], generator=torch.Generator().manual_seed(3)
    )
    assert abs(y[:100_000].std().item() - 0.5) < 0.01 and abs(y[100_000:].std().item() - 2.0) < 0.04
    assert abs(y.mean().item()) < 0.02
    again = mf.segment_scale_(
        x.clone(), [0, 100_000, 200_000], [1.0, 1.0], noise_std=[0.5, 2.0], generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(y, again)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noise_with_scales_that_are_not_powers_of_two_agrees_exactly(dtype, gen, target):
    """Issue 14 item 9: with a power-of-two scale x * s is exact and an FMA cannot show; with 0.3 or 1.7 a
    contracted x * s + noise * std differed from the reference by 1 ulp in ~30% of elements."""
    target.skip_unless("segment_scale_")
    D, offsets = 40_000, [0, 7, 7, 33_333, 40_000]
    x = target((torch.randn(D, generator=gen) * 3).to(dtype))
    scale, std = [0.3, 1.7, 2.9, 0.123], [0.1, 3.3, 0.07, 1.1]
    y = mf.segment_scale_(
        x.clone(),
        offsets,
        scale,
        noise_std=std,
        generator=torch.Generator(x.device).manual_seed(11),
        backend=target.backend,
    )
    z = mf.segment_scale_(
        x.clone(),
        offsets,
        scale,
        noise_std=std,
        generator=torch.Generator(x.device).manual_seed(11),
        backend="reference",
    )
    assert torch.equal(y, z)
    y = mf.segment_scale_(x.clone(), offsets, scale, backend=target.backend)
    assert torch.equal(y, mf.segment_scale_(x.clone(), offsets, scale, backend="reference"))


# The counter-based noise stream (docs/math.md, Op 6) ---------------------------------------------------------------
KAT = [  # Random123's kat_vectors, philox4x32 R = 10: counter (4 words), key (2 words) -> output (4 words)
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]


def test_reference_philox_matches_the_published_known_answers():
    out = reference.philox4x32_10([c for c, _, _ in KAT], [k for _, k, _ in KAT])
    assert out.tolist() == [e for _, _, e in KAT]


def exact_box_muller(D, seed, offset, wide):
    """Box-Muller from the same Philox words with numpy's float64 log/cos/sin/sqrt: the stream's ideal values
    (element d: c = offset + d, call c // 4, lane c % 4 of [r01 cos, r01 sin, r23 cos, r23 sin])."""
    import numpy as np

    c = np.arange(D, dtype=np.uint64) + np.uint64(offset)  # wraps mod 2^64
    g, lane = c >> np.uint64(2), (c & np.uint64(3)).astype(np.int64)
    zero = np.zeros_like(g)
    w = reference.philox4x32_10(
        np.stack([g & np.uint64(0xFFFFFFFF), g >> np.uint64(32), zero, zero], 1),
        np.broadcast_to(np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64), (D, 2)),
    ).astype(np.uint64)
    pair = 2 * (lane // 2)  # words 0, 1 or 2, 3
    a, b = w[np.arange(D), pair], w[np.arange(D), pair + 1]
    if wide:  # a whole word per uniform
        u1, u2 = (a + np.uint64(1)).astype(np.float64) * 2.0**-32, b.astype(np.float64) * 2.0**-32
    else:  # a word's top 24 bits
        u1 = ((a >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0**-24
        u2 = (b >> np.uint64(8)).astype(np.float64) * 2.0**-24
    trig = np.where(lane % 2 == 0, np.cos(2 * np.pi * u2), np.sin(2 * np.pi * u2))
    return torch.from_numpy(np.sqrt(-2 * np.log(u1)) * trig)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_stream_series_are_accurate(dtype):
    """The kernels' own log, cos and sin series against libm: within 16 ulps of the accumulation dtype."""
    seed, offset = 0x1234_5678_9ABC_DEF0, 2**64 - 5000  # the counter wraps through 2^64 inside the range
    z = reference.normal_noise(10_000, seed, offset, dtype).double()
    exact = exact_box_muller(10_000, seed, offset, dtype == torch.float64)
    eps = torch.finfo(dtype).eps
    # measured: float32 at most 1.9 ulps (0.6M draws), float64 at most 13 (4M; the float64 "exact" side rounds
    # 2 pi u2 itself, an error that the radius multiplies)
    assert ((z - exact).abs() <= 16 * eps * exact.abs().clamp(min=1)).all()


def test_reference_stream_depends_only_on_the_counter():
    """Element d of a draw at offset o is element 0 of a draw at offset o + d, whatever o mod 4 (a range may start
    and end inside a group of four), through the wrap at 2^64."""
    for dtype in (torch.float32, torch.float64):
        for offset in (0, 1, 2, 3, 6, 2**64 - 7):
            z = reference.normal_noise(23, 5, offset, dtype)
            for a in range(23):
                assert torch.equal(z[a:], reference.normal_noise(23 - a, 5, (offset + a) % 2**64, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_draws_the_reference_stream_bit_for_bit(dtype, gen, target):
    """x = 0, scale 1, std 1: the result is the stream itself (rounded to x's dtype), at any seed and offset."""
    target.skip_unless("segment_scale_")
    D, offsets = 70_001, [0, 3, 3, 40_000, 70_001]
    for seed, offset in [(0, 0), (7, 123_456_789), (2**64 - 1, 2**64 - 10)]:
        x = target(torch.zeros(D, dtype=dtype))
        mf.segment_scale_(x, offsets, [1.0] * 4, noise_std=[1.0] * 4, seed=seed, offset=offset, backend=target.backend)
        z = reference.normal_noise(D, seed, offset, reference.accumulation_dtype(dtype)).to(dtype)
        assert torch.equal(x.cpu(), z)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**64 - 3])
@pytest.mark.parametrize(
    "offsets",
    [[0, 1], [0, 2], [0, 3], [0, 5], [0, 1, 2, 3, 4, 5, 9], [0, 6, 7, 7, 38, 71], [0, 33, 40_000, 40_003, 65_539]],
    ids=lambda o: f"D{o[-1]}-P{len(o) - 1}",
)
def test_kernel_groups_of_four_cut_anywhere(dtype, offset, offsets, gen, target):
    """Four counters share one Philox call: segments, blocks and ranges that start or end inside a group (offsets
    not a multiple of 4, size 1, odd sizes, tiny and empty segments) still draw exactly the reference's elements,
    with a scale and std per segment."""
    target.skip_unless("segment_scale_")
    P, D = len(offsets) - 1, offsets[-1]
    x = target((torch.randn(D, generator=gen) * 2).to(dtype))
    scale = (torch.rand(P, generator=gen, dtype=torch.float64) + 0.25).tolist()
    std = (torch.rand(P, generator=gen, dtype=torch.float64) * 3).tolist()
    kw = dict(noise_std=std, seed=0xDEADBEEF12345, offset=offset)
    y = mf.segment_scale_(x.clone(), offsets, scale, backend=target.backend, **kw)
    z = mf.segment_scale_(x.clone(), offsets, scale, backend="reference", **kw)
    assert torch.equal(y.cpu(), z.cpu())
    # poisoned: a segment with std 0 is scaled only, its neighbours' noise unchanged
    std0 = [0.0] + std[1:]
    y0 = mf.segment_scale_(
        x.clone(), offsets, scale, noise_std=std0, seed=kw["seed"], offset=offset, backend=target.backend
    )
    e = offsets[1]
    assert torch.equal(y0[e:].cpu(), y[e:].cpu())
    assert torch.equal(y0[:e].cpu(), mf.segment_scale_(x[:e].clone(), [0, e], scale[:1], backend="reference").cpu())


def test_a_shard_draws_exactly_its_own_elements(gen, target):
    """FSDP2: the slice [a, b) of a buffer with offset + a gets the whole buffer's noise for those elements."""
    target.skip_unless("segment_scale_")
    D, seed, offset = 50_000, 99, 1_000
    x = target(torch.randn(D, generator=gen))
    whole = mf.segment_scale_(x.clone(), [0, D], [0.7], noise_std=[0.3], seed=seed, offset=offset)
    for a, b in [(0, 1), (17, 4099), (33_333, 50_000)]:
        part = mf.segment_scale_(x[a:b].clone(), [0, b - a], [0.7], noise_std=[0.3], seed=seed, offset=offset + a)
        assert torch.equal(part, whole[a:b])


def test_stream_statistics():
    """1e6 draws per dtype: mean 0, variance 1, kurtosis 3, no correlation between neighbouring counters (in and
    across groups of four), none between the cos and sin lanes of a Box-Muller pair (nor between their squares:
    the two are independent normals, not just uncorrelated) or between the two pairs of a call, and different
    seeds give uncorrelated streams."""

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    for acc in (torch.float32, torch.float64):
        x = torch.zeros(1_000_000, dtype=acc)
        z = mf.segment_scale_(x, [0, x.numel()], [1.0], noise_std=[1.0], seed=2026, offset=0).double()
        n = z.numel()
        assert abs(z.mean().item()) < 5 / n**0.5
        assert abs(z.var().item() - 1) < 5 * (2 / n) ** 0.5
        assert abs((z**4).mean().item() - 3) < 5 * (96 / n) ** 0.5
        for lag in (1, 2, 3, 4, 5):
            assert abs(corr(z[:-lag], z[lag:])) < 5 / n**0.5
        lanes = z.view(-1, 4).t()  # [cos01, sin01, cos23, sin23] of every call
        bound = 5 / (n / 4) ** 0.5
        for i, j in [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]:
            assert abs(corr(lanes[i], lanes[j])) < bound
            assert abs(corr(lanes[i] ** 2, lanes[j] ** 2)) < bound
        for lane in lanes:  # each lane on its own is standard normal
            assert abs(lane.mean().item()) < bound and abs(lane.var().item() - 1) < 5 * (2 / (n / 4)) ** 0.5
        other = torch.zeros(n, dtype=acc)
        other = mf.segment_scale_(other, [0, n], [1.0], noise_std=[1.0], seed=2027, offset=0).double()
        assert abs(corr(z, other)) < 5 / n**0.5
        # the normal CDF at a few points
        for t, p in [(-2.0, 0.02275), (-1.0, 0.15866), (0.0, 0.5), (1.0, 0.84134), (2.5, 0.99379)]:
            assert abs((z <= t).double().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_generator_draws_are_reproducible_and_advance():
    x = torch.zeros(1000)
    g = torch.Generator().manual_seed(5)
    first = mf.segment_scale_(x.clone(), [0, 1000], [1.0], noise_std=[1.0], generator=g)
    second = mf.segment_scale_(x.clone(), [0, 1000], [1.0], noise_std=[1.0], generator=g)
    assert not torch.equal(first, second)
    g.manual_seed(5)
    assert torch.equal(mf.segment_scale_(x.clone(), [0, 1000], [1.0], noise_std=[1.0], generator=g), first)
    # no noise_std: nothing drawn, the generator does not move
    state = g.get_state()
    mf.segment_scale_(x.clone(), [0, 1000], [1.0], generator=g)
    assert torch.equal(g.get_state(), state)


def test_seed_and_offset_arguments_are_checked():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="either seed= .* or generator="):
        mf.segment_scale_(x, [0, 4], [1.0], noise_std=[1.0], seed=1, generator=torch.Generator())
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an int in"):
            mf.segment_scale_(x, [0, 4], [1.0], noise_std=[1.0], seed=bad)
        with pytest.raises(ValueError, match="offset must be an int in"):
            mf.segment_scale_(x, [0, 4], [1.0], noise_std=[1.0], seed=0, offset=bad)
