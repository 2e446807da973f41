"""Balancer.backward's dict arguments: a list or a tensor where a modality -> tensor dict belongs is a clear
TypeError naming the argument and the modalities, not Python's "dictionary update sequence" message."""

from __future__ import annotations

import pytest
import torch
from _models import SharedHeadNet, balancer_for, batch, losses


@pytest.mark.parametrize("arg", ["logits", "unimodal"])
@pytest.mark.parametrize("container", [list, tuple, "tensor"])
def test_a_non_dict_gets_a_clear_error(arg, container):
    dims = {"a": 5, "b": 7}
    net = SharedHeadNet(dims)
    balancer = balancer_for(net, "ogm_ge")
    xs, y = batch(dims)
    kw = losses(net, xs, y)
    values = list(kw[arg].values())
    kw[arg] = torch.stack(values) if container == "tensor" else container(values)
    before = {n: p.grad for n, p in net.named_parameters()}
    with pytest.raises(
        TypeError,
        match=rf"{arg} must be a dict of modality name -> tensor \(keys 'a', 'b'\), "
        rf"got (list|tuple|Tensor)",
    ):
        balancer.backward(fused=kw["fused"], unimodal=kw["unimodal"], logits=kw["logits"], target=y)
    assert all(p.grad is before[n] for n, p in net.named_parameters())
