"""Issue 15: method "calibrated" writes Op 4's result (the shared parameters' gradient) into a persistent buffer
(calibrated_aggregate(out=) into Groups.buffer), so no step first-touches a new output, while accumulation and
rollback stay exact (tests/test_banks.py checks those for every method, calibrated included)."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import SharedHeadNet, balancer_for, batch, losses

from modfuse import ops
from modfuse.methods import calibrated as calibrated_module

DIMS = {"a": 5, "b": 7}
ROUTES = [{}, {"moments": "per_sample"}, {"evidence": "precision"}]


def shared_grad_ptrs(net):
    return tuple(p.grad.data_ptr() for p in net.head.parameters())


def batches(seeds, dtype=torch.float64):
    out = []
    for s in seeds:
        xs, y = batch(DIMS, seed=s)
        out.append(({m: x.to(dtype) for m, x in xs.items()}, y))
    return out


@pytest.mark.parametrize("options", ROUTES, ids=str)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_shared_gradient_lives_in_one_persistent_buffer(options, set_to_none):
    """The head's .grad are views of a Groups buffer, the same every step (with set_to_none=False the old views
    still hold the zeroed gradient during the call, so it alternates between two buffers and never writes them)."""
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS).double()
    b = balancer_for(net, "calibrated", **options)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    seen = []
    for xs, y in batches([1, 2, 3, 4, 5]):
        optimizer.zero_grad(set_to_none=set_to_none)
        assert b.backward(**losses(net, xs, y))
        seen.append(shared_grad_ptrs(net))
        optimizer.step()
    assert len(set(seen)) == (1 if set_to_none else 2)
    assert seen[2:] == seen[:-2]
    pool = {buf.untyped_storage().data_ptr() for bufs in b.groups._buffers.values() for buf in bufs}
    storages = {p.grad.untyped_storage().data_ptr() for p in net.head.parameters()}
    assert len(storages) == 1 and storages <= pool


def test_op4_is_called_with_out_and_allocates_no_result(monkeypatch):
    """The method hands Op 4 the persistent buffer; the op's own result is then the empty placeholder."""
    net = SharedHeadNet(DIMS).double()
    b = balancer_for(net, "calibrated")
    calls = []
    real = ops.calibrated_aggregate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("out"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "calibrated_aggregate", spy)
    for xs, y in batches([1, 2]):
        net.zero_grad(set_to_none=True)
        assert b.backward(**losses(net, xs, y))
    assert len(calls) == 2 and all(out is not None for out in calls)
    assert calls[0].data_ptr() == calls[1].data_ptr() == net.head.weight.grad.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_low_precision_parameters_get_op4_converted_into_their_buffer(dtype):
    """bfloat16 parameters have float32 moment banks: Op 4 writes a float32 scratch row that is converted into the
    persistent bfloat16 buffer. A reused buffer gives the same bits as a fresh Balancer's first call."""
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS).to(dtype)
    b = balancer_for(net, "calibrated")
    seen = []
    for xs, y in batches([1, 2, 3], dtype):
        net.zero_grad(set_to_none=True)
        net.__dict__.pop("features", None)  # the last forward's embeddings (graph tensors) cannot be deep-copied
        clone = copy.deepcopy(net)
        assert b.backward(**losses(net, xs, y))
        assert balancer_for(clone, "calibrated").backward(**losses(clone, xs, y))
        for p, q in zip(net.head.parameters(), clone.head.parameters()):
            assert p.grad.dtype == dtype and torch.equal(p.grad, q.grad)
        seen.append(shared_grad_ptrs(net))
    assert len(set(seen)) == 1


def test_compiled_statistics_stage_writes_into_the_buffer():
    """compile=True runs Op 4 (with out=) through torch.compile(fullgraph=True): the write into the buffer is kept
    and the gradient equals the eager method's."""
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS)
    eager_net = copy.deepcopy(net)
    b = balancer_for(net, "calibrated", compile=True)
    eager = balancer_for(eager_net, "calibrated")
    seen = []
    for xs, y in batches([1, 2], torch.float32):
        for model, balancer in ((net, b), (eager_net, eager)):
            model.zero_grad(set_to_none=True)
            assert balancer.backward(**losses(model, xs, y))
        for p, q in zip(net.head.parameters(), eager_net.head.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        seen.append(shared_grad_ptrs(net))
    assert seen[0] == seen[1]


def test_precision_evidence_copies_into_out():
    S1, S2 = torch.randn(2, 9, dtype=torch.float64), torch.rand(2, 9, dtype=torch.float64) + 5
    n = torch.full((2,), 4.0, dtype=torch.float64)
    out = torch.full((9,), float("nan"), dtype=torch.float64)
    got, stats = calibrated_module.calibrate_precision(S1, S2, n, 1.0, 1e-30, 1e6, out=out)
    want, want_stats = calibrated_module.calibrate_precision(S1, S2, n, 1.0, 1e-30, 1e6)
    assert got is out and torch.equal(out, want) and torch.equal(stats, want_stats)
