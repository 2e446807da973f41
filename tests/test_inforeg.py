"""InfoReg against a plain-PyTorch transcription of the authors' step (GeWu-Lab/InfoReg_CVPR2025 main.py)."""

from __future__ import annotations

import math

import pytest
import torch
from _models import SharedHeadNet, balancer_for, batch, losses

from modfuse.methods.inforeg import window_signal

DIMS = {"a": 5, "b": 7, "c": 4}


def authors_window(trace_list):
    """main.py: k = 1 in epoch 0, else (tr1 - tr2) / tr1 with 10-epoch sums over the trace list."""
    if not trace_list:
        return 1
    tr1 = sum(trace_list[-10:]) / 10
    tr2 = sum(trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1


@pytest.mark.parametrize(
    "traces", [[], [2.0], [1.0, 3.0], [float(i % 7 + 1) for i in range(15)], [5.0 - 0.1 * i for i in range(12)]]
)
def test_window_signal_is_the_authors(traces):
    assert window_signal(traces) == pytest.approx(authors_window(traces), rel=1e-12)


def test_inforeg_step_and_trace_match_the_authors_math():
    """The dominant modality (score above the mean of the others) gets beta (theta - theta_anchor) added, beta =
    0.95 exp(tanh(gap)); the others get the plain gradient of fused + unimodal; the epoch's Fisher trace is the sum
    over weight tensors of mean(g^2) of the final gradients."""
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS).double()
    xs, y = batch(DIMS, N=32, seed=3)
    xs = {m: x.double() for m, x in xs.items()}
    b = balancer_for(net, "inforeg")
    anchor = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():  # as if some steps of this epoch had already moved the parameters
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kw = losses(net, xs, y)
    total = kw["fused"].mean() + sum(v.mean() for v in kw["unimodal"].values())
    names = [n for n, _ in net.named_parameters()]
    plain = dict(zip(names, torch.autograd.grad(total, list(net.parameters()), retain_graph=True)))
    scores = {m: float(torch.softmax(kw["logits"][m].detach(), 1)[torch.arange(len(y)), y].sum()) for m in DIMS}
    expected, trace = {}, dict.fromkeys(DIMS, 0.0)
    for m in DIMS:
        gap = scores[m] - sum(scores[j] for j in DIMS if j != m) / (len(DIMS) - 1)
        beta = 0.95 * math.exp(math.tanh(gap)) if gap > 0 else 0.0
        for n, p in net.named_parameters():
            if n.startswith(f"enc.{m}."):
                g = plain[n] + beta * (p.detach() - anchor[n])
                expected[n] = g
                if g.dim() >= 2:
                    trace[m] += float((g * g).mean())
    assert sum(1 for m in DIMS if scores[m] > sum(scores.values()) / len(DIMS)) >= 1
    assert b.backward(**kw)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected.get(n, plain[n]), rtol=1e-10, atol=1e-13)
    b.end_epoch()
    for m in DIMS:
        assert b.stats()[f"{m}/fisher_trace"] == pytest.approx(trace[m], rel=1e-10)
    first = net.enc["a"][0].weight.detach().reshape(-1)  # end_epoch moved the anchors to the parameters now
    assert b.method.anchors["a"][0][: first.numel()].tolist() == first.tolist()


def test_inforeg_closed_window_gives_the_plain_gradient():
    """A trace that fell over the last 11 epochs closes the window (k <= 0.04): no proximal term for anyone."""
    torch.manual_seed(1)
    net = SharedHeadNet(DIMS).double()
    xs, y = batch(DIMS, N=16, seed=4)
    xs = {m: x.double() for m, x in xs.items()}
    b = balancer_for(net, "inforeg")
    b.method.traces = {m: [12.0 - i for i in range(12)] for m in DIMS}  # falling over the last 11 epochs
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kw = losses(net, xs, y)
    total = kw["fused"].mean() + sum(v.mean() for v in kw["unimodal"].values())
    plain = torch.autograd.grad(total, list(net.parameters()), retain_graph=True)
    assert b.backward(**kw)
    for p, g in zip(net.parameters(), plain):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-13)
    assert all(v == 0 for k, v in b.stats().items() if k.endswith("/beta"))


def test_inforeg_state_round_trip_and_bad_state():
    net = SharedHeadNet(DIMS)
    b = balancer_for(net, "inforeg")
    xs, y = batch(DIMS, seed=5)
    b.backward(**losses(net, xs, y))
    b.end_epoch()
    state = b.state_dict()
    other = balancer_for(SharedHeadNet(DIMS), "inforeg")
    other.load_state_dict(state)
    assert other.method.traces == b.method.traces
    torch.testing.assert_close(other.method.anchors, b.method.anchors, rtol=0, atol=0)
    bad = {**state, "method_state": {**state["method_state"], "anchors": torch.zeros(3)}}
    with pytest.raises(ValueError, match="inforeg state"):
        other.load_state_dict(bad)
