"""PMR against plain-PyTorch transcriptions of the authors' step (Modal-Imbalance-PMR main_Prototype_grad.py;
BalanceBenchmark PMR_trainer.py for the clipped coefficient and PER), and a behaviour test that can fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import SharedHeadNet, balancer_for, batch

from modfuse.methods.pmr import coefficients


def forward(net, xs):
    """SharedHeadNet's forward, also returning the embeddings (PMR's features)."""
    hs = {m: net.enc[m](xs[m]) for m in net.enc}
    fused = net.head(torch.relu(net.fuse(torch.stack(list(hs.values())).mean(0))))
    return fused, hs


def eu_dist(x1, x2):
    """The authors' EU_dist: the double loop of sqrt(dot(x1_i - x2_j, x1_i - x2_j))."""
    d = torch.zeros(x1.shape[0], x2.shape[0], dtype=x1.dtype)
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d[i, j] = torch.sqrt(torch.dot(x1[i] - x2[j], x1[i] - x2[j]))
    return d


def authors_loss(fused, hs, protos, y, alpha, form, mu=0.0):
    """Two modalities, key0 = 'a', key1 = 'b': the authors' loss (form 'step') or BalanceBenchmark's (clip)."""
    sim = {m: -eu_dist(hs[m], protos[m]) for m in hs}
    score = {m: sum(torch.softmax(sim[m], 1)[i][y[i]] for i in range(len(y))) for m in hs}
    ratio = (score["a"] / score["b"]).detach()
    if form == "step":
        beta, lam = (0.0, alpha) if ratio > 1 else ((alpha, 0.0) if ratio < 1 else (0.0, 0.0))
    else:
        beta, lam = (
            (0.0, min(max(float(ratio) - 1, 0), 1)) if ratio >= 1 else (min(max(1 / float(ratio) - 1, 0), 1), 0.0)
        )
        beta, lam = alpha * beta, alpha * lam
    loss = F.cross_entropy(fused, y) + beta * F.cross_entropy(sim["a"], y) + lam * F.cross_entropy(sim["b"], y)
    if mu:  # PER on the dominant modality (entropy of its prototype softmax; a mean here, theirs a sum)

        def H(m):
            return -(torch.softmax(sim[m], 1) * torch.log_softmax(sim[m], 1)).sum(1).mean()

        loss = loss - mu / alpha * (lam * H("a") + beta * H("b"))
    return loss, (beta, lam)


DIMS = {"a": 5, "b": 7}


@pytest.mark.parametrize("form,mu", [("ratio", 0.0), ("step", 0.0), ("ratio", 0.3)])
def test_pmr_gradient_is_the_authors_loss(form, mu):
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS).double()
    xs, y = batch(DIMS, N=20, seed=1)
    xs = {m: x.double() for m, x in xs.items()}
    b = balancer_for(net, "pmr", form=form, mu=mu, alpha=1.0)
    # prototypes from a first epoch on another batch
    xs0, y0 = batch(DIMS, N=60, seed=2)
    xs0 = {m: x.double() for m, x in xs0.items()}
    fused0, hs0 = forward(net, xs0)
    b.backward(fused=F.cross_entropy(fused0, y0, reduction="none"), features=hs0, target=y0, fused_logits=fused0)
    b.end_epoch()
    protos = {m: torch.stack([hs0[m][y0 == k].detach().mean(0) for k in range(3)]) for m in DIMS}
    for u, m in enumerate(DIMS):
        torch.testing.assert_close(b.method.prototypes[u], protos[m], rtol=1e-12, atol=1e-12)
    net.zero_grad(set_to_none=True)
    fused, hs = forward(net, xs)
    loss, (beta, lam) = authors_loss(fused, hs, protos, y, 1.0, form, mu)
    assert beta + lam > 0  # one modality is weighted
    expected = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"), features=hs, target=y, fused_logits=fused)
    for p, g in zip(net.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)
    st = b.stats()
    assert st["a/pce_coefficient"] == pytest.approx(beta) and st["b/pce_coefficient"] == pytest.approx(lam)


def test_pmr_prototypes_follow_the_authors_momentum():
    torch.manual_seed(1)
    net = SharedHeadNet(DIMS).double()
    b = balancer_for(net, "pmr")
    means = []
    for epoch in range(2):
        xs, y = batch(DIMS, N=45, seed=10 + epoch)
        xs = {m: x.double() for m, x in xs.items()}
        fused, hs = forward(net, xs)
        b.backward(fused=F.cross_entropy(fused, y, reduction="none"), features=hs, target=y, fused_logits=fused)
        means.append([torch.stack([hs[m][y == k].detach().mean(0) for k in range(3)]) for m in DIMS])
        b.end_epoch()
    for u in range(2):  # calculate_prototype: (1 - 0.2) new + 0.2 old after the first epoch
        torch.testing.assert_close(b.method.prototypes[u], 0.8 * means[1][u] + 0.2 * means[0][u], rtol=1e-12, atol=0)


def test_pmr_first_step_has_no_prototypes_and_adds_nothing():
    torch.manual_seed(2)
    net = SharedHeadNet(DIMS).double()
    xs, y = batch(DIMS, seed=3)
    xs = {m: x.double() for m, x in xs.items()}
    b = balancer_for(net, "pmr")
    fused, hs = forward(net, xs)
    plain = torch.autograd.grad(F.cross_entropy(fused, y), list(net.parameters()), retain_graph=True)
    assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"), features=hs, target=y, fused_logits=fused)
    for p, g in zip(net.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-13)


def test_pmr_coefficients_for_three_modalities():
    s = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    beta, gamma = coefficients(s, "ratio")
    rest = torch.tensor([1.5, 2.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(beta, torch.clamp(rest / s - 1, 0, 1))
    torch.testing.assert_close(gamma, torch.clamp(s / rest - 1, 0, 1))
    assert beta[1] == 1 and beta[0] == 0 and gamma[0] == 1 and gamma[1] == 0
    step, _ = coefficients(s, "step")
    assert step.tolist() == [0.0, 1.0, 0.0]


def test_pmr_errors_and_state_round_trip():
    net = SharedHeadNet(DIMS)
    b = balancer_for(net, "pmr")
    xs, y = batch(DIMS)
    fused, hs = forward(net, xs)
    with pytest.raises(ValueError, match="needs features="):
        b.backward(fused=F.cross_entropy(fused, y, reduction="none"), target=y, fused_logits=fused)
    with pytest.raises(ValueError, match=r"features\['a'\] must be"):
        b.backward(
            fused=F.cross_entropy(fused, y, reduction="none"),
            features={"a": hs["a"][:3], "b": hs["b"]},
            target=y,
            fused_logits=fused,
        )
    with pytest.raises(ValueError, match="form must be"):
        balancer_for(SharedHeadNet(DIMS), "pmr", form="nope")
    assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"), features=hs, target=y, fused_logits=fused)
    b.end_epoch()
    other = balancer_for(SharedHeadNet(DIMS), "pmr")
    other.load_state_dict(b.state_dict())
    torch.testing.assert_close(other.method.prototypes, b.method.prototypes, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pmr state"):
        other.load_state_dict({**b.state_dict(), "method_state": {"prototypes": [torch.zeros(1)]}})


def test_pmr_weights_and_speeds_up_the_weak_modality(monkeypatch):
    """On test_method_behaviour's task (an easy and a hard modality), PMR puts its PCE weight on the hard modality
    only and speeds its learning: after 2 epochs, the shared head's accuracy on the hard embedding alone. Measured
    with seed 0: none 0.625, pmr 0.662 (mean coefficients easy 0, hard 0.24 over 30 epochs). After 30 epochs both
    reach ~0.72-0.73 and the shuffle share does not rise (0.107 -> 0.078): PMR accelerates the weak encoder, it does
    not make the fused head rely on it more."""
    from test_method_behaviour import Net, make_data

    import modfuse
    from modfuse.methods import pmr

    coefficients = []
    backward = pmr.PMR.backward

    def recording(self, step, total):
        backward(self, step, total)
        coefficients.append([self._last["easy/pce_coefficient"], self._last["hard/pce_coefficient"]])

    monkeypatch.setattr(pmr.PMR, "backward", recording)

    def hard_accuracy(method):
        (xtr, ytr), (xte, yte) = make_data(0)
        torch.manual_seed(0)
        net = Net({m: x.shape[1] for m, x in xtr.items()})
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        b = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            perm = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr), 50):
                idx = perm[i : i + 50]
                xs, y = {m: x[idx] for m, x in xtr.items()}, ytr[idx]
                hs = {m: net.enc[m](xs[m]) for m in xs}
                fused = net.head(torch.stack(list(hs.values())).mean(0))
                opt.zero_grad()
                kw = dict(fused=F.cross_entropy(fused, y, reduction="none"), target=y, fused_logits=fused)
                if method == "pmr":
                    kw["features"] = hs
                if b.backward(**kw):
                    opt.step()
            b.end_epoch()
        with torch.no_grad():
            return float((net.head(net.enc["hard"](xte["hard"])).argmax(1) == yte).float().mean())

    plain, balanced = hard_accuracy("none"), hard_accuracy("pmr")
    easy, hard = torch.tensor(coefficients).mean(0).tolist()
    assert easy == 0 and hard > 0.1, (easy, hard)
    assert balanced > plain + 0.02, (balanced, plain)
