"""Issue 14 items 3, 5, 6: no silent NaN in the gradients the Balancer writes, all-or-nothing state, strict
options, and no leak from calibrated's per-sample hooks."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from _models import SharedHeadNet, balancer_for, batch, losses

import modfuse

DIMS = {"a": 5, "b": 7}


def nan_gradient_losses(net, xs, y):
    """Finite losses whose gradient is NaN: the fused logits' backward is poisoned."""
    kw = losses(net, xs, y)
    kw["fused_logits"].register_hook(lambda g: g * float("nan"))
    return kw


def method_options(method):
    return {"greedy": {"window_steps": 1}}.get(method, {})


@pytest.mark.parametrize("method", modfuse.methods.names())
def test_nonfinite_gradient_with_finite_loss_is_skipped(method):
    net = SharedHeadNet(DIMS).double()
    xs, y = batch(DIMS, N=16)
    xs = {m: x.double() for m, x in xs.items()}
    b = balancer_for(net, method, **method_options(method))
    before = b.state_dict()
    kw = nan_gradient_losses(net, xs, y)
    assert all(torch.isfinite(v).all() for v in [kw["fused"], *kw["unimodal"].values()])
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        assert b.backward(**kw) is False
    assert all(p.grad is None for p in net.parameters())
    assert b.skipped == 1 and b.steps == 0
    after = b.state_dict()
    assert after.keys() == before.keys() and after["method_state"].keys() == before["method_state"].keys()
    for k, v in before["method_state"].items():
        assert (
            torch.equal(v, after["method_state"][k]) if isinstance(v, torch.Tensor) else v == after["method_state"][k]
        )


@pytest.mark.parametrize("method", ["none", "calibrated", "ogm_ge", "greedy", "mmpareto"])
def test_nonfinite_gradient_raises_when_asked_and_keeps_grads(method):
    net = SharedHeadNet(DIMS).double()
    xs, y = batch(DIMS, N=16)
    xs = {m: x.double() for m, x in xs.items()}
    b = balancer_for(net, method, on_nonfinite="raise")
    assert b.backward(**losses(net, xs, y))
    kept = [p.grad.clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError, match="gradient of .* is NaN or Inf"):
        b.backward(**nan_gradient_losses(net, xs, y))
    for p, g in zip(net.parameters(), kept):
        assert torch.equal(p.grad, g)


def test_load_state_dict_validates_before_mutating():
    two = balancer_for(SharedHeadNet(DIMS), "greedy")
    two.steps, two.epoch = 7, 3
    net3 = SharedHeadNet({"a": 5, "b": 7, "c": 3})
    three = balancer_for(net3, "greedy")
    three.method.speeds += 1.5
    before = (three.steps, three.epoch, three.method.speeds.clone())
    with pytest.raises(ValueError, match="speeds for .*3"):
        three.load_state_dict(two.state_dict())
    assert (three.steps, three.epoch) == before[:2] and torch.equal(three.method.speeds, before[2])
    bad = two.state_dict() | {"epoch": "x"}
    with pytest.raises(ValueError, match=r"state\['epoch'\]"):
        two.load_state_dict(bad)
    assert two.epoch == 3


def test_raising_backward_rolls_the_method_state_back():
    """greedy updates its speeds, then the Balancer finds a parameter without gradient and raises."""
    net = SharedHeadNet(DIMS)
    net.enc["a"].register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    xs, y = batch(DIMS, N=16)
    b = balancer_for(net, "greedy", window_steps=100)
    speeds = b.method.speeds.clone()
    with pytest.raises(ValueError, match="'enc.a.unused'.*received no gradient"):
        b.backward(**losses(net, xs, y))
    assert torch.equal(b.method.speeds, speeds) and b.method.window_count == 0


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("ogm_ge", {"start_epoch": "a"}, "start_epoch"),
        ("ogm_ge", {"end_epoch": -1}, "end_epoch"),
        ("ogm_ge", {"start_epoch": 5, "end_epoch": 2}, "end_epoch"),
        ("ogm_ge", {"ge": "yes"}, "ge must be"),
        ("utilization", {"steps_per_epoch": -3}, "steps_per_epoch"),
        ("utilization", {"seed": 1.5}, "seed"),
        ("greedy", {"threshold": "0.3"}, "threshold"),
        ("calibrated", {"microbatches": True}, "microbatches"),
        ("calibrated", {"include_fused": 1}, "include_fused"),
    ],
)
def test_method_options_are_checked_strictly(method, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        balancer_for(SharedHeadNet(DIMS), method, **options)


def test_per_sample_hooks_keep_only_the_last_forward():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS, N=8)
    b = balancer_for(net, "calibrated", moments="per_sample")
    for _ in range(5):
        net(xs)
    # one forward of the model calls the head once per modality and once for the fusion
    assert sum(len(calls) for calls in b.method._calls.values()) == len(DIMS) + 1
    assert b.backward(**losses(net, xs, y))
    assert not b.method._calls


def test_per_sample_hooks_removed_by_close_and_with():
    net = SharedHeadNet(DIMS)
    xs, _ = batch(DIMS, N=8)
    with balancer_for(net, "calibrated", moments="per_sample") as b:
        assert net.head._forward_hooks and net._forward_pre_hooks
    assert not net.head._forward_hooks and not net._forward_pre_hooks
    net(xs)
    assert not b.method._calls


def test_discarded_balancer_is_collected_and_stops_recording():
    net = SharedHeadNet(DIMS)
    xs, _ = batch(DIMS, N=8)
    b = balancer_for(net, "calibrated", moments="per_sample")
    net(xs)
    ref = weakref.ref(b.method)
    del b
    gc.collect()
    assert ref() is None
    assert not net.head._forward_hooks and not net._forward_pre_hooks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(xs)


# -- the finite check reads only what the method has not already reduced (issue 15) ------------------------------
def _finite_check_reads(b, monkeypatch):
    """The tensors the Balancer's finite check hands to Op 1b after the step just taken."""
    read = []
    real = modfuse.ops.tensor_sq_norms
    monkeypatch.setattr(modfuse.ops, "tensor_sq_norms", lambda ts, **kw: read.extend(ts) or real(ts, **kw))
    assert b.groups.check_finite(b.groups.trainable, proven=b.method.proven) == []
    monkeypatch.setattr(modfuse.ops, "tensor_sq_norms", real)
    return {t.data_ptr() for t in read}


@pytest.mark.parametrize("method, options", [("greedy", {"window_steps": 1}), ("ogm_ge", {"ge": True})])
def test_finite_check_skips_what_the_method_reduced(method, options, monkeypatch):
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS, N=16)
    b = balancer_for(net, method, **options)
    assert b.backward(**losses(net, xs, y))
    encoder_grads = {p.grad.data_ptr() for m in DIMS for p in net.enc[m].parameters()}
    other_grads = {p.grad.data_ptr() for p in [*net.fuse.parameters(), *net.head.parameters()]}
    read = _finite_check_reads(b, monkeypatch)
    assert read == other_grads and not read & encoder_grads


def test_finite_check_with_proofs():
    net = SharedHeadNet(DIMS)
    b = balancer_for(net, "none")
    a, c = list(net.enc["a"].parameters())[:2]
    a.grad, c.grad = torch.ones_like(a), torch.ones_like(c)
    a.grad.view(-1)[-1] = float("nan")
    # a bound that is NaN (what a NaN element makes of the method's norm) sends the parameters to the exact check
    assert b.groups.check_finite([a, c], proven=[([a], torch.tensor([float("nan")]))]) == ["enc.a.0.weight"]
    # a bound past the dtype's largest value on finite elements: confirmed exactly, not a false alarm
    a.grad.view(-1)[-1] = 3e38
    big = torch.tensor([3e39], dtype=torch.float64)
    assert b.groups.check_finite([a, c], proven=[([a], big)]) == []
    c.grad.view(-1)[0] = float("inf")
    assert b.groups.check_finite([a, c], proven=[([a], big)]) == ["enc.a.0.bias"]


@pytest.mark.parametrize("method, options", [("greedy", {"window_steps": 1}), ("ogm_ge", {"ge": True})])
def test_inf_gradient_in_a_proven_encoder_is_skipped(method, options):
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS, N=16)
    b = balancer_for(net, method, **options)
    kw = losses(net, xs, y)
    first = next(net.enc["b"].parameters())
    first.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        assert not b.backward(**kw)
    assert all(p.grad is None for p in net.parameters())
