"""Bad input to the Balancer: a clear message naming the culprit, and no training state lost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _models import SharedHeadNet, balancer_for, batch, losses

import modfuse

DIMS = {"a": 5, "b": 7}


def test_unknown_method_lists_the_methods():
    net = SharedHeadNet(DIMS)
    with pytest.raises(ValueError, match="unknown method 'ogm'.*'calibrated'.*'ogm_ge'"):
        balancer_for(net, "ogm")


def test_unknown_option_names_the_options():
    net = SharedHeadNet(DIMS)
    with pytest.raises(TypeError, match="method 'ogm_ge' has no option 'kappa'.*'alpha'"):
        balancer_for(net, "ogm_ge", kappa=1.0)


def test_parameter_in_two_groups():
    net = SharedHeadNet(DIMS)
    with pytest.raises(
        ValueError,
        match=r"'head.weight' is in both shared and encoders\['b'\]|"
        r"'head.weight' is in both encoders\['b'\] and shared",
    ):
        modfuse.Balancer(
            net, encoders={"a": net.enc["a"], "b": [*net.enc["b"].parameters(), net.head.weight]}, shared=net.head
        )


def test_parameter_not_of_the_model():
    net = SharedHeadNet(DIMS)
    stray = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        modfuse.Balancer(net, encoders=dict(net.enc), shared=[stray])


def test_parameter_with_no_gradient_names_it_and_keeps_grads():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    b = balancer_for(net, "none")
    fused, uni = net(xs)
    with pytest.raises(ValueError, match=r"'enc.b.0.weight' of encoders\['b'\] received no gradient"):
        # the fused loss is built from modality a's unimodal logits only: encoder b is never reached
        b.backward(fused=F.cross_entropy(uni["a"], y))
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("method", ["calibrated", "ogm_ge", "greedy", "utilization"])
def test_nan_loss_skips_the_step_and_keeps_all_state(method):
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    b = balancer_for(net, method)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    assert b.backward(**losses(net, xs, y))
    optimizer.step()
    grads = [p.grad.clone() for p in net.parameters()]
    params = [p.detach().clone() for p in net.parameters()]
    adam_state = {k: v.clone() for k, v in optimizer.state[net.head.weight].items()}
    method_state = repr(b.state_dict())
    kw = losses(net, xs, y)
    kw["fused"] = kw["fused"] * float("nan")
    with pytest.warns(RuntimeWarning, match="the fused loss is NaN or Inf at step 1.*skipped"):
        stepped = b.backward(**kw)
    assert stepped is False
    if stepped:  # the documented pattern
        optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    assert all(torch.equal(optimizer.state[net.head.weight][k], v) for k, v in adam_state.items())
    assert repr(b.state_dict()) == method_state.replace("'skipped': 0", "'skipped': 1")
    assert b.steps == 1 and b.skipped == 1


def test_nan_loss_raises_when_asked():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    b = balancer_for(net, "calibrated", on_nonfinite="raise")
    kw = losses(net, xs, y)
    kw["unimodal"]["b"] = kw["unimodal"]["b"] / 0.0
    with pytest.raises(FloatingPointError, match=r"unimodal\['b'\] loss is NaN or Inf"):
        b.backward(**kw)
    assert all(p.grad is None for p in net.parameters())


def test_on_nonfinite_must_be_known():
    with pytest.raises(ValueError, match="on_nonfinite must be 'skip' or 'raise'"):
        balancer_for(SharedHeadNet(DIMS), "none", on_nonfinite="ignore")


def test_method_inputs_are_required_by_name():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    kw = losses(net, xs, y)
    del kw["logits"]
    with pytest.raises(ValueError, match="method 'ogm_ge' needs logits="):
        balancer_for(net, "ogm_ge").backward(**kw)
    kw = losses(net, xs, y)
    kw["unimodal"].pop("b")
    with pytest.raises(ValueError, match="method 'mmpareto' needs unimodal=.*every modality"):
        balancer_for(net, "mmpareto").backward(**kw)


def test_calibrated_needs_per_sample_losses():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    kw = losses(net, xs, y)
    kw["fused"] = kw["fused"].mean()
    with pytest.raises(ValueError, match="per-sample losses.*fused loss has shape \\(\\)"):
        balancer_for(net, "calibrated").backward(**kw)


def test_calibrated_per_sample_needs_linear_layers():
    net = SharedHeadNet(DIMS)
    net.scale = torch.nn.Parameter(torch.ones(1))  # shared, but not the weight or bias of an nn.Linear
    with pytest.raises(ValueError, match="'scale' is not.*moments='microbatch'"):
        modfuse.Balancer(
            net, encoders=dict(net.enc), shared=[net.head.weight, net.scale], method="calibrated", moments="per_sample"
        )


def test_unknown_modality_key_and_loss_without_grad():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    kw = losses(net, xs, y)
    kw["unimodal"]["c"] = kw["unimodal"]["a"]
    with pytest.raises(ValueError, match="unimodal has key 'c', which is not a modality"):
        balancer_for(net, "none").backward(**kw)
    with pytest.raises(ValueError, match="fused does not require grad"):
        balancer_for(net, "none").backward(fused=torch.ones(3))
    with pytest.raises(ValueError, match="backward needs a loss"):
        balancer_for(net, "none").backward()
