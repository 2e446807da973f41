"""Op 4, both forms, against the reference, plus the properties docs/math.md lists."""

import re

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_close, gradient_samples, noncontiguous

import modfuse as mf
from modfuse import reference


def banks(G, dtype):
    """Moment banks of the float64 samples, rounded to `dtype` (what a caller would hand the op)."""
    S1, S2 = reference.moments(G.double())
    return S1.to(dtype), S2.to(dtype)


def check_against_reference(result, expected, dtype):
    out, stats, u = result
    r_out, r_stats, r_u = expected
    assert out.dtype == dtype and u.dtype == dtype
    assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not out.isnan().any() and not stats.isnan().any() and not u.isnan().any()  # every element written
    # |out| is bounded by sum |b mu|: that sets the absolute scale of rounding in the sum over modalities
    assert_close(out, r_out, dtype)
    assert_close(u, r_u, dtype, scale=1.0)
    stat_rtol = 1e-9 if dtype == torch.float64 else 1e-4
    for j in range(2):
        assert_close(stats[:, j], r_stats[:, j], dtype, rtol=stat_rtol)
    D = out.numel()
    # mean belief and the zero-evidence fraction: a borderline element may round to the other side (1/D each)
    torch.testing.assert_close(stats[:, 2:].double(), r_stats[:, 2:], rtol=0, atol=stat_rtol + 2.0 / D)


CASES = [(M, D) for M in (2, 3, 16) for D in (1, 7, 4099)] + [(2, 1 << 20), (3, 1 << 20)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,D", CASES)
def test_moments_form_matches_reference(M, D, dtype, gen, target):
    K = 5
    S1, S2 = banks(gradient_samples(M, K, D, torch.float64, gen), dtype)
    n = torch.full((M,), float(K))
    result = mf.calibrated_aggregate(target(S1), target(S2), n, return_uncertainty=True, backend=target.backend)
    expected = reference.calibrated_aggregate(S1.double(), S2.double(), n, return_uncertainty=True)
    check_against_reference(result, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("K", [2, 5, 64])
@pytest.mark.parametrize("M,D", [(2, 1), (3, 7), (16, 4099), (3, 4099)])
def test_samples_form_matches_reference(M, K, D, dtype, gen, target):
    target.skip_unless("calibrated_aggregate_samples")
    G = gradient_samples(M, K, D, dtype, gen)
    result = mf.calibrated_aggregate_samples(target(G), return_uncertainty=True, backend=target.backend)
    expected = reference.calibrated_aggregate_samples(G.double(), return_uncertainty=True)
    check_against_reference(result, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_samples_form_large(dtype, gen):
    G = gradient_samples(2, 5, 1 << 20, dtype, gen)
    check_against_reference(
        mf.calibrated_aggregate_samples(G, return_uncertainty=True),
        reference.calibrated_aggregate_samples(G.double(), return_uncertainty=True),
        dtype,
    )


def test_unequal_counts_and_options(gen):
    M, D = 3, 4099
    S1, S2 = banks(gradient_samples(M, 6, D, torch.float64, gen), torch.float32)
    n = torch.tensor([6.0, 3.0, 12.0])
    for kwargs in ({"kappa": 0.3}, {"kappa": 4.0, "evidence_max": 5.0}, {"eps": 1e-6}, {"evidence_max": float("inf")}):
        result = mf.calibrated_aggregate(S1, S2, n, return_uncertainty=True, **kwargs)
        expected = reference.calibrated_aggregate(S1.double(), S2.double(), n, return_uncertainty=True, **kwargs)
        check_against_reference(result, expected, torch.float32)
    assert len(mf.calibrated_aggregate(S1, S2, n)) == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noncontiguous_inputs(dtype, gen, target):
    G = gradient_samples(3, 5, 4099, dtype, gen)
    S1, S2 = banks(G, dtype)
    n = torch.full((3,), 5.0)
    check_against_reference(
        mf.calibrated_aggregate(
            noncontiguous(target(S1)), noncontiguous(target(S2)), n, return_uncertainty=True, backend=target.backend
        ),
        reference.calibrated_aggregate(S1.double(), S2.double(), n, return_uncertainty=True),
        dtype,
    )
    target.skip_unless("calibrated_aggregate_samples")
    Gnc = noncontiguous(target(G))
    check_against_reference(
        mf.calibrated_aggregate_samples(Gnc, return_uncertainty=True, backend=target.backend),
        reference.calibrated_aggregate_samples(G.double(), return_uncertainty=True),
        dtype,
    )


# ---- Op 4's properties (docs/math.md), on random data ----------------------------------------------------------------
def test_infinite_evidence_gives_the_plain_sum(gen):
    M, K, D = 3, 5, 4099
    mean = torch.randn(M, 1, D, generator=gen, dtype=torch.float64)
    G = mean + 1e-7 * torch.randn(M, K, D, generator=gen, dtype=torch.float64)  # t2 ~ 1e14
    plain_sum = G.mean(1).sum(0)
    out, _ = mf.calibrated_aggregate_samples(G, evidence_max=float("inf"))
    torch.testing.assert_close(out, plain_sum, rtol=1e-9, atol=1e-9)
    S1, S2 = reference.moments(G)
    out, stats = mf.calibrated_aggregate(S1, S2, [K] * M, evidence_max=float("inf"))
    torch.testing.assert_close(out, plain_sum, rtol=1e-6, atol=1e-6)  # S2 - n mu^2 cancels: still b ~ 1
    assert (stats[:, 2] > 1 - 1e-6).all()


@pytest.mark.parametrize("form", ["moments", "samples"])
def test_permuting_modalities_changes_nothing(form, gen):
    M, K, D = 5, 6, 4099
    G = gradient_samples(M, K, D, torch.float32, gen)
    perm = torch.randperm(M, generator=gen)
    if form == "samples":
        out, stats = mf.calibrated_aggregate_samples(G)
        out_p, stats_p = mf.calibrated_aggregate_samples(G[perm])
    else:
        S1, S2 = mf.moments(G)
        n = torch.arange(M, dtype=torch.float32) + 2
        out, stats = mf.calibrated_aggregate(S1, S2, n)
        out_p, stats_p = mf.calibrated_aggregate(S1[perm], S2[perm], n[perm])
    torch.testing.assert_close(out_p, out, rtol=1e-6, atol=1e-6 * out.abs().max().item())
    torch.testing.assert_close(stats_p, stats[perm])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_scaling_a_modality_scales_its_contribution_and_keeps_its_belief(dtype, gen):
    M, K, D = 3, 8, 4099
    G = gradient_samples(M, K, D, torch.float64, gen)
    a = 7.25
    G_scaled = G.clone()
    G_scaled[1] *= a
    _, stats = mf.calibrated_aggregate_samples(G.to(dtype))
    out_s, stats_s = mf.calibrated_aggregate_samples(G_scaled.to(dtype))
    mu = G.mean(1)
    v = G.var(1)
    _, b, _ = reference.calibration_opinions(mu, v, torch.full((M,), float(K), dtype=torch.float64))
    expected = b[0] * mu[0] + a * b[1] * mu[1] + b[2] * mu[2]
    assert_close(out_s, expected, dtype, rtol=1e-4 if dtype == torch.float32 else 1e-9)
    torch.testing.assert_close(stats_s[:, 2], stats[:, 2], rtol=1e-5, atol=1e-6)  # mean belief unchanged
    torch.testing.assert_close(stats_s[1, 0], stats[1, 0] * a * a, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_modality_without_evidence_contributes_exactly_zero(dtype, gen):
    M, D, n = 3, 4099, 6.0
    S1, S2 = banks(gradient_samples(M, int(n), D, torch.float64, gen), torch.float64)
    # modality 0: t2 = n mu^2 / v <= 0.8 everywhere, so e = 0 and b = 0
    mu0 = torch.randn(D, generator=gen, dtype=torch.float64)
    t2 = 0.8 * torch.rand(D, generator=gen, dtype=torch.float64)
    v0 = n * mu0**2 / t2.clamp_min(1e-3) + 1e-3
    S1[0] = n * mu0
    S2[0] = n * mu0**2 + (n - 1) * v0
    S1, S2 = S1.to(dtype), S2.to(dtype)
    counts = torch.full((M,), n)
    out, stats = mf.calibrated_aggregate(S1, S2, counts)
    out_without, _ = mf.calibrated_aggregate(S1[1:], S2[1:], counts[1:])
    assert torch.equal(out, out_without)
    assert stats[0, 1] == 0 and stats[0, 2] == 0 and stats[0, 3] == 1


@pytest.mark.parametrize("form", ["moments", "samples"])
def test_never_amplifies(form, gen):
    G = gradient_samples(4, 5, 100_003, torch.float32, gen, signal=2.0)
    if form == "samples":
        out, _ = mf.calibrated_aggregate_samples(G, kappa=0.01)
    else:
        S1, S2 = mf.moments(G)
        out, _ = mf.calibrated_aggregate(S1, S2, [5] * 4, kappa=0.01)
    bound = G.double().mean(1).abs().sum(0)
    assert (out.double().abs() <= bound * (1 + 1e-6)).all()


def test_noise_dimensions_shrink_signal_dimensions_keep(gen):
    """What the op is for: elements whose per-modality gradients are pure noise are damped; consistent ones kept."""
    M, K, D = 2, 16, 20_000
    signal = torch.zeros(M, 1, D, dtype=torch.float64)
    signal[:, :, : D // 2] = 3.0
    G = signal + torch.randn(M, K, D, generator=gen, dtype=torch.float64)
    out, _ = mf.calibrated_aggregate_samples(G.float())
    plain = G.mean(1).sum(0)
    assert out[: D // 2].double().div(plain[: D // 2]).mean() > 0.95
    # measured: noise elements keep ~44% of the plain sum's magnitude and ~45% of them are exactly 0
    assert out[D // 2 :].double().abs().mean() < 0.6 * plain[D // 2 :].abs().mean()
    assert (out[D // 2 :] == 0).double().mean() > 0.3


# ---- NaN/Inf policy ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_propagates_to_its_element_only(dtype, bad, gen, target):
    M, D = 3, 4099
    S1, S2 = banks(gradient_samples(M, 5, D, torch.float64, gen), dtype)
    S1, S2 = target(S1), target(S2)
    clean, _ = mf.calibrated_aggregate(S1, S2, [5] * M, backend=target.backend)
    S1[1, 100] = bad
    out, stats = mf.calibrated_aggregate(S1, S2, [5] * M, backend=target.backend)
    assert not out[100].isfinite()
    others = torch.ones(D, dtype=torch.bool, device=out.device)
    others[100] = False
    assert torch.equal(out[others], clean[others])
    assert stats[[0, 2]].isfinite().all() and not stats[1, 0].isfinite()
    with pytest.raises(ValueError, match="S1 has NaN or Inf values in modality 1"):
        mf.calibrated_aggregate(S1, S2, [5] * M, check_finite=True)


def test_non_finite_samples(gen):
    G = gradient_samples(3, 4, 50, torch.float32, gen)
    G[2, 1, 7] = float("nan")
    out, _ = mf.calibrated_aggregate_samples(G)
    assert out[7].isnan() and out[torch.arange(50) != 7].isfinite().all()
    with pytest.raises(ValueError, match="G has NaN or Inf values in modality 2"):
        mf.calibrated_aggregate_samples(G, check_finite=True)


def test_deterministic_across_runs_and_thread_counts(gen):
    S1, S2 = banks(gradient_samples(3, 5, 300_001, torch.float64, gen), torch.float32)
    first = mf.calibrated_aggregate(S1, S2, [5, 5, 5], return_uncertainty=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = mf.calibrated_aggregate(S1, S2, [5, 5, 5], return_uncertainty=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, single):
        assert torch.equal(a, b)


# ---- the edges of the documented ranges (issue 14 item 4) -----------------------------------------------------
def _zero_column_banks(gen, dtype):
    """Moment banks whose modality 1 is all zero at elements 3 and 10 (a dead unit: mean 0, variance 0)."""
    S1, S2 = banks(gradient_samples(3, 5, 13, torch.float64, gen), dtype)
    S1[1, [3, 10]] = 0
    S2[1, [3, 10]] = 0
    return S1, S2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": 1e-40},
        {"kappa": 1e-20},
        {"eps": 1e-40, "kappa": 1e-20},
        {"kappa": 1.2e-38},
        {"eps": 1.4e-45},
        {"kappa": 1.2e-38, "eps": 1.4e-45},
    ],
)
def test_tiny_eps_or_kappa_on_a_zero_column_gives_no_nan(kwargs, dtype, gen, target):
    """1 / (e n + kappa (v + eps)) overflowed for a zero column: NaN where the reference gives belief 0."""
    S1, S2 = _zero_column_banks(gen, dtype)
    n = torch.full((3,), 5.0)
    out, stats, u = mf.calibrated_aggregate(
        target(S1), target(S2), n, return_uncertainty=True, backend=target.backend, **kwargs
    )
    r_out, _, r_u = reference.calibrated_aggregate(
        S1.to(_acc(dtype)), S2.to(_acc(dtype)), n, return_uncertainty=True, **kwargs
    )
    assert out.isfinite().all() and u.isfinite().all() and stats.isfinite().all()
    assert_close(out, r_out, dtype)
    assert_close(u, r_u, dtype, scale=1.0)
    target.skip_unless("calibrated_aggregate_samples")
    G = gradient_samples(3, 5, 13, dtype, gen)
    G[1, :, [3, 10]] = 0
    out, _, u = mf.calibrated_aggregate_samples(target(G), return_uncertainty=True, backend=target.backend, **kwargs)
    r_out, _, r_u = reference.calibrated_aggregate_samples(G.to(_acc(dtype)), return_uncertainty=True, **kwargs)
    assert out.isfinite().all() and u.isfinite().all()
    assert_close(out, r_out, dtype)
    assert_close(u, r_u, dtype, scale=1.0)


@pytest.mark.parametrize("name,smallest,below", [("kappa", "1.18e-38", 1e-39), ("eps", "1.4e-45", 1e-46)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kappa_and_eps_outside_float32_are_rejected(name, smallest, below, dtype):
    """The other side of the range: a value that float32 (the accumulation dtype) would turn into 0, a subnormal
    kappa (whose reciprocal overflows) or inf is refused, naming the argument and the range."""
    S1, S2 = torch.ones(2, 3, dtype=dtype), torch.full((2, 3), 3.0, dtype=dtype)
    for value in (below, 1e39):
        with pytest.raises(
            ValueError,
            match=rf"{name} = {re.escape(str(value))} becomes .* in float32.*pass {name} "
            rf"in \[{smallest}",
        ):
            mf.calibrated_aggregate(S1, S2, [2, 2], **{name: value})
        with pytest.raises(ValueError, match=rf"{name} = {re.escape(str(value))} becomes"):
            mf.calibrated_aggregate_samples(S1[:, None].expand(2, 2, 3), **{name: value})
    # float64 keeps every positive finite value
    out, _ = mf.calibrated_aggregate(S1.double(), S2.double(), [2, 2], **{name: 1e-300})
    assert out.isfinite().all()


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("magnitude", [1e18, 1e19, 1.8e19])
def test_huge_gradients_match_the_reference(magnitude, gen, target):
    """n mu^2 overflows float32 from |g| ~ 1e19 (K = 5): the evidence is then capped, as in the reference, not
    0 or NaN."""
    target.skip_unless("calibrated_aggregate_samples")
    G = (magnitude * (1 + 0.01 * torch.randn(2, 5, 64, generator=gen, dtype=torch.float64))).float()
    G[1] *= -0.5
    out, stats, u = mf.calibrated_aggregate_samples(target(G), return_uncertainty=True, backend=target.backend)
    r_out, r_stats, r_u = reference.calibrated_aggregate_samples(G, return_uncertainty=True)  # float32, as documented
    assert out.isfinite().all() and (out.abs() > 0.4 * magnitude).all()  # b ~ 1: out ~ mu_0 + mu_1
    assert_close(out, r_out, torch.float32)
    assert_close(u, r_u, torch.float32, scale=1.0)
    torch.testing.assert_close(stats[:, 2:], r_stats[:, 2:])


# ---- out=: the result written into a caller's buffer (issue 15: a buffer reused every step) ---------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN payloads included), for bitwise comparison."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,D", CASES)
def test_out_is_written_in_full_and_equals_the_allocating_form(M, D, dtype, gen, target):
    S1, S2 = banks(gradient_samples(M, 5, D, torch.float64, gen), dtype)
    S1, S2 = target(S1), target(S2)
    n = torch.full((M,), 5.0)
    out = torch.full((D,), float("nan"), dtype=dtype, device=S1.device)  # poisoned: every element must be written
    result = mf.calibrated_aggregate(S1, S2, n, return_uncertainty=True, out=out, backend=target.backend)
    allocated = mf.calibrated_aggregate(S1, S2, n, return_uncertainty=True, backend=target.backend)
    assert result[0] is out
    for got, want in zip(result, allocated):
        assert torch.equal(bits(got), bits(want))
    expected = reference.calibrated_aggregate(S1.double(), S2.double(), n, return_uncertainty=True)
    check_against_reference(result, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_out_with_noncontiguous_inputs_and_nan(dtype, gen, target):
    S1, S2 = banks(gradient_samples(3, 5, 4099, torch.float64, gen), dtype)
    S1, S2 = target(S1), target(S2)
    S1nc, S2nc = noncontiguous(S1), noncontiguous(S2)
    S1[2, 4098] = S1nc[2, 4098] = float("nan")
    out = torch.full((4099,), 7.0, dtype=dtype, device=S1.device)
    got, stats = mf.calibrated_aggregate(S1nc, S2nc, [5] * 3, out=out, backend=target.backend)
    want, want_stats = mf.calibrated_aggregate(S1, S2, [5] * 3, backend=target.backend)
    assert got is out and torch.equal(bits(out), bits(want)) and torch.equal(bits(stats), bits(want_stats))
    assert out[4098].isnan() and out[:4098].isfinite().all()  # the NaN policy holds for out= too


def test_out_on_the_reference_backend(gen):
    S1, S2 = banks(gradient_samples(2, 5, 33, torch.float64, gen), torch.float32)
    out = torch.full((33,), float("nan"))
    got, stats = mf.calibrated_aggregate(S1, S2, [5, 5], out=out, backend="reference")
    want, want_stats = reference.calibrated_aggregate(S1, S2, [5, 5])
    assert got is out and torch.equal(out, want) and torch.equal(stats, want_stats)


def test_bad_out_is_refused_naming_it(gen):
    S1, S2 = banks(gradient_samples(2, 5, 33, torch.float64, gen), torch.float32)
    n = torch.full((2,), 5.0)
    cases = [
        ([1.0] * 33, TypeError, "out must be a torch.Tensor or None, got list"),
        (torch.empty(34), ValueError, r"out must have shape \[D\] .* = \(33,\), got \(34,\)"),
        (torch.empty(1, 33), ValueError, r"out must have shape \[D\]"),
        (torch.empty(33, dtype=torch.float64), TypeError, "out must have S1's dtype float32 .*got float64"),
        (torch.empty(33, device="meta"), ValueError, "out is on meta but S1 is on cpu"),
        (torch.empty(66)[::2], ValueError, "out is written in place and must be contiguous"),
        (torch.empty(33, requires_grad=True), ValueError, "out must not require grad"),
        (S1[1], ValueError, "out shares memory with S1"),
        (S2.view(-1)[20:53], ValueError, "out shares memory with S2"),  # a partial overlap
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            mf.calibrated_aggregate(S1, S2, n, out=bad)
    bank = torch.empty(3, 33)
    S1b, S2b = bank[0:2], torch.ones(2, 33)
    S1b.copy_(S1)
    with pytest.raises(ValueError, match="out shares memory with S1"):  # out in a row of the same buffer as S1's
        mf.calibrated_aggregate(S1b, S2b, n, out=bank[1])
    counts = torch.full((40,), 5.0)
    with pytest.raises(ValueError, match="out shares memory with n"):
        mf.calibrated_aggregate(S1, S2, counts[30:32], out=counts[2:35])
    # a separate row of the same buffer is fine: out = bank[2] shares its storage but not its bytes
    got, _ = mf.calibrated_aggregate(S1b, S2b, n, out=bank[2])
    assert torch.equal(got, mf.calibrated_aggregate(S1b, S2b, n)[0])


def test_the_kernels_guard_out_themselves(gen):
    """A direct torch.ops call (no modfuse.ops checks) cannot make the kernel write out of bounds or into an
    input it reads."""
    S1, S2 = banks(gradient_samples(2, 5, 33, torch.float64, gen), torch.float32)
    n = torch.full((2,), 5.0)
    op = torch.ops.modfuse.calibrated_aggregate
    for bad in (torch.empty(32), torch.empty(33, dtype=torch.float64), torch.empty(66)[::2]):
        with pytest.raises(RuntimeError, match="out must be a contiguous \\[D\\] tensor of S1's dtype"):
            op(S1, S2, n, 1.0, None, 1e6, False, bad)
    with pytest.raises(RuntimeError, match="unsupported operation: some elements of the input tensor and the"):
        op(S1, S2, n, 1.0, None, 1e6, False, S1[0])
    first, stats, u = op(S1, S2, n, 1.0, None, 1e6, False, torch.empty(33))
    assert first.numel() == 0 and stats.shape == (2, 4) and u.numel() == 0  # the result went into out


def test_out_under_torch_compile(gen):
    """torch.compile keeps the write into out (declared mutable in the schema): no graph break, the same bits."""
    S1, S2 = banks(gradient_samples(3, 5, 4099, torch.float64, gen), torch.float32)
    n = torch.full((3,), 5.0)

    def step(S1, S2, n, out):
        _, stats = mf.calibrated_aggregate(S1, S2, n, out=out)
        return stats * 2

    compiled = torch.compile(step, fullgraph=True)
    want, want_stats = mf.calibrated_aggregate(S1, S2, n)
    for _ in range(2):  # the second call reuses the compiled graph
        out = torch.full((4099,), float("nan"))
        doubled = compiled(S1, S2, n, out)
        assert torch.equal(out, want) and torch.equal(doubled, want_stats * 2)
