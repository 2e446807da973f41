"""Issue 16: the trainer's field metrics (macro-F1, missing-modality accuracy, Shapley values and the imbalance
score), the registry-driven compare grid, and calibrated's evidence-from-precision option against its reference."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _models import SharedHeadNet, balancer_for, batch, losses
from hypothesis import given, settings
from hypothesis import strategies as st

import modfuse.methods
from modfuse import reference
from modfuse.train import metrics as M
from modfuse.train.compare import GRID, VARIANTS
from modfuse.train.config import METHODS, UNIMODAL_METHODS, Config
from modfuse.train.loop import method_options
from modfuse.train.models import LateFusionNet


# -- macro-F1 ------------------------------------------------------------------------------------------------
def test_macro_f1_hand_computed():
    # class 0: TP 1, FP 1, FN 0 -> 2/3; class 1: TP 1, FP 0, FN 2 -> 1/2; class 2 (predicted only): 0
    assert M.macro_f1(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])) == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert M.macro_f1(torch.tensor([3, 1, 3]), torch.tensor([3, 1, 3])) == 1.0
    assert M.macro_f1(torch.tensor([1, 1]), torch.tensor([0, 0])) == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60))
def test_macro_f1_matches_the_confusion_matrix_definition(pairs):
    pred = torch.tensor([p for p, _ in pairs])
    y = torch.tensor([t for _, t in pairs])
    C = torch.zeros(5, 5, dtype=torch.float64)
    for p, t in pairs:
        C[t, p] += 1  # rows: true class, columns: predicted class
    present = [c for c in range(5) if C[c].sum() + C[:, c].sum() > 0]
    f1 = [2 * C[c, c] / (C[c].sum() + C[:, c].sum()) for c in present]  # 2TP / (2TP + FN + FP)
    assert M.macro_f1(pred, y) == pytest.approx(float(sum(f1) / len(f1)), abs=1e-12)
    assert 0.0 <= M.macro_f1(pred, y) <= 1.0


def test_macro_f1_bad_input():
    with pytest.raises(ValueError, match="macro_f1 needs predictions and labels of one non-empty length"):
        M.macro_f1(torch.tensor([0, 1]), torch.tensor([0]))


# -- Shapley values and the imbalance score ------------------------------------------------------------------
def test_shapley_two_modalities_by_hand():
    v = {(): 0.1, ("a",): 0.7, ("b",): 0.3, ("a", "b"): 0.8}
    phi = M.shapley_values(v, ["a", "b"])
    assert phi["a"] == pytest.approx(((0.7 - 0.1) + (0.8 - 0.3)) / 2)
    assert phi["b"] == pytest.approx(((0.3 - 0.1) + (0.8 - 0.7)) / 2)
    assert M.imbalance_score(phi) == pytest.approx((0.55 - 0.15) / 0.7)
    assert M.imbalance_score({"a": 0.0, "b": 0.0}) == 0.0
    assert M.imbalance_score({"a": 0.2, "b": 0.2, "c": 0.2}) == 0.0


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_shapley_efficiency_and_symmetry(Mn, seed):
    names = [f"m{i}" for i in range(Mn)]
    g = torch.Generator().manual_seed(seed)
    subsets = [tuple(n for n, keep in zip(names, bits) if keep) for bits in itertools.product([0, 1], repeat=Mn)]
    v = {S: float(torch.rand((), generator=g)) for S in subsets}
    phi = M.shapley_values(v, names)
    assert sum(phi.values()) == pytest.approx(v[tuple(names)] - v[()], abs=1e-12)  # efficiency
    # a modality whose addition never changes v (a null player) gets 0; two interchangeable ones get the same
    v_null = {S: v[tuple(n for n in S if n != names[-1])] for S in subsets}
    assert M.shapley_values(v_null, names)[names[-1]] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= M.imbalance_score(phi) <= 2.0


class IgnoresB(nn.Module):
    """A fixed model whose prediction reads modality a only (b enters with weight 0)."""

    def __init__(self, features=5, classes=4):
        super().__init__()
        self.lin = nn.Linear(features, classes)

    def forward(self, xs):
        fused = self.lin(xs["a"]) + 0.0 * xs["b"].sum(1, keepdim=True)
        return fused, {"a": fused, "b": torch.zeros_like(fused)}

    def predict(self, xs):
        return self(xs)[0]


def test_a_model_that_ignores_b_loses_nothing_without_b():
    torch.manual_seed(0)
    model = IgnoresB()
    xs = {"a": torch.randn(300, 5), "b": torch.randn(300, 5)}
    y = model.predict(xs).argmax(1)
    y[:60] = (y[:60] + 1) % 4  # 80% accuracy, so "missing" has something to lose
    out = M.evaluate(model, xs, y, {m: torch.zeros(5) for m in xs})
    assert out["accuracy"] == pytest.approx(0.8)
    assert out["missing_accuracy"]["b"] == out["accuracy"]
    assert out["missing_accuracy"]["a"] < out["accuracy"]
    assert out["shapley"]["b"] == pytest.approx(0.0, abs=1e-12)
    assert out["shapley"]["a"] == pytest.approx(out["accuracy"] - out["accuracy_none"])
    assert out["imbalance"] == pytest.approx(1.0)
    assert out["macro_f1"] == pytest.approx(M.macro_f1(model.predict(xs).argmax(1), y))


def test_missing_means_zeroed_input_and_shapley_sums_on_a_trained_net():
    torch.manual_seed(3)
    model = LateFusionNet({"a": (6,), "b": (4,), "c": (3, 9)}, classes=5, hidden=8).eval()
    xs = {"a": torch.randn(97, 6), "b": torch.randn(97, 4), "c": torch.randn(97, 3, 9)}
    y = torch.randint(0, 5, (97,))
    out = M.evaluate(model, xs, y, {m: x.mean(0) for m, x in xs.items()})
    for m in xs:
        zeroed = {j: (torch.zeros_like(x) if j == m else x) for j, x in xs.items()}
        assert out["missing_accuracy"][m] == M.accuracy(model, zeroed, y)
    none = M.accuracy(model, {j: torch.zeros_like(x) for j, x in xs.items()}, y)
    assert out["accuracy_none"] == none
    assert sum(out["shapley"].values()) == pytest.approx(out["accuracy"] - none, abs=1e-12)
    assert out["accuracy"] == M.accuracy(model, xs, y)


# -- compare: every registered method ------------------------------------------------------------------------
def test_compare_has_a_row_for_every_registered_method():
    assert set(METHODS) == set(modfuse.methods.names())
    methods_in_grid = {overrides["method"] for _, overrides in GRID}
    assert methods_in_grid == set(modfuse.methods.names())
    assert {"agm", "inforeg"} <= {label for label, _ in GRID}
    labels = [label for label, _ in GRID]
    assert len(labels) == len(set(labels))
    assert set(VARIANTS) <= set(METHODS)  # no stale entries
    assert "inforeg" in UNIMODAL_METHODS and "calibrated" in UNIMODAL_METHODS and "agm" not in UNIMODAL_METHODS
    for _label, overrides in GRID:  # every row is a valid configuration
        Config(**{**dict(epochs=1), **overrides}).validate()


def test_method_options_come_from_the_constructor_signature():
    for name in METHODS:
        options = method_options(Config(method=name, seed=7), "kar", 22)
        accepted = inspect.signature(modfuse.methods.get(name).__init__).parameters
        assert set(options) <= set(accepted)
        assert options.get("seed", 7) == 7
    assert method_options(Config(method="utilization", seed=7), "kar", 22) == dict(
        seed=7, dominant="kar", steps_per_epoch=22
    )
    assert method_options(Config(method="agm", options={"alpha": 0.5}), "kar", 22) == {"alpha": 0.5}


# -- calibrated, evidence="precision" ------------------------------------------------------------------------
def _moments(samples):  # samples [R, n, D] -> S1, S2, n
    R, n, _ = samples.shape
    return samples.sum(1), samples.square().sum(1), torch.full((R,), float(n), dtype=samples.dtype)


def test_precision_evidence_by_hand():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(3, 10, 7, generator=g, dtype=torch.float64)
    samples[1] *= 3.0  # row 1: 9x the variance
    S1, S2, n = _moments(samples)
    out, stats, u = reference.calibrated_aggregate_precision(S1, S2, n, kappa=0.5, return_uncertainty=True)
    mu, v = samples.mean(1), samples.var(1)  # unbiased variance
    P = 1 / (v / 10).mean(1)
    e = 3 * P / P.sum()
    b = e / (e + 0.5)
    torch.testing.assert_close(out, (b[:, None] * mu).sum(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(stats[:, 2], b, rtol=1e-12, atol=0)
    torch.testing.assert_close(u, (0.5 / (e + 0.5)).prod().expand(7), rtol=1e-12, atol=0)
    assert b[1] < b[0] and b[1] < b[2]  # the noisier objective is believed less


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precision_evidence_is_invariant_to_a_common_scale_not_to_one_rows(dtype):
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(2, 8, 33, generator=g, dtype=torch.float64).to(dtype)
    S1, S2, n = _moments(samples)
    out, stats = reference.calibrated_aggregate_precision(S1, S2, n)
    out4, stats4 = reference.calibrated_aggregate_precision(4 * S1, 16 * S2, n)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(out4, 4 * out, **tol)
    torch.testing.assert_close(stats4[:, 2], stats[:, 2], **tol)
    scaled = samples.clone()
    scaled[0] *= 4  # one objective's gradients 4x larger: its precision drops 16x, and its belief with it
    _, stats_one = reference.calibrated_aggregate_precision(*_moments(scaled))
    assert stats_one[0, 2] < stats[0, 2] and stats_one[1, 2] > stats[1, 2]


def test_precision_evidence_one_row_and_nan():
    S1, S2, n = _moments(torch.randn(1, 5, 4, dtype=torch.float64))
    out, stats = reference.calibrated_aggregate_precision(S1, S2, n, kappa=1.0)
    torch.testing.assert_close(out, 0.5 * S1[0] / 5)  # e = 1 for a single row: b = 1 / (1 + kappa)
    S1[0, 2] = float("nan")
    out, _ = reference.calibrated_aggregate_precision(S1, S2, n)
    assert torch.isnan(out).all()  # the evidence is a mean over the bank: a NaN poisons the whole bank


def _per_sample_head_moments(net, xs, y):
    """S1, S2, n of the head's per-sample gradients for each objective (a, b, fused), by one backward per sample."""
    fused, uni = net(xs)
    rows = [F.cross_entropy(uni[m], y, reduction="none") for m in net.enc] + [
        F.cross_entropy(fused, y, reduction="none")
    ]
    params = [net.head.weight, net.head.bias]
    S1, S2 = [], []
    for loss in rows:
        per = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss[i], params, retain_graph=True)])
                for i in range(len(y))
            ]
        )
        S1.append(per.sum(0))
        S2.append(per.square().sum(0))
    return torch.stack(S1), torch.stack(S2), torch.full((len(rows),), float(len(y)), dtype=torch.float64)


def test_calibrated_precision_option_matches_its_reference():
    dims = {"a": 5, "b": 3}
    torch.manual_seed(2)
    net = SharedHeadNet(dims, fused_twice=True).double()
    xs, y = batch(dims, N=17)
    xs = {m: x.double() for m, x in xs.items()}
    S1, S2, n = _per_sample_head_moments(net, xs, y)
    expected, _ = reference.calibrated_aggregate_precision(S1, S2, n, kappa=2.0)
    b = balancer_for(net, "calibrated", moments="per_sample", evidence="precision", kappa=2.0)
    assert b.backward(**losses(net, xs, y))
    got = torch.cat([net.head.weight.grad.reshape(-1), net.head.bias.grad])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    t_form = balancer_for(net, "calibrated", moments="per_sample", kappa=2.0)
    net.zero_grad(set_to_none=True)
    assert t_form.backward(**losses(net, xs, y))
    assert not torch.allclose(torch.cat([net.head.weight.grad.reshape(-1), net.head.bias.grad]), expected)
    stats = b.stats()
    assert {"a/belief", "b/belief", "fused/belief"} <= set(stats)


def test_calibrated_evidence_option_is_checked():
    net = SharedHeadNet({"a": 5, "b": 3})
    with pytest.raises(ValueError, match="evidence must be 't' .* or 'precision', got 'snr'"):
        balancer_for(net, "calibrated", evidence="snr")
