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


@pytest.mark.parametrize("dims", [{"a": 5, "b": 7}, {"a": 5, "b": 7, "c": 4}])
def test_cggm_steps_are_the_authors(dims):
    torch.manual_seed(0)
    net = SharedHeadNet(dims).double()
    M = len(dims)
    b = balancer_for(net, "cggm", rou=1.3, lamda=0.05)
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
