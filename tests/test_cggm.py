"""CGGM against a plain-PyTorch transcription of the authors' training step (zrguo/CGGM src/msatrain.py, 3
modalities, and src/foodtrain.py, 2), over several steps, and a behaviour test that can fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import SharedHeadNet, balancer_for, batch

import modfuse
from modfuse.methods.cggm import balancing_terms


def forward(net, xs):
    hs = {m: net.enc[m](xs[m]) for m in net.enc}
    fused = net.head(torch.relu(net.fuse(torch.stack(list(hs.values())).mean(0))))
    return fused, hs


@pytest.mark.parametrize(
    "dims,clip", [({"a": 5, "b": 7}, None), ({"a": 5, "b": 7, "c": 4}, None), ({"a": 5, "b": 7}, 0.8)]
)
def test_cggm_steps_are_the_authors(dims, clip):
    torch.manual_seed(0)
    net = SharedHeadNet(dims).double()
    M = len(dims)
    b = balancer_for(net, "cggm", rou=1.3, lamda=0.05, clip=clip)
    g = torch.Generator().manual_seed(3)
    init = [
        [torch.randn(3, 16, generator=g, dtype=torch.float64) * 0.3, torch.zeros(3, dtype=torch.float64)] for _ in dims
    ]
    b.method.load_state_dict(
        {"classifiers": init, "optimizer": None, "previous": torch.zeros(M, dtype=torch.float64), "pending": None}
    )
    # the authors' classifier (out_layer weight and bias per modality) and its AdamW
    cls = [[t.clone().requires_grad_() for t in pair] for pair in init]
    cls_opt = torch.optim.AdamW([t for pair in cls for t in pair], lr=5e-4, weight_decay=3e-3)
    acc1, l_gm = [0.0] * M, None
    names = [n for n, _ in net.named_parameters()]
    for step in range(4):
        xs, y = batch(dims, N=40, seed=20 + step)
        xs = {m: x.double() for m, x in xs.items()}
        fused, hs = forward(net, xs)
        # -- the authors' step, transcribed (no gradient clipping: left to the loop) --
        raw_loss = F.cross_entropy(fused, y)
        if l_gm is not None:
            raw_loss = raw_loss + 0.05 * l_gm
        expected = dict(zip(names, torch.autograd.grad(raw_loss, list(net.parameters()), retain_graph=True)))
        cls_res = [F.linear(hs[m].detach(), w, bb) for (w, bb), m in zip(cls, dims)]
        cls_loss = sum(F.cross_entropy(r, y) for r in cls_res)
        cls_opt.zero_grad()
        cls_loss.backward()
        fusion = net.head.weight
        llist = [F.cosine_similarity(w.clone().view(-1), fusion.clone().view(-1), dim=0) for w, _ in cls]
        acc2 = [float((r.argmax(1) == y).double().mean()) for r in cls_res]
        diff = [acc2[i] - acc1[i] for i in range(M)]
        diff_sum = sum(diff) + 1e-8
        coeff = [(diff_sum - d) / diff_sum for d in diff]
        acc1 = acc2
        l_gm = (sum(abs(c) for c in coeff) - sum(coeff[i] * llist[i] for i in range(M))) / M
        for i, m in enumerate(dims):
            for n in names:
                if n.startswith(f"enc.{m}."):
                    expected[n] = expected[n] * coeff[i] * 1.3
        if clip is not None:  # torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            norm = torch.stack([g.norm() for g in expected.values()]).norm()
            expected = {n: g * min(1.0, clip / (float(norm) + 1e-6)) for n, g in expected.items()}
        cls_opt.step()
        # -- the Balancer --
        net.zero_grad(set_to_none=True)
        assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"), features=hs, target=y, fused_logits=fused)
        for n, p in net.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-9, atol=1e-12, msg=f"step {step} {n}")
        for mine, theirs in zip(b.method.classifiers, cls):
            for a, t in zip(mine, theirs):
                torch.testing.assert_close(a, t.detach(), rtol=1e-10, atol=1e-13)
        assert b.stats()["direction_loss"] == pytest.approx(float(l_gm.detach()), rel=1e-9)
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(0.1 * p.grad)


def test_balancing_terms_favour_the_slower_modality():
    B = balancing_terms(torch.tensor([0.9, 0.5], dtype=torch.float64), torch.tensor([0.6, 0.4], dtype=torch.float64))
    # d = (0.3, 0.1): the modality that improved less gets the larger coefficient, (D - d) / D
    torch.testing.assert_close(B, torch.tensor([0.1, 0.3], dtype=torch.float64) / (0.4 + 1e-8))


def test_cggm_errors_and_state_round_trip():
    dims = {"a": 5, "b": 7}
    net = SharedHeadNet(dims)
    xs, y = batch(dims)
    b = balancer_for(net, "cggm")
    fused, hs = forward(net, xs)
    with pytest.raises(ValueError, match="needs features="):
        b.backward(fused=F.cross_entropy(fused, y, reduction="none"), target=y, fused_logits=fused)
    bad = {"a": torch.randn(24, 9), "b": hs["b"]}
    with pytest.raises(ValueError, match="direction term"):
        b.backward(fused=F.cross_entropy(fused, y, reduction="none"), features=bad, target=y, fused_logits=fused)
    with pytest.raises(ValueError, match="fusion head's weight"):
        modfuse.Balancer(net, encoders=dict(net.enc), method="cggm")  # no shared head, no fusion_head=
    assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"), features=hs, target=y, fused_logits=fused)
    other = balancer_for(SharedHeadNet(dims), "cggm")
    other.load_state_dict(b.state_dict())
    torch.testing.assert_close(other.method.classifiers, b.method.classifiers, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cggm state"):
        other.load_state_dict({**b.state_dict(), "method_state": {"previous": torch.zeros(5)}})


def test_cggm_slows_the_modality_whose_classifier_improves_more(monkeypatch):
    """On test_method_behaviour's task (an easy and a hard modality) the authors' B_u = (D - d_u) / D follows the
    accuracy changes of the auxiliary classifiers: once the easy classifier saturates (d_easy = 0) the still-improving
    hard one gets B ~ 0, so CGGM starves the weak encoder here and its shuffle share FALLS. Measured with seed 0,
    Adam, the loop's clip 0.8 (the method's own, default, is switched off), 30 epochs: median B easy 1.0, hard 5e-7;
    hard share none 0.107, cggm 0.041."""
    from test_method_behaviour import Net, hard_share, make_data

    from modfuse.methods import cggm

    coefficients = []
    backward = cggm.CGGM.backward

    def recording(self, step, total):
        backward(self, step, total)
        coefficients.append([self._last["easy/coefficient"], self._last["hard/coefficient"]])

    monkeypatch.setattr(cggm.CGGM, "backward", recording)

    def train(method):
        (xtr, ytr), test = make_data(0)
        torch.manual_seed(0)
        net = Net({m: x.shape[1] for m, x in xtr.items()})
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        options = {"clip": None} if method == "cggm" else {}
        b = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method, **options)
        g = torch.Generator().manual_seed(0)
        for _ in range(30):
            perm = torch.randperm(len(ytr), generator=g)
            for i in range(0, len(ytr), 50):
                idx = perm[i : i + 50]
                xs, y = {m: x[idx] for m, x in xtr.items()}, ytr[idx]
                hs = {m: net.enc[m](xs[m]) for m in xs}
                fused = net.head(torch.stack(list(hs.values())).mean(0))
                opt.zero_grad()
                kw = dict(fused=F.cross_entropy(fused, y, reduction="none"), target=y, fused_logits=fused)
                if b.backward(**kw, **({"features": hs} if method == "cggm" else {})):
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 0.8)
                    opt.step()
            b.end_epoch()
        return hard_share(net, test)

    plain, balanced = train("none"), train("cggm")
    easy, hard = torch.tensor(coefficients).median(0).values.tolist()
    assert easy > 0.9 and hard < 0.1, (easy, hard)
    assert balanced < plain - 0.03, (balanced, plain)
