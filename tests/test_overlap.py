"""Issue 11: gradient all-reduces started while the backward still runs (bucketed, as DDP's reducer does).

One spawned job per world size (2 and 3 gloo processes, 60 s process-group timeout) runs every scenario with a
bucket cap far below the test model's size (so every layer is a bucket of its own and buckets span encoders),
and the parent compares with one process on the concatenated batch (tests/test_distributed.py's reference):
- the overlap happens: a bucket's all-reduce is issued before the backward's last gradient is accumulated
  (the plain path and the encoder-bank path);
- every method that uses it equals one process (`.grad` of the first step, parameters after 3 SGD steps, to
  1e-9), under a plain process group and DDP (with and without gradient_as_bucket_view), with a ragged batch,
  with accumulation deferred by no_sync(), with a parameter no rank reaches (`.grad` None) and one reached on one
  rank only;
- collectives per step: the agreement + one all-reduce per bucket; 2 for a model below the default cap.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from _models import SharedHeadNet, losses
from hypothesis import given, settings
from hypothesis import strategies as st
from test_distributed import (
    DIMS,
    LINEAR,
    RAGGED,
    CollectiveCounter,
    N,
    balancer_for_case,
    close,
    data,
    expected,
    local,
    make_net,
    ok,
    recorder,
    snapshot,
    spawn,
    train,
)

import modfuse
from modfuse.groups import Groups

SMALL = 1e-3  # MB: 1 KiB buckets, below every layer's 16x16 float64 weight
# the methods whose step is one plain backward whose gradients are then only reduced (Groups.backward_reduced),
# and those whose encoder banks are reduced during the backward (Groups.backward_into_banks_reduced)
PLAIN = ["none", "i2m2", "greedy", "pmr"]
BANKED = ["ogm_ge", "inforeg", "agm", "cggm"]
PER_RANK = ["mimo", "utilization"]
assert set(PLAIN + BANKED) <= set(LINEAR)


class ExtraNet(SharedHeadNet):
    """SharedHeadNet plus a parameter no rank uses and a bias added to the fused logits of `extra_rows` only
    (every row on rank 0, none on the others: reached on one rank)."""

    def __init__(self):
        super().__init__(DIMS)
        self.unused = nn.Linear(3, 3)
        self.extra = nn.Parameter(torch.linspace(-0.5, 0.5, 3))
        self.extra_rows = slice(0, 0)

    def forward(self, xs):
        fused, uni = super().forward(xs)
        if self.extra_rows.stop != self.extra_rows.start:
            bias = torch.zeros_like(fused)
            bias[self.extra_rows] = 1.0
            fused = fused + bias * self.extra
        return fused, uni


def make_extra(rows):
    torch.manual_seed(0)
    net = ExtraNet().double()
    net.extra_rows = rows
    return net


def scenarios(rank, world, out):
    run, balancer = recorder(out), balancer_for_case(world)

    # (a) the order of events in one step: each parameter's gradient accumulated, each all-reduce issued
    for case in ("none", "ogm_ge"):

        def probe(case=case):
            net = make_net()
            events = []
            for name, p in net.named_parameters():  # registered before the Balancer's: they fire first
                p.register_post_accumulate_grad_hook(lambda q, name=name: events.append(("grad", name)))
            b = balancer(net, net, case, bucket_cap_mb=SMALL)
            original = dist.all_reduce

            def recording(tensor, *args, **kwargs):
                events.append(("all_reduce", tensor.numel(), bool(kwargs.get("async_op", False))))
                return original(tensor, *args, **kwargs)

            dist.all_reduce = recording
            try:
                assert b.backward(**losses(net, *local(rank, world)))
            finally:
                dist.all_reduce = original
            return events

        run(f"probe/{case}", probe)

    # (b) every method that uses it, 1 KiB buckets and one bucket (inf); collectives per step counted (the default
    # 25 MB runs in tests/test_distributed.py: every method, 2 collectives per step)
    for cap in (SMALL, float("inf")):
        for case in PLAIN + BANKED + PER_RANK:

            def plain(case=case, cap=cap):
                net = make_net()
                xs, y = local(rank, world)
                b = balancer(net, net, case, bucket_cap_mb=cap)
                with CollectiveCounter() as counter:
                    train(net, net, b, xs, y, steps=1)
                net = make_net()
                return (*train(net, net, balancer(net, net, case, bucket_cap_mb=cap), xs, y), counter.count)

            run(f"plain-{cap}/{case}", plain)

    from torch.nn.parallel import DistributedDataParallel as DDP

    for view in (False, True):
        for case in ("none", "ogm_ge", "greedy"):

            def ddp_case(case=case, view=view):
                net = make_net()
                ddp = DDP(net, gradient_as_bucket_view=view)
                b = balancer(ddp, net, case, bucket_cap_mb=SMALL)
                result = train(net, ddp, b, *local(rank, world))
                b.close()
                return result

            run(f"ddp-view={view}/{case}", ddp_case)

    for case in ("none", "ogm_ge", "greedy", "i2m2"):

        def ragged(case=case):
            net = make_net()
            xs, y = local(rank, world, sizes=RAGGED[world])
            return train(net, net, balancer(net, net, case, bucket_cap_mb=SMALL), xs, y)

        run(f"ragged/{case}", ragged)

    def no_sync():
        net = make_net()
        b = balancer(net, net, "none", bucket_cap_mb=SMALL)
        with b.no_sync():
            assert b.backward(**losses(net, *local(rank, world, seed=1)))
        assert b.backward(**losses(net, *local(rank, world, seed=2)))
        return snapshot(net)[0]

    run("no_sync", no_sync)

    def reached():
        share = N // world
        net = make_extra(slice(0, share) if rank == 0 else slice(0, 0))
        b = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method="none", bucket_cap_mb=SMALL)
        return train(net, net, b, *local(rank, world))

    run("reached", reached)

    # the hooks act only inside the Balancer's own backward: a plain backward afterwards is autograd's, untouched
    def disarmed():
        net = make_net()
        b = balancer(net, net, "none", bucket_cap_mb=SMALL)
        assert b.backward(**losses(net, *local(rank, world)))
        net.zero_grad(set_to_none=True)
        losses(net, *local(rank, world))["fused"].mean().backward()
        return snapshot(net)[0]

    run("disarmed", disarmed)

    # a float32 model (inforeg): its scores travel in float32 inside the gradients' last bucket
    def float32(cap):
        torch.manual_seed(0)
        net = SharedHeadNet(DIMS)
        xs, y = local(rank, world)
        b = balancer(net, net, "inforeg", bucket_cap_mb=cap)
        with CollectiveCounter() as counter:
            assert b.backward(**losses(net, {m: x.float() for m, x in xs.items()}, y))
        return snapshot(net)[0], counter.count, b.stats()

    for cap in (SMALL, 25):
        run(f"float32-{cap}/inforeg", lambda cap=cap: float32(cap))


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def job(request, tmp_path_factory):
    world = request.param
    return world, spawn(world, str(tmp_path_factory.mktemp(f"overlap{world}") / "out"), scenarios)


@pytest.fixture(scope="module")
def single():
    return {case: expected(case) for case in PLAIN + BANKED}


@pytest.mark.parametrize("case", ["none", "ogm_ge"])
def test_a_bucket_is_all_reduced_before_the_backward_ends(job, case):
    _, results = job
    for rank, res in enumerate(results):
        events = ok(res[f"probe/{case}"], case)
        last_grad = max(i for i, e in enumerate(events) if e[0] == "grad")
        launches = [i for i, e in enumerate(events) if e[0] == "all_reduce" and e[2]]
        assert len(launches) > 2, f"rank {rank}: {len(launches)} buckets"
        assert launches[0] < last_grad, f"rank {rank}: no all-reduce was issued during the backward: {events}"
        # the agreement (synchronous) comes before the backward; every gradient then goes through a bucket
        assert events[0][0] == "all_reduce" and not events[0][2], events[0]


@pytest.mark.parametrize("cap", [SMALL, float("inf")], ids=["1KiB", "inf"])
@pytest.mark.parametrize("case", PLAIN + BANKED)
def test_overlapped_reduction_equals_one_process(job, single, case, cap):
    _, results = job
    for rank, res in enumerate(results):
        grads, params, collectives = ok(res[f"plain-{cap}/{case}"], case)
        close(grads, single[case][0], f"rank {rank} .grad")
        close(params, single[case][1], f"rank {rank} parameters after 3 steps")
        # the agreement + one all-reduce per bucket: one bucket for this model at inf (and 25 MB) (pmr: + its
        # scores' all-reduce before the objective); with 1 KiB buckets every 16x16 weight is a bucket of its own
        base = 3 if case == "pmr" else 2
        if cap == SMALL:
            assert collectives > base + 2, collectives
        else:
            assert collectives == base, collectives


@pytest.mark.parametrize("case", PER_RANK)
def test_per_rank_methods_agree_across_ranks(job, case):
    _, results = job
    for cap in (SMALL, float("inf")):
        first = ok(results[0][f"plain-{cap}/{case}"], case)
        for r, res in enumerate(results[1:], 1):
            got = ok(res[f"plain-{cap}/{case}"], case)
            close(got[0], first[0], f"{case}: rank {r} .grad", rtol=0, atol=0)
            close(got[1], first[1], f"{case}: rank {r} parameters", rtol=0, atol=0)


@pytest.mark.parametrize("view", [False, True], ids=["copy", "gradient_as_bucket_view"])
@pytest.mark.parametrize("case", ["none", "ogm_ge", "greedy"])
def test_ddp(job, single, case, view):
    _, results = job
    for rank, res in enumerate(results):
        grads, params = ok(res[f"ddp-view={view}/{case}"], case)
        close(grads, single[case][0], f"DDP rank {rank} .grad")
        close(params, single[case][1], f"DDP rank {rank} parameters")


@pytest.mark.parametrize("case", ["none", "ogm_ge", "greedy", "i2m2"])
def test_ragged_batches(job, single, case):
    _, results = job
    for rank, res in enumerate(results):
        grads, params = ok(res[f"ragged/{case}"], case)
        close(grads, single[case][0], f"ragged rank {rank} .grad")
        close(params, single[case][1], f"ragged rank {rank} parameters")


def test_no_sync_deferred_gradients_join_their_buckets(job):
    _, results = job
    net = make_net()
    b = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method="none")
    for seed in (1, 2):
        assert b.backward(**losses(net, *data(seed)))
    want = snapshot(net)[0]
    for rank, res in enumerate(results):
        close(ok(res["no_sync"], "no_sync"), want, f"no_sync rank {rank}")


def test_unreached_parameters(job):
    """A parameter no rank reaches ends with `.grad` None; one reached on rank 0 only gets rank 0's share."""
    world, results = job
    net = make_extra(slice(0, N // world))  # one process: the bias on rank 0's rows of the concatenated batch
    b = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method="none")
    want = train(net, net, b, *data())
    assert want[0]["unused.weight"] is None and want[0]["extra"] is not None
    for rank, res in enumerate(results):
        grads, params = ok(res["reached"], "reached")
        close(grads, want[0], f"rank {rank} .grad")
        close(params, want[1], f"rank {rank} parameters")


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "25", None])
def test_bad_bucket_cap_is_refused(bad):
    net = make_net()
    with pytest.raises(ValueError, match="bucket_cap_mb must be a number > 0"):
        modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method="none", bucket_cap_mb=bad)


@settings(max_examples=60)
@given(
    sizes=st.lists(
        st.tuples(st.integers(1, 300), st.sampled_from(["float32", "float64", "float16"])), min_size=2, max_size=12
    ),
    n_encoders=st.integers(1, 3),
    cap=st.one_of(st.integers(1, 3000).map(float), st.just(float("inf"))),
    summed=st.lists(st.tuples(st.integers(1, 5), st.sampled_from(["float32", "float64", "bfloat16"])), max_size=3),
    banks=st.booleans(),
)
def test_bucket_plans_tile_the_buffer(sizes, n_encoders, cap, summed, banks):
    """Any parameter list, cap and summed tensors: per (device, dtype), the buckets tile [0, width) of the row;
    every parameter's slot lies in exactly one bucket, 16-byte aligned segments; a bucket holds at most `cap`
    bytes of gradients unless it is one parameter; the bucket holding the flags and summed tensors at [0, tail)
    is its buffer's last to launch; gaps, slots and tail cover each bucket exactly once."""
    model = nn.Module()
    model.ps = nn.ParameterList([nn.Parameter(torch.zeros(n, dtype=getattr(torch, d))) for n, d in sizes])
    params = list(model.ps)
    n_encoders = min(n_encoders, len(params) - 1)
    encoders = {f"m{i}": [params[i]] for i in range(n_encoders)}
    groups = Groups(model, encoders, replicas="trust", bucket_cap_mb=cap / 2**20)
    tensors = [torch.zeros(n, dtype=getattr(torch, d)) for n, d in summed]
    plan = groups._plan(banks, tensors)
    seen = {}
    for k, (_, dtype) in enumerate(plan.kinds):
        size = torch.empty((), dtype=dtype).element_size()
        mine = [b for b in plan.buckets if b.kind == k]
        assert [b.last for b in mine] == [False] * (len(mine) - 1) + [True]
        assert sorted((b.lo, b.hi) for b in mine)[0][0] == 0 and max(b.hi for b in mine) == plan.widths[k]
        edges = sorted((b.lo, b.hi) for b in mine)
        assert all(a[1] == b[0] for a, b in zip(edges, edges[1:])), edges
        slots = {}
        for layout in plan.layouts:
            lk, at = plan.where[id(layout)]
            if lk == k:
                assert (at * size) % 16 == 0
                for p, (a, b) in zip(layout.params, layout._bounds):
                    slots[id(p)] = (at + a, at + b)
        tail = len(plan.flag_params[k]) + sum(t.numel() for t in tensors if t.dtype == dtype)
        for b in mine:
            pieces = [slots[id(p)] for p in b.params] + list(b.gaps) + ([(0, tail)] if b.last else [])
            pieces.sort()
            assert pieces[0][0] == b.lo and pieces[-1][1] == b.hi
            assert all(x[1] == y[0] for x, y in zip(pieces, pieces[1:])), pieces
            assert len(b.params) == 1 or sum(p.numel() for p in b.params) * size <= cap
            for p in b.params:
                assert id(p) not in seen
                seen[id(p)] = b
    assert set(seen) == {id(p) for p in params}


def test_hooks_do_not_act_outside_the_balancers_backward(job):
    world, results = job
    for rank, res in enumerate(results):
        net = make_net()
        losses(net, *local(rank, world))["fused"].mean().backward()
        close(ok(res["disarmed"], "disarmed"), snapshot(net)[0], f"rank {rank}: a plain backward after the Balancer's")


def test_summed_tensors_of_another_dtype(job):
    """float32 gradients: one process's result (to float32 rounding) and stats(); at 25 MB the agreement and the
    gradients' one bucket, the scores riding in it (in the gradients' dtype, methods.wire_dtype)."""
    _, results = job
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS)
    xs, y = data()
    b = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method="inforeg")
    assert b.backward(**losses(net, {m: x.float() for m, x in xs.items()}, y))
    want = snapshot(net)[0]
    for rank, res in enumerate(results):
        for cap in (SMALL, 25):
            grads, collectives, stats = ok(res[f"float32-{cap}/inforeg"], "float32")
            close(grads, want, f"rank {rank}, cap {cap}", rtol=1e-5, atol=1e-6)
            assert stats.keys() == b.stats().keys()
            for key, value in stats.items():
                assert value == pytest.approx(b.stats()[key], rel=1e-5, abs=1e-6), key
            assert collectives == 2 if cap == 25 else collectives > 4, collectives


class _Done:
    def wait(self):
        pass


@pytest.mark.parametrize("cap", [float("inf"), 1e-6])
def test_non_reentrant_checkpointing_through_the_overlapped_path(cap, monkeypatch):
    """Activation checkpointing (use_reentrant=False, a parameter used inside and outside the checkpoint) through
    the overlapped backward gives the plain backward's gradients (one process: the all-reduce is the identity)."""
    import torch.utils.checkpoint as checkpoint

    from modfuse import groups as groups_module

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            inner = checkpoint.checkpoint(lambda t: self.enc["a"](t).relu(), x, use_reentrant=False)
            return self.head(inner + self.enc["a"](x) + self.enc["b"](x)).sum()

    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 4)
    net(x).backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    launched = []
    monkeypatch.setattr(groups_module.dist, "all_reduce", lambda t, **kw: launched.append(t.numel()) or _Done())
    g = groups_module.Groups(net, dict(net.enc), net.head, bucket_cap_mb=cap)
    g._overlapped(net(x), banks=False, rows=1, summed=())
    assert len(launched) == (1 if cap == float("inf") else 6)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=0, atol=0, msg=n)
