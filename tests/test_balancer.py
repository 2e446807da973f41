"""The Balancer API: gradients against plain PyTorch, banks, accumulation, autocast, torch.compile, state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import SharedHeadNet, balancer_for, batch, losses

import modfuse
from modfuse import reference
from modfuse.methods import calibrated as calibrated_module

DIMS = {"a": 5, "b": 7}


def grads(net):
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in net.named_parameters()}


def plain_grads(net, xs, y, names):
    """Gradients of fused + sum of unimodal mean losses (what every non-calibrated parameter must get)."""
    net.zero_grad(set_to_none=True)
    kw = losses(net, xs, y)
    (kw["fused"].mean() + sum(v.mean() for v in kw["unimodal"].values())).backward()
    out = grads(net)
    net.zero_grad(set_to_none=True)
    return {n: out[n] for n in names}


def eager_copy(net, xs, y, **options):
    """A copy of `net` whose .grad hold one eager calibrated step: what a variant must reproduce."""
    eager = copy.deepcopy(net)
    balancer_for(eager, "calibrated", **options).backward(**losses(eager, xs, y))
    return eager


def head_params(net):
    return [net.head.weight, net.head.bias]


def calibrated_oracle(net, xs, y, *, route, K=4):
    """The shared head's calibrated gradient built the slow way: per-sample / per-part gradients, then
    reference.calibrated_aggregate on their sums and sums of squares."""
    kw = losses(net, xs, y)
    rows = list(kw["unimodal"].values()) + [kw["fused"]]
    N = y.shape[0]
    S1, S2, n = [], [], []
    for loss in rows:
        if route == "microbatch":
            bounds = torch.linspace(0, N, K + 1).round().long().tolist()
            parts = [loss[bounds[k] : bounds[k + 1]].sum() * (K / N) for k in range(K)]
        else:
            parts = [loss[i] for i in range(N)]
        samples = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(part, head_params(net), retain_graph=True)])
                for part in parts
            ]
        )
        S1.append(samples.sum(0))
        S2.append(samples.square().sum(0))
        n.append(len(parts))
    out, _ = reference.calibrated_aggregate(torch.stack(S1), torch.stack(S2), torch.tensor(n, dtype=torch.float64))
    w = net.head.weight.numel()
    return out[:w].reshape(net.head.weight.shape), out[w:]


def test_none_gives_the_plain_gradients():
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS).double()
    xs, y = batch(DIMS)
    xs = {m: x.double() for m, x in xs.items()}
    names = [n for n, _ in net.named_parameters()]
    expected = plain_grads(net, xs, y, names)
    assert balancer_for(net, "none").backward(**losses(net, xs, y))
    for n in names:
        torch.testing.assert_close(grads(net)[n], expected[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route,fused_twice", [("microbatch", False), ("per_sample", False), ("per_sample", True)])
def test_calibrated_matches_the_oracle(route, fused_twice):
    torch.manual_seed(1)
    net = SharedHeadNet(DIMS, fused_twice=fused_twice).double()
    xs, y = batch(DIMS, N=20)
    xs = {m: x.double() for m, x in xs.items()}
    others = [n for n, _ in net.named_parameters() if not n.startswith("head.")]
    expected_plain = plain_grads(net, xs, y, others)
    expected_w, expected_b = calibrated_oracle(net, xs, y, route=route)
    net.zero_grad(set_to_none=True)
    b = balancer_for(net, "calibrated", moments=route, microbatches=4)
    assert b.backward(**losses(net, xs, y))
    torch.testing.assert_close(net.head.weight.grad, expected_w, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(net.head.bias.grad, expected_b, rtol=1e-10, atol=1e-13)
    for n in others:
        torch.testing.assert_close(grads(net)[n], expected_plain[n], rtol=1e-12, atol=1e-14)
    # The calibration actually did something (shrinkage), so the comparison above is not the plain sum.
    calibrated_w = net.head.weight.grad.clone()
    plain_head = plain_grads(net, xs, y, ["head.weight"])["head.weight"]
    assert not torch.allclose(calibrated_w, plain_head)
    stats = b.stats()
    assert set(stats) >= {"a/belief", "b/belief", "fused/belief", "fused/kept_norm"}
    assert all(0 <= stats[f"{m}/belief"] < 1 for m in ("a", "b", "fused"))


def test_shared_grads_are_views_of_one_output_buffer():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    balancer_for(net, "calibrated").backward(**losses(net, xs, y))
    w, bias = net.head.weight.grad, net.head.bias.grad
    assert w.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()
    assert bias.storage_offset() == w.numel()


def test_encoder_grads_are_views_of_one_bank_per_encoder():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    balancer_for(net, "ogm_ge", ge=False).backward(**losses(net, xs, y))
    for m in DIMS:
        ptrs = {p.grad.untyped_storage().data_ptr() for p in net.enc[m].parameters()}
        assert len(ptrs) == 1


DETERMINISTIC = [
    ("none", {}),
    ("calibrated", {}),
    ("calibrated", {"moments": "per_sample"}),
    ("ogm_ge", {"ge": False}),
    ("greedy", {}),
    ("mmpareto", {}),
    ("mimo", {}),
    ("i2m2", {}),
]


@pytest.mark.parametrize("method,options", DETERMINISTIC, ids=lambda v: str(v))
def test_gradient_accumulation_adds_contributions(method, options):
    torch.manual_seed(2)
    net = SharedHeadNet(DIMS).double()
    batches = [batch(DIMS, seed=s) for s in (3, 4)]
    batches = [({m: x.double() for m, x in xs.items()}, y) for xs, y in batches]
    single = []
    for xs, y in batches:
        clone = copy.deepcopy(net)
        balancer_for(clone, method, **options).backward(**losses(clone, xs, y))
        single.append(grads(clone))
    b = balancer_for(net, method, **options)
    for xs, y in batches:
        assert b.backward(**losses(net, xs, y))
    for n, g in grads(net).items():
        torch.testing.assert_close(g, single[0][n] + single[1][n], rtol=1e-10, atol=1e-13)


def test_a_failed_call_leaves_every_grad_as_it_was():
    net = SharedHeadNet(DIMS)
    net.unused = torch.nn.Parameter(torch.zeros(3))  # in `shared`, but no objective reaches it
    xs, y = batch(DIMS)
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = grads(net)
    b = modfuse.Balancer(
        net, encoders=dict(net.enc), shared=[net.head.weight, net.head.bias, net.unused], method="calibrated"
    )
    with pytest.raises(ValueError, match="'unused'.*received no gradient"):
        b.backward(**losses(net, xs, y))
    for n, g in grads(net).items():
        assert torch.equal(g, before[n]), n
    assert b.steps == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("route", ["microbatch", "per_sample"])
def test_calibrated_under_autocast(dtype, route):
    torch.manual_seed(3)
    net = SharedHeadNet(DIMS, hidden=32)
    xs, y = batch(DIMS, N=64)
    reference_net = eager_copy(net, xs, y, moments=route)
    b = balancer_for(net, "calibrated", moments=route)
    with torch.autocast("cpu", dtype=dtype):
        kw = losses(net, xs, y)
    assert b.backward(**kw)
    for p, q in zip(net.parameters(), reference_net.parameters()):
        assert p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())
        cos = F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.9, float(cos)


def test_compiled_statistics_stage_matches_eager_and_has_no_graph_break():
    import torch._dynamo

    torch.manual_seed(4)
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    eager = eager_copy(net, xs, y)
    balancer_for(net, "calibrated", compile=True).backward(**losses(net, xs, y))
    for p, q in zip(net.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    S1, S2 = torch.randn(3, 50), torch.rand(3, 50) + 1
    n = torch.full((3,), 4.0)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(calibrated_module.calibrate)(S1, S2, n, 1.0, 1e-20, 1e6)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_balancer_with_a_compiled_model():
    torch.manual_seed(5)
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    eager = eager_copy(net, xs, y)
    compiled = torch.compile(net)
    b = balancer_for(net, "calibrated")
    fused, uni = compiled(xs)
    assert b.backward(
        fused=F.cross_entropy(fused, y, reduction="none"),
        unimodal={m: F.cross_entropy(v, y, reduction="none") for m, v in uni.items()},
    )
    for p, q in zip(net.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", modfuse.methods.names())
def test_three_modalities_every_method(method):
    dims = {"a": 4, "b": 6, "c": 3}
    torch.manual_seed(6)
    net = SharedHeadNet(dims)
    xs, y = batch(dims)
    b = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        assert b.backward(**losses(net, xs, y))
        held = getattr(b.method, "held_params", set())  # greedy holds the fastest encoder (.grad None)
        for name, p in net.named_parameters():
            if id(p) in held:
                assert p.grad is None
                continue
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        optimizer.step()
        b.end_epoch()


def test_state_dict_round_trip():
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS)
    b = balancer_for(net, "greedy", window_steps=1, threshold=0.0)
    b.backward(**losses(net, xs, y))
    state = copy.deepcopy(b.state_dict())
    fresh = balancer_for(net, "greedy", window_steps=1, threshold=0.0)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["method_state"]["hold_left"] == b.method.hold_left == 5
    with pytest.raises(ValueError, match="method 'greedy'"):
        balancer_for(net, "none").load_state_dict(state)
