"""Issue 15: persistent gradient banks. A step allocates no new bank (the `.grad` of the encoders are views of the
same buffer every step), and accumulation and rollback stay exact whatever the user's zero_grad does:
set_to_none=True (grads None), set_to_none=False (grads are the bank views, zeroed in place), or no zero_grad."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import SharedHeadNet, balancer_for, batch, losses

DIMS = {"a": 5, "b": 7}
# methods whose encoder gradients live in persistent banks, with options that make them deterministic
BANKED = [
    ("ogm_ge", {"ge": False}),
    ("mmpareto", {}),
    ("inforeg", {}),
    ("agm", {}),
]
# greedy reads the gradients where autograd leaves them (tensor_sq_norms): no bank, as "none"
UNBANKED = [("none", {}), ("greedy", {"window_steps": 10**6})]
EVERY = BANKED + UNBANKED + [("calibrated", {}), ("calibrated", {"moments": "per_sample"})]
STATELESS = [(m, o) for m, o in EVERY if m != "agm"]  # a call's gradients do not depend on the calls before


def encoder_params(net):
    return [p for m in DIMS for p in net.enc[m].parameters()]


def grads(net):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in net.named_parameters()}


def doubled_batches(seeds):
    out = []
    for s in seeds:
        xs, y = batch(DIMS, seed=s)
        out.append(({m: x.double() for m, x in xs.items()}, y))
    return out


def single_call_grads(net, method, options, batches):
    """The gradients of each batch alone, each from a fresh copy of the model and Balancer."""
    out = []
    for xs, y in batches:
        clone = copy.deepcopy(net)
        assert balancer_for(clone, method, **options).backward(**losses(clone, xs, y))
        out.append(grads(clone))
    return out


@pytest.mark.parametrize("method,options", BANKED, ids=lambda v: str(v))
@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_encoder_banks_are_allocated_once(method, options, set_to_none):
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS).double()
    b = balancer_for(net, method, **options)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    seen = []
    for xs, y in doubled_batches([1, 2, 3, 4, 5]):
        optimizer.zero_grad(set_to_none=set_to_none)
        assert b.backward(**losses(net, xs, y))
        seen.append(tuple(p.grad.data_ptr() for p in encoder_params(net)))
        optimizer.step()
    # set_to_none=False leaves the old views in .grad (zeroed): the call must not write into them, so it alternates
    # between two banks; with grads None it reuses one
    assert len(set(seen)) == (2 if not set_to_none else 1)
    assert seen[2:] == seen[:-2]
    banks = {buf.untyped_storage().data_ptr() for pool in b.groups._buffers.values() for buf in pool}
    for m in DIMS:  # one persistent bank per encoder
        storages = {p.grad.untyped_storage().data_ptr() for p in net.enc[m].parameters()}
        assert len(storages) == 1 and storages <= banks


@pytest.mark.parametrize("method,options", EVERY, ids=lambda v: str(v))
def test_no_step_after_the_first_allocates_a_buffer(method, options):
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS).double()
    b = balancer_for(net, method, **options)
    counts = []
    for xs, y in doubled_batches([1, 2, 3]):
        net.zero_grad(set_to_none=True)
        assert b.backward(**losses(net, xs, y))
        counts.append({buf.data_ptr() for pool in b.groups._buffers.values() for buf in pool})
    assert counts[1] == counts[2] == counts[0]
    assert bool(counts[0]) == ((method, options) not in UNBANKED)  # in one process these need no buffer


@pytest.mark.parametrize("method,options", STATELESS, ids=lambda v: str(v))
@pytest.mark.parametrize("zero_grad", ["set_to_none", "zero_in_place", "none"])
def test_accumulation_over_calls(method, options, zero_grad):
    """Three calls; before the last one the user zeroes (or not): .grad must hold what loss.backward semantics
    give, whatever buffer the previous calls left in .grad."""
    torch.manual_seed(2)
    net = SharedHeadNet(DIMS).double()
    batches = doubled_batches([3, 4, 5])
    single = single_call_grads(net, method, options, batches)
    b = balancer_for(net, method, **options)
    for xs, y in batches[:2]:
        assert b.backward(**losses(net, xs, y))
    if zero_grad != "none":
        net.zero_grad(set_to_none=zero_grad == "set_to_none")
    assert b.backward(**losses(net, *batches[2]))
    for n, g in grads(net).items():
        first_two = single[0][n] + single[1][n]
        expect = single[2][n] + (first_two if zero_grad == "none" else 0)
        torch.testing.assert_close(g, expect, rtol=1e-10, atol=1e-13, msg=n)


def nan_gradient_losses(net, xs, y):
    kw = losses(net, xs, y)
    kw["fused_logits"].register_hook(lambda g: g * float("nan"))
    return kw


@pytest.mark.parametrize("method,options", STATELESS, ids=lambda v: str(v))
@pytest.mark.parametrize("zero_grad", ["set_to_none", "zero_in_place", "none"])
def test_a_skipped_call_leaves_the_bank_views_intact(method, options, zero_grad):
    """The old .grad are views of the bank a call would reuse: a skipped (non-finite) call must leave them as they
    were, and the next call must add to them."""
    torch.manual_seed(2)
    net = SharedHeadNet(DIMS).double()
    batches = doubled_batches([3, 4])
    single = single_call_grads(net, method, options, batches)
    b = balancer_for(net, method, **options)
    assert b.backward(**losses(net, *batches[0]))
    if zero_grad != "none":
        net.zero_grad(set_to_none=zero_grad == "set_to_none")
    before = grads(net)
    ptrs = [None if p.grad is None else p.grad.data_ptr() for p in net.parameters()]
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        assert b.backward(**nan_gradient_losses(net, *batches[1])) is False
    after = grads(net)
    for n, g in before.items():
        assert (g is None and after[n] is None) or torch.equal(g, after[n]), n
    assert ptrs == [None if p.grad is None else p.grad.data_ptr() for p in net.parameters()]
    assert b.backward(**losses(net, *batches[1]))
    for n, g in grads(net).items():
        expect = single[1][n] + (single[0][n] if zero_grad == "none" else 0)
        torch.testing.assert_close(g, expect, rtol=1e-10, atol=1e-13, msg=n)


def test_a_buffer_held_by_the_gradients_before_a_call_is_not_handed_out():
    net = SharedHeadNet(DIMS)
    groups = balancer_for(net, "none").groups
    first = groups.buffer("x", (4,), torch.float32, "cpu")
    assert groups.buffer("x", (4,), torch.float32, "cpu").data_ptr() != first.data_ptr()  # in use by this call
    groups.hold([first[1:3]])  # next call: a gradient is a view of `first`
    second = groups.buffer("x", (4,), torch.float32, "cpu", zero=True)
    assert second.data_ptr() != first.data_ptr() and torch.equal(second, torch.zeros(4))
    groups.hold([])
    assert groups.buffer("x", (4,), torch.float32, "cpu").data_ptr() == first.data_ptr()
    scratch = groups.buffer("y", (2, 3), torch.float64, "cpu", scratch=True)
    assert groups.buffer("y", (2, 3), torch.float64, "cpu", scratch=True).data_ptr() == scratch.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_flags_exactly_the_nonfinite_gradients(dtype, poison):
    """The fast 2-norm pass must not miss a NaN/Inf, nor flag finite gradients whose 2-norm overflows."""
    net = SharedHeadNet(DIMS).to(dtype)
    b = balancer_for(net, "none")
    big = torch.finfo(dtype).max / 2  # finite, but its square overflows in any dtype
    for i, p in enumerate(net.parameters()):
        p.grad = torch.randn(p.shape).to(dtype)
        if i % 2 == 0:
            p.grad.view(-1)[-1] = big
    assert b.groups.check_finite(b.trainable) == []
    names = [n for n, _ in net.named_parameters()]
    for i in (0, 3, len(names) - 1):
        list(net.parameters())[i].grad.view(-1)[0] = poison
    assert b.groups.check_finite(b.trainable) == [names[i] for i in (0, 3, len(names) - 1)]
