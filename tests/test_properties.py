"""Property-based tests (hypothesis): every op against the reference over its documented input ranges.

Each example draws a dtype, a shape (sizes 0 where the op allows them, 1, odd, and past the kernels' chunk and
block sizes), a layout (contiguous or strided), a magnitude inside the documented range, and optionally one NaN
or +-Inf at a random place; the tensors themselves come from a drawn seed (fast, and shrinkable). The result must
match the float64 reference on the same input values within the dtype's tolerance, with NaN and Inf in exactly
the same places. Argument boundaries (K, R, kappa and eps around float32's range) are drawn on both sides: inside
must match, outside must raise ValueError.

Budget: the "ci" profile of conftest.py (a fixed number of derandomized examples per test);
`pytest tests/test_properties.py --hypothesis-profile=long` for a deeper, randomized run.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RTOL
from hypothesis import given
from hypothesis import strategies as st

import modfuse as mf
from modfuse import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [1, 2, 7, 33, 1023, 4099, 33_000]  # 4099: past the 2048/4096 chunks; 33_000: past the 32768 pieces
# Documented magnitudes (README, ops section): float32 accumulation keeps every sum of squares finite below
# ~1e15 per value at these sizes; float16 holds [6e-5, 65504].
EXPONENTS = {torch.float16: (-2, 2), torch.bfloat16: (-15, 15), torch.float32: (-15, 15), torch.float64: (-30, 30)}


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@st.composite
def settings_for(draw, dtypes=DTYPES):
    """dtype, seed, magnitude and the non-finite value to plant (None for none)."""
    dtype = draw(st.sampled_from(dtypes))
    lo, hi = EXPONENTS[dtype]
    scale = 10.0 ** draw(st.integers(lo, hi))
    bad = draw(st.sampled_from([None, None, None, float("nan"), float("inf"), float("-inf")]))
    return dtype, draw(st.integers(0, 2**31 - 1)), scale, bad


def randn(shape, seed, scale, dtype):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def plant(t: torch.Tensor, bad, seed: int) -> torch.Tensor:
    """Put `bad` at one position chosen by the seed (no-op for None or an empty tensor)."""
    if bad is not None and t.numel():
        t.view(-1)[seed % t.numel()] = bad
    return t


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another layout: every other element of a twice-as-wide buffer, or transposed storage."""
    if layout == "every other":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t


LAYOUTS = st.sampled_from(["contiguous", "every other", "transposed"])


def offsets_for(draw, D):
    cuts = sorted(draw(st.lists(st.integers(0, D), min_size=0, max_size=5)))
    return [0] + cuts + [D]


def check(actual, expected, dtype, *, rtol=None, scale=None):
    """Same NaN/Inf places; finite values within the dtype's tolerance of the float64 reference. The absolute
    floor is the result dtype's smallest normal number: below it values underflow (as in any float32 sum)."""
    floor = torch.finfo(actual.dtype).smallest_normal
    actual = actual.to("cpu", torch.float64)
    expected = expected.to(torch.float64)
    assert actual.shape == expected.shape
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN in other places than the reference"
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf) and torch.equal(actual[inf], expected[inf]), "Inf differs"
    finite = expected.isfinite()
    a, e = actual[finite], expected[finite]
    rtol = RTOL[dtype] if rtol is None else rtol
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=max(rtol * scale, floor))


# Op 1 -----------------------------------------------------------------------------------------------------------
@given(settings_for(), st.sampled_from([1, 2, 5]), st.sampled_from([0] + SIZES), LAYOUTS, st.data())
def test_segment_sq_norms(setting, R, D, layout, data):
    dtype, seed, scale, bad = setting
    x = plant(randn((R, D), seed, scale, dtype), bad, seed)
    off = offsets_for(data.draw, D)
    out = mf.segment_sq_norms(strided(x, layout), off)
    expected = reference.segment_sq_norms(x.double(), torch.tensor(off))
    assert out.dtype == acc(dtype)
    # a sum of squares has no cancellation: each segment is compared with its own magnitude
    for p in range(len(off) - 1):
        check(out[:, p], expected[:, p], acc(dtype), rtol=1e-12 if dtype == torch.float64 else 1e-5)


@given(settings_for(), st.lists(st.sampled_from([0] + SIZES), min_size=1, max_size=5), LAYOUTS)
def test_tensor_sq_norms(setting, sizes, layout):
    dtype, seed, scale, bad = setting
    tensors = [randn((2, n), seed + i, scale, dtype) for i, n in enumerate(sizes)]
    plant(tensors[seed % len(tensors)], bad, seed)
    out = mf.tensor_sq_norms([strided(t, layout) for t in tensors])
    expected = reference.tensor_sq_norms([t.double() for t in tensors])
    assert out.dtype == acc(dtype) and out.shape == (len(sizes),)
    for p in range(len(sizes)):
        check(out[p : p + 1], expected[p : p + 1], acc(dtype), rtol=1e-12 if dtype == torch.float64 else 1e-5)


# Op 2 -----------------------------------------------------------------------------------------------------------
@given(settings_for(), st.integers(1, 4), st.integers(1, 6), st.sampled_from([0] + SIZES), LAYOUTS)
def test_moments(setting, M, K, D, layout):
    dtype, seed, scale, bad = setting
    G = plant(randn((M, K, D), seed, scale, dtype), bad, seed)
    S1, S2 = mf.moments(strided(G, layout))
    r1, r2 = reference.moments(G.double())
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    check(S1, r1, acc(dtype), rtol=rtol, scale=r2.nan_to_num(0, 0, 0).abs().max().item() ** 0.5 * K if D else 1)
    check(S2, r2, acc(dtype), rtol=rtol)


@given(settings_for(), st.sampled_from([torch.float32, torch.float64]), st.sampled_from(SIZES), LAYOUTS)
def test_moments_accumulate_agrees_exactly(setting, bank_dtype, D, layout):
    dtype, seed, scale, bad = setting
    S1 = randn((3, D), seed + 1, scale * 3, bank_dtype)
    S2 = randn((3, D), seed + 2, scale * scale * 9, bank_dtype).abs()
    g = plant(randn((3, D), seed, scale, dtype), bad, seed)
    mine1, mine2 = S1.clone(), S2.clone()
    mf.moments_accumulate_(mine1, mine2, strided(g, layout))
    reference.moments_accumulate_(S1, S2, g)
    assert torch.equal(mine1.isnan(), S1.isnan()) and torch.equal(mine2.isnan(), S2.isnan())
    assert torch.equal(mine1.nan_to_num(), S1.nan_to_num()) and torch.equal(mine2.nan_to_num(), S2.nan_to_num())


# Op 3 -----------------------------------------------------------------------------------------------------------
@given(
    settings_for(),
    st.integers(-15, 15),
    st.sampled_from([0, 1, 2, 9, 40]),
    st.sampled_from([None, 1, 3]),
    st.sampled_from([1, 7, 33]),
    st.sampled_from([1, 5, 35]),
    LAYOUTS,
)
def test_linear_moments(setting, split, N, T, I, O, layout):
    """x and gy get magnitudes whose product (the per-sample gradient) stays inside the documented range."""
    dtype, seed, scale, bad = setting
    lo, hi = EXPONENTS[dtype]
    sx = 10.0 ** max(lo, min(hi, split))  # x and gy each inside the range (the bias moments square gy)
    sg = 10.0 ** max(lo, min(hi, round(math.log10(scale)) - split))
    lead = (N,) if T is None else (N, T)
    x = plant(randn((*lead, I), seed, sx, dtype), bad, seed)
    gy = randn((*lead, O), seed + 1, sg, dtype)
    got = mf.linear_moments(strided(x, layout), strided(gy, layout), bias=True)
    want = reference.linear_moments(x.double(), gy.double())
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        assert g.dtype == acc(dtype)
        check(g, w, acc(dtype), rtol=rtol, scale=None)


# Op 4 -----------------------------------------------------------------------------------------------------------
def samples_for(M, K, D, seed, scale, dtype, signal):
    """Per-element means (signal) plus unit noise, modality scales 10x apart: evidence from 0 to large."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(M, 1, D, generator=g, dtype=torch.float64) * signal
    spread = torch.logspace(-1, 1, M, dtype=torch.float64).reshape(M, 1, 1) if M > 1 else 1.0
    return ((mean + torch.randn(M, K, D, generator=g, dtype=torch.float64)) * spread * scale).to(dtype)


OPINION = st.fixed_dictionaries(
    {
        "kappa": st.sampled_from([1.0, 0.3, 4.0, 1e-20, 1.2e-38, 1e30]),
        "evidence_max": st.sampled_from([1e6, 5.0, float("inf")]),
        "eps_exp": st.integers(-45, -5),
    }
)


def opinion_args(opt, dtype):
    eps = 10.0 ** opt["eps_exp"] if opt["eps_exp"] > -45 else 1.4e-45
    return {"kappa": opt["kappa"], "evidence_max": opt["evidence_max"], "eps": eps}


def close_to_either(actual, ref64, ref_acc, dtype, scale):
    """Element-wise: actual matches the float64 reference or the reference evaluated in the accumulation dtype.
    Where the two references differ the answer depends on rounding: an element whose t2 sits at 1 with a tiny
    kappa (b jumps from 0 to 1), or t2 overflowing float32 with evidence_max = inf (inf / inf = NaN)."""
    a = actual.to("cpu", torch.float64)
    atol = max(RTOL[dtype] * scale, torch.finfo(actual.dtype).smallest_normal)
    ok = torch.zeros_like(a, dtype=torch.bool)
    for ref in (ref64.double(), ref_acc.double()):
        ok |= torch.isclose(a, ref, rtol=RTOL[dtype], atol=atol) | (a.isnan() & ref.isnan())
    assert ok.all(), f"{int((~ok).sum())} elements match neither reference, e.g. {a[~ok][:3].tolist()}"


def check_aggregate(result, expected, dtype, D, expected_acc=None):
    out, stats, u = result
    r_out, r_stats, r_u = expected
    assert out.dtype == u.dtype == dtype and stats.dtype == acc(dtype)
    if expected_acc is not None:  # the element-wise outputs: either reference (see close_to_either)
        scale = r_out.nan_to_num(0, 0, 0).abs().max().item() if r_out.numel() else 1.0
        close_to_either(out, r_out, expected_acc[0], dtype, scale)
        close_to_either(u, r_u, expected_acc[2], dtype, 1.0)
        return
    check(out, r_out, dtype)
    check(u, r_u, dtype, scale=1.0)
    stat_rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for j in range(2):
        check(stats[:, j], r_stats[:, j], dtype, rtol=stat_rtol)
    # mean belief and the zero-evidence fraction: a borderline element may round to the other side (1/D each)
    ok = r_stats[:, 2:].isfinite()
    assert torch.equal(stats[:, 2:].isfinite(), ok)
    torch.testing.assert_close(stats[:, 2:].double()[ok], r_stats[:, 2:][ok], rtol=0, atol=stat_rtol + 2.0 / D)


@given(
    settings_for(),
    st.sampled_from([1, 2, 3, 16]),
    st.sampled_from(SIZES),
    st.integers(2, 9),
    st.floats(0, 3),
    OPINION,
    LAYOUTS,
)
def test_calibrated_aggregate(setting, M, D, K, signal, opt, layout):
    """The moments form gets v from S2 - n mu^2, which cancels: v carries a rounding error ~ eps * S2, and where
    kappa >> e the belief b ~ e / kappa inherits it, amplified by t2 (relative error ~ eps * t2, 1e-9 in float64 at
    t2 = 1e7). That is conditioning, not a kernel error, so kappa stays <= 4 here; the samples form (two-pass
    variance) takes kappa up to 1e30."""
    dtype, seed, scale, bad = setting
    opt = dict(opt, kappa=min(opt["kappa"], 4.0))
    S1, S2 = reference.moments(samples_for(M, K, D, seed, scale, torch.float64, signal))
    S1, S2 = plant(S1.to(dtype), bad, seed), S2.to(dtype)
    n = torch.full((M,), float(K))
    kw = opinion_args(opt, dtype)
    result = mf.calibrated_aggregate(strided(S1, layout), strided(S2, layout), n, return_uncertainty=True, **kw)
    expected = reference.calibrated_aggregate(S1.double(), S2.double(), n, return_uncertainty=True, **kw)
    ill_conditioned = kw["kappa"] < 1e-6 or kw["evidence_max"] == float("inf")
    expected_acc = (
        reference.calibrated_aggregate(S1.to(acc(dtype)), S2.to(acc(dtype)), n, return_uncertainty=True, **kw)
        if ill_conditioned
        else None
    )
    check_aggregate(result, expected, dtype, D, expected_acc)


@given(settings_for(), st.sampled_from([1, 2, 3, 16]), st.sampled_from(SIZES), st.integers(2, 9), OPINION, LAYOUTS)
def test_calibrated_aggregate_out(setting, M, D, K, opt, layout):
    """out=: a NaN-poisoned buffer is written in full with the allocating form's bits (NaN/Inf planted included),
    and the stats are the same, over the documented ranges."""
    dtype, seed, scale, bad = setting
    S1, S2 = reference.moments(samples_for(M, K, D, seed, scale, torch.float64, 1.0))
    S1, S2 = strided(plant(S1.to(dtype), bad, seed), layout), strided(S2.to(dtype), layout)
    n = torch.full((M,), float(K))
    kw = opinion_args(opt, dtype)
    out = torch.full((D,), float("nan"), dtype=dtype)
    result = mf.calibrated_aggregate(S1, S2, n, return_uncertainty=True, out=out, **kw)
    allocated = mf.calibrated_aggregate(S1, S2, n, return_uncertainty=True, **kw)
    assert result[0] is out
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    for got, want in zip(result, allocated):
        assert torch.equal(got.view(as_int[got.element_size()]), want.view(as_int[want.element_size()]))


@given(
    settings_for([torch.float32, torch.float64, torch.bfloat16]),
    st.sampled_from([1, 2, 3]),
    st.sampled_from([1, 7, 1023, 4099]),
    st.sampled_from([2, 3, 8, 64]),
    st.floats(0, 3),
    OPINION,
    LAYOUTS,
)
def test_calibrated_aggregate_samples(setting, M, D, K, signal, opt, layout):
    dtype, seed, scale, bad = setting
    G = plant(samples_for(M, K, D, seed, scale, dtype, signal), bad, seed)
    kw = opinion_args(opt, dtype)
    result = mf.calibrated_aggregate_samples(strided(G, layout), return_uncertainty=True, **kw)
    expected = reference.calibrated_aggregate_samples(G.double(), return_uncertainty=True, **kw)
    ill_conditioned = kw["kappa"] < 1e-6 or kw["evidence_max"] == float("inf")
    expected_acc = (
        reference.calibrated_aggregate_samples(G.to(acc(dtype)), return_uncertainty=True, **kw)
        if ill_conditioned
        else None
    )
    check_aggregate(result, expected, dtype, D, expected_acc)


BOUNDARY = {
    "kappa": (1e-39, 1e-37, torch.finfo(torch.float32).smallest_normal),
    "eps": (1e-47, 1e-43, torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps),
}


@given(
    st.sampled_from(DTYPES), st.sampled_from(["kappa", "eps"]), st.floats(0, 1), st.sampled_from(["moments", "samples"])
)
def test_kappa_and_eps_at_the_float32_boundary(dtype, name, where, form):
    """Both sides of the documented range: inside, a zero column gives belief 0 and uncertainty 1 (no NaN); below
    it (float32 would make eps 0, or kappa subnormal with an infinite reciprocal), a ValueError naming it."""
    lo, hi, smallest = BOUNDARY[name]
    value = lo * (hi / lo) ** where  # log-uniform across the boundary
    G = samples_for(2, 4, 9, 0, 1.0, dtype, 1.0)
    G[1, :, 3] = 0
    S1, S2 = mf.moments(G)
    call = (
        (lambda **kw: mf.calibrated_aggregate(S1.to(dtype), S2.to(dtype), [4, 4], return_uncertainty=True, **kw))
        if form == "moments"
        else (lambda **kw: mf.calibrated_aggregate_samples(G, return_uncertainty=True, **kw))
    )
    inside = dtype == torch.float64 or float(torch.tensor(value, dtype=torch.float64).float()) >= smallest
    if not inside:
        with pytest.raises(ValueError, match=f"{name} = "):
            call(**{name: value})
        return
    out, stats, u = call(**{name: value})
    assert out.isfinite().all() and u.isfinite().all() and stats.isfinite().all()
    if form == "moments":
        expected = reference.calibrated_aggregate(
            S1.to(dtype).double(), S2.to(dtype).double(), [4, 4], return_uncertainty=True, **{name: value}
        )
    else:
        expected = reference.calibrated_aggregate_samples(G.double(), return_uncertainty=True, **{name: value})
    check(out, expected[0], dtype)
    check(u, expected[2], dtype, scale=1.0)


@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 64, 65]))
def test_samples_count_boundary(seed, K):
    G = randn((2, K, 5), seed, 1.0, torch.float32)
    if 2 <= K <= 64:
        assert mf.calibrated_aggregate_samples(G)[0].isfinite().all()
    else:
        with pytest.raises(ValueError, match="2 <= K <= 64"):
            mf.calibrated_aggregate_samples(G)


# Op 5 -----------------------------------------------------------------------------------------------------------
@given(settings_for(), st.sampled_from([1, 2, 3, 17, 64, 65]), st.sampled_from([0] + SIZES), LAYOUTS)
def test_gram(setting, R, D, layout):
    dtype, seed, scale, bad = setting
    if dtype == torch.float16:
        scale = min(scale, 4.0 / max(D, 1) ** 0.5)  # a float16 result holds sums of squares up to 65504 only
    X = plant(randn((R, D), seed, scale, dtype), bad, seed)
    if R > 64:
        with pytest.raises(ValueError, match="1 <= R <= 64"):
            mf.gram(X)
        return
    out = mf.gram(strided(X, layout))
    expected = reference.gram(X.double())
    assert out.dtype == dtype
    diag = expected.diagonal().nan_to_num(0, 0, 0)
    check(out, expected, dtype, rtol=max(RTOL[dtype], 1e-5), scale=diag.max().item() if diag.numel() else 1.0)


# Op 6 -----------------------------------------------------------------------------------------------------------
@given(settings_for(), st.sampled_from([1, 2, 5]), st.sampled_from([0] + SIZES), st.booleans(), LAYOUTS)
def test_weighted_sum(setting, R, D, per_element, layout):
    dtype, seed, scale, bad = setting
    X = plant(randn((R, D), seed, scale, dtype), bad, seed)
    w = randn((R, D) if per_element else (R,), seed + 1, 1.0, dtype if per_element else torch.float32)
    out = mf.weighted_sum(strided(X, layout), w)
    expected = reference.weighted_sum(X.double(), w.double())
    scale_ = (
        (X.double().abs() * (w.double().abs() if per_element else w.double().abs()[:, None]))
        .nan_to_num(0, 0, 0)
        .sum(0)
        .max()
        .item()
        if D
        else 1.0
    )
    check(out, expected, dtype, scale=scale_)


@given(settings_for(), st.sampled_from(SIZES), st.booleans(), st.data())
def test_segment_scale_agrees_exactly(setting, D, noise, data):
    """Scales and standard deviations that are not powers of two: the result is the reference's, bit for bit."""
    dtype, seed, scale, bad = setting
    x = plant(randn(D, seed, scale, dtype), bad, seed)
    off = offsets_for(data.draw, D)
    P = len(off) - 1
    g = torch.Generator().manual_seed(seed)
    factors = (torch.rand(P, generator=g, dtype=torch.float64) * 3).tolist()
    std = (torch.rand(P, generator=g, dtype=torch.float64) * scale).tolist() if noise else None
    mine = mf.segment_scale_(x.clone(), off, factors, noise_std=std, generator=torch.Generator().manual_seed(seed))
    ref = mf.segment_scale_(
        x.clone(), off, factors, noise_std=std, generator=torch.Generator().manual_seed(seed), backend="reference"
    )
    assert torch.equal(mine.isnan(), ref.isnan()) and torch.equal(mine.nan_to_num(), ref.nan_to_num())


@given(settings_for(), st.sampled_from(SIZES), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.data())
def test_segment_scale_noise_at_any_seed_and_offset(setting, D, seed, offset, data):
    """Explicit (seed, offset) anywhere in [0, 2^64), counters wrapping included: the reference's bits."""
    dtype, _, scale, bad = setting
    x = plant(randn(D, seed % 2**31, scale, dtype), bad, seed)
    off = offsets_for(data.draw, D)
    P = len(off) - 1
    std = [scale * (p + 1) / P for p in range(P)]
    mine = mf.segment_scale_(x.clone(), off, [0.3] * P, noise_std=std, seed=seed, offset=offset)
    ref = mf.segment_scale_(x.clone(), off, [0.3] * P, noise_std=std, seed=seed, offset=offset, backend="reference")
    assert torch.equal(mine.isnan(), ref.isnan()) and torch.equal(mine.nan_to_num(), ref.nan_to_num())


# Op 7 -----------------------------------------------------------------------------------------------------------
@given(settings_for(), st.sampled_from([1, 2, 5]), st.sampled_from([0] + SIZES), LAYOUTS, st.data())
def test_segment_moments(setting, R, D, layout, data):
    dtype, seed, scale, bad = setting
    x = plant(randn((R, D), seed, scale, dtype) + scale * 0.5, bad, seed)
    off = offsets_for(data.draw, D)
    out = mf.segment_moments(strided(x, layout), off)
    expected = reference.segment_moments(x.double(), torch.tensor(off))
    magnitude = reference.segment_moments(x.double().abs().nan_to_num(0, 0, 0), torch.tensor(off))[..., 0]
    assert out.dtype == torch.float64 and out.shape == (R, len(off) - 1, 2)
    # float64 accumulation for every dtype: the sum to 1e-12 of its segment's sum of |x|, the squares to 1e-12
    for p in range(len(off) - 1):
        check(out[:, p, 0], expected[:, p, 0], torch.float64, rtol=1e-12, scale=magnitude[:, p].max().item())
        check(out[:, p, 1], expected[:, p, 1], torch.float64, rtol=1e-12)
