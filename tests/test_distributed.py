"""torch.distributed (gloo, CPU, 2 and 3 processes): issue 11's scenarios against one process on the whole batch.

Process start-ups dominate the cost, so each world size is ONE spawned job that runs every scenario in turn
(plain process group, DDP with and without gradient_as_bucket_view, DDP given as its .module, FSDP2 for every
method, FSDP2 with ragged batches and under bf16 autocast, NaN on one rank, a ragged last batch, a missing
modality, a batch too small for `microbatches`, accumulation with and without no_sync(), autocast bf16, replicas
that differ) and saves what it saw; the parent compares it with one process on the concatenated batch. The
process group has a 60 s timeout, so a hang fails instead of stalling.

Linear in the batch (compared with one process, `.grad` of the first step and the parameters after 3 SGD
steps): none, calibrated (both routes), ogm_ge, greedy, mmpareto, i2m2, inforeg, agm, pmr, cggm. Per rank by design (their objective is a
nonlinear function of the rank's own batch): mimo (logsumexp of local mean losses) and utilization (the shuffled
drop of the local batch): checked equal on every rank only.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import SharedHeadNet, batch, losses

import modfuse

DIMS = {"a": 5, "b": 7}
N = 24
K_TOTAL = 6  # micro-batches over the whole batch; each rank cuts its part into K_TOTAL / world
LINEAR = [
    "none",
    "calibrated-microbatch",
    "calibrated-per_sample",
    "calibrated-precision",
    "ogm_ge",
    "greedy",
    "mmpareto",
    "i2m2",
    "inforeg",
    "agm",
    "pmr",
    "cggm",
]
PER_RANK = ["mimo", "utilization"]
RAGGED = {2: [13, 11], 3: [9, 8, 7]}
# every FSDP2 method linear in the batch; the micro-batch route's K parts per rank are not one process's cuts
# when the batches are ragged, so it is left out (as without FSDP2)
FSDP2_RAGGED = [case for case in LINEAR if case != "calibrated-microbatch"]
HEAD_NUMEL = 16 * 3 + 3  # SharedHeadNet's head (hidden 16, 3 classes): the shared elements
BF16_FSDP2 = ["none", "ogm_ge", "calibrated-per_sample", "calibrated-microbatch"]


def method_of(case: str, world: int) -> tuple[str, dict]:
    if case == "calibrated-microbatch":
        return "calibrated", {"microbatches": K_TOTAL // world}
    if case == "calibrated-per_sample":
        return "calibrated", {"moments": "per_sample"}
    if case == "calibrated-precision":  # evidence from precision: the banks all-reduced whole (a mean over D)
        return "calibrated", {"moments": "per_sample", "evidence": "precision"}
    if case == "greedy":  # a hold decided after step 1, so that 3 steps exercise it
        return "greedy", {"window_steps": 1, "threshold": 0.0}
    return case, {}


def make_net(seed=0):
    torch.manual_seed(seed)
    return SharedHeadNet(DIMS).double()


def data(seed=1, n=N):
    xs, y = batch(DIMS, N=n, seed=seed)
    return {m: x.double() for m, x in xs.items()}, y


def snapshot(net):
    """Full (unsharded) gradients and parameters: a collective under FSDP2, so every rank calls it."""

    def full(t):
        return None if t is None else (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    return ({n: full(p.grad) for n, p in net.named_parameters()}, {n: full(p) for n, p in net.named_parameters()})


def train(net, wrapper, balancer, xs, y, steps=3):
    """`steps` SGD steps on one batch; returns the gradients of the first step and the final parameters."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first = None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        assert balancer.backward(**losses(wrapper, xs, y))
        if first is None:
            first = snapshot(net)[0]
        opt.step()
    return first, snapshot(net)[1]


def expected(case, world=2):
    """One process on the concatenated batch (the micro-batch route with K_TOTAL parts): (.grad of the first step,
    parameters after 3 steps, stats(); inforeg's after an end_epoch(), so that its Fisher trace is in them)."""
    method, options = method_of(case, 1)
    if case == "calibrated-microbatch":
        options = {"microbatches": K_TOTAL}
    net = make_net()
    xs, y = data()
    balancer = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method, **options)
    result = train(net, net, balancer, xs, y)
    if case == "inforeg":
        balancer.end_epoch()
    return (*result, balancer.stats())


class KernelDtypes:
    """Records the dtypes of the tensors the fused ops are called with (modfuse.ops attributes, looked up by the
    methods at call time): op name -> sorted set of dtype names of its tensor arguments."""

    # op -> the positions of its data arguments (not the per-segment scales or the counts)
    OPS = {
        "linear_moments": (0, 1),
        "calibrated_aggregate": (0, 1),
        "segment_moments": (0,),
        "segment_scale_": (0,),
        "moments_accumulate_": (0, 1, 2),
    }

    def __init__(self):
        self.seen: dict[str, set] = {}

    def __enter__(self):
        from modfuse import ops

        self._orig = {name: getattr(ops, name) for name in self.OPS}
        for name, fn in self._orig.items():

            def recording(*args, _fn=fn, _name=name, **kwargs):
                found = self.seen.setdefault(_name, set())
                found.update(str(args[i].dtype) for i in self.OPS[_name] if i < len(args))
                return _fn(*args, **kwargs)

            setattr(ops, name, recording)
        return self

    def __exit__(self, *exc):
        from modfuse import ops

        for name, fn in self._orig.items():
            setattr(ops, name, fn)

    def result(self):
        return {name: sorted(v) for name, v in self.seen.items()}


def sharded(net, mesh):
    """FSDP2 as the tests use it: each encoder its own group, the root holding the head and the fusion layer."""
    from torch.distributed.fsdp import fully_shard

    for m in DIMS:
        fully_shard(net.enc[m], mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def bf16_step(net, model, case, world, xs, y):
    """One Balancer step of a float32 model with the forward under bf16 autocast: (.grad, kernel dtypes)."""
    method, options = method_of(case, world)
    b = modfuse.Balancer(model, encoders=dict(net.enc), shared=net.head, method=method, **options)
    xs = {m: x.float() for m, x in xs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kw = losses(model, xs, y)
    with KernelDtypes() as seen:
        assert b.backward(**kw)
    return snapshot(net)[0], seen.result()


# -- the spawned job ------------------------------------------------------------------------------------------------
def part_of(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def local(rank, world, seed=1, sizes=None):
    xs, y = data(seed)
    part = part_of(rank, sizes or [N // world] * world)
    return {m: x[part] for m, x in xs.items()}, y[part]


# collective -> (which argument holds the data a rank sends, ring-algorithm factor)
KINDS = {"all_reduce": (0, 2.0), "reduce_scatter_tensor": (1, 1.0), "all_gather_into_tensor": (0, 1.0)}


class CollectiveCounter:
    """Counts the collectives the groups layer calls (through the torch.distributed module attributes) and the
    bytes each rank sends with ring algorithms: all-reduce 2 (W-1)/W S, reduce-scatter and all-gather (W-1)/W S."""

    def __init__(self):
        self.count, self.bytes, self._orig = 0, 0.0, {k: getattr(dist, k) for k in KINDS}

    def __enter__(self):
        W = dist.get_world_size()
        for kind, (arg, factor) in KINDS.items():

            def counting(*args, _orig=self._orig[kind], _arg=arg, _factor=factor, **kwargs):
                t = args[_arg]
                self.count += 1
                self.bytes += _factor * (W - 1) / W * t.numel() * t.element_size()
                return _orig(*args, **kwargs)

            setattr(dist, kind, counting)
        return self

    def __exit__(self, *exc):
        for kind, orig in self._orig.items():
            setattr(dist, kind, orig)


def recorder(out):
    """run(name, fn): fn's result, or its error, into out[name] (compared by the parent)."""

    def run(name, fn):
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001  (recorded, compared by the parent)
            out[name] = ("error", type(e).__name__, str(e), traceback.format_exc()[-800:])

    return run


def balancer_for_case(world):
    """balancer(model, net, case, **extra): the Balancer of `case` (method_of) on `net`'s groups."""

    def balancer(model, net, case, **extra):
        method, options = method_of(case, world)
        return modfuse.Balancer(model, encoders=dict(net.enc), shared=net.head, method=method, **options, **extra)

    return balancer


def scenarios(rank, world, out):
    run, balancer = recorder(out), balancer_for_case(world)

    # plain process group, every method
    for case in LINEAR + PER_RANK:

        def plain(case=case):
            net = make_net()
            xs, y = local(rank, world)
            b = balancer(net, net, case)
            with CollectiveCounter() as counter:
                train(net, net, b, xs, y, steps=1)
            net = make_net()
            return (*train(net, net, balancer(net, net, case), xs, y), counter.count)

        run(f"plain/{case}", plain)

    from torch.nn.parallel import DistributedDataParallel as DDP

    # bytes per step: calibrated's shard-local path against an all-reduce of its banks, and DDP's plain step
    def bytes_per_step():
        out = {}
        for label, case, extra in [
            ("calibrated reduce_scatter", "calibrated-microbatch", {}),
            ("calibrated all_reduce", "calibrated-microbatch", {"collectives": "all_reduce"}),
            ("none", "none", {}),
        ]:
            net = make_net()
            b = balancer(net, net, case, **extra)
            kw = losses(net, *local(rank, world))
            with CollectiveCounter() as counter:
                b.backward(**kw)
            out[label] = (counter.count, counter.bytes, snapshot(net)[0])
        net = make_net()
        ddp = DDP(net)
        kw = losses(ddp, *local(rank, world))
        out["ddp"] = (None, 2.0 * (world - 1) / world * sum(p.numel() * 8 for p in net.parameters()), None)
        (kw["fused"].mean() + sum(v.mean() for v in kw["unimodal"].values())).backward()
        return out

    run("bytes", bytes_per_step)

    # DDP, with and without gradient_as_bucket_view; the Balancer given the DDP module or its .module
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    for view in (False, True):
        for case in LINEAR + PER_RANK:
            for given in ("ddp", "module") if case == "calibrated-per_sample" else ("ddp",):

                def ddp_case(case=case, view=view, given=given):
                    net = make_net()
                    ddp = DDP(net, gradient_as_bucket_view=view)
                    reducer_calls = []

                    def counting_hook(state, bucket):
                        reducer_calls.append(1)
                        return allreduce_hook(state, bucket)

                    ddp.register_comm_hook(None, counting_hook)
                    xs, y = local(rank, world)
                    b = balancer(ddp if given == "ddp" else net, net, case)
                    result = train(net, ddp, b, xs, y)
                    if given == "ddp":
                        b.close()
                    else:  # a discarded Balancer gives DDP its sync back too
                        del b
                        gc.collect()
                    return (*result, len(reducer_calls), ddp.require_backward_grad_sync)

                run(f"ddp-view={view}-{given}/{case}", ddp_case)

    # FSDP2
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for case in LINEAR + PER_RANK:

        def fsdp_case(case=case):
            net = sharded(make_net(), mesh)
            xs, y = local(rank, world)
            b = balancer(net, net, case)
            result = train(net, net, b, xs, y)
            if case == "inforeg":
                b.end_epoch()  # its Fisher trace: partial sums over the shards
            return (*result, b.stats())

        run(f"fsdp2/{case}", fsdp_case)

    # FSDP2 with ragged batches: per-sample weighting through FSDP2's reduce-scatter and the methods' partial sums
    for case in FSDP2_RAGGED:

        def fsdp_ragged(case=case):
            net = sharded(make_net(), mesh)
            xs, y = local(rank, world, sizes=RAGGED[world])
            return train(net, net, balancer(net, net, case), xs, y)

        run(f"fsdp2-ragged/{case}", fsdp_ragged)

    # FSDP2 under bf16 autocast (float32 model)
    for case in BF16_FSDP2:

        def fsdp_bf16(case=case):
            net = sharded(make_net().float(), mesh)
            return bf16_step(net, net, case, world, *local(rank, world))

        run(f"fsdp2-bf16/{case}", fsdp_bf16)

    # a ragged last batch: per-sample weighting equals one process on the concatenation
    for case in ["none", "calibrated-per_sample", "ogm_ge", "greedy", "mmpareto", "i2m2"]:

        def ragged(case=case):
            net = make_net()
            xs, y = local(rank, world, sizes=RAGGED[world])
            return train(net, net, balancer(net, net, case), xs, y)

        run(f"ragged/{case}", ragged)

    # NaN loss on the last rank: every rank skips, or every rank raises
    for policy in ("skip", "raise"):

        def nan(policy=policy):
            net = make_net()
            xs, y = local(rank, world)
            b = balancer(net, net, "calibrated-microbatch", on_nonfinite=policy)
            kw = losses(net, xs, y)
            if rank == world - 1:
                kw["fused"] = kw["fused"] * float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ok = b.backward(**kw)
                except FloatingPointError as e:
                    return ("raised", str(e), [p.grad for p in net.parameters()])
            return (ok, b.skipped, [p.grad for p in net.parameters()])

        run(f"nan/{policy}", nan)

    # a modality missing on the last rank: a zero contribution (none, calibrated) or a raise on every rank
    for case in ["none", "calibrated-per_sample", "calibrated-microbatch", "mmpareto"]:

        def missing(case=case):
            net = make_net()
            xs, y = local(rank, world)
            b = balancer(net, net, case)
            kw = losses(net, xs, y)
            if rank == world - 1:
                del kw["unimodal"]["b"]
            ok = b.backward(**kw)
            return (ok, snapshot(net)[0])

        run(f"missing/{case}", missing)

    # FSDP2: calibrated's per-objective backwards fire FSDP2's collectives, so a missing modality raises everywhere
    def fsdp_missing():
        net = sharded(make_net(), mesh)
        b = balancer(net, net, "calibrated-per_sample")
        kw = losses(net, *local(rank, world))
        if rank == world - 1:
            del kw["unimodal"]["b"]
        return b.backward(**kw)

    run("missing/fsdp2-calibrated", fsdp_missing)

    # FSDP2, micro-batch route, Balancer built after the forward: it never saw FSDP2's unsharded parameters
    def fsdp_late_balancer():
        net = sharded(make_net(), mesh)
        kw = losses(net, *local(rank, world))
        return balancer(net, net, "calibrated-microbatch").backward(**kw)

    run("fsdp2-microbatch-late", fsdp_late_balancer)

    # a batch too small for microbatches on one rank: raised on every rank at once
    def too_small():
        net = make_net()
        xs, y = local(rank, world)
        if rank == world - 1:
            xs, y = {m: x[:1] for m, x in xs.items()}, y[:1]
        balancer(net, net, "calibrated-microbatch").backward(**losses(net, xs, y))

    run("too_small", too_small)

    # accumulation over 2 micro-steps: every call synced (all methods), or one sync per step via no_sync()
    for case in LINEAR:

        def accumulate(case=case):
            net = make_net()
            b = balancer(net, net, case)
            for seed in (1, 2):
                assert b.backward(**losses(net, *local(rank, world, seed=seed)))
            return snapshot(net)[0]

        run(f"accumulate/{case}", accumulate)

    def no_sync():
        net = make_net()
        b = balancer(net, net, "none")
        with CollectiveCounter() as inside, b.no_sync():
            assert b.backward(**losses(net, *local(rank, world, seed=1)))
        with CollectiveCounter() as after:
            assert b.backward(**losses(net, *local(rank, world, seed=2)))
        return (snapshot(net)[0], inside.count, after.count)

    run("no_sync/none", no_sync)

    # autocast bf16 (float32 model)
    for case in ["none", "calibrated-microbatch", "ogm_ge"]:

        def bf16(case=case):
            net = make_net().float()
            xs, y = local(rank, world)
            xs = {m: x.float() for m, x in xs.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                kw = losses(net, xs, y)
            assert balancer(net, net, case).backward(**kw)
            return snapshot(net)[0]

        run(f"bf16/{case}", bf16)

    # replicas initialised differently: refused on every rank, or copied from rank 0
    for replicas in ("check", "broadcast"):

        def replica(replicas=replicas):
            net = make_net(seed=rank)
            balancer(net, net, "none", replicas=replicas)
            return snapshot(net)[1]

        run(f"replicas/{replicas}", replica)


def worker(rank, world, port, path, scenarios=scenarios):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        scenarios(rank, world, out)
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn(world, path, scenarios=scenarios):
    """Run `scenarios` on `world` gloo processes (60 s timeout); every rank's recorded results."""
    mp.spawn(worker, args=(world, free_port(), path, scenarios), nprocs=world, join=True)
    return [torch.load(f"{path}.{r}", weights_only=False) for r in range(world)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the checks -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def job(request, tmp_path_factory):
    world = request.param
    return world, spawn(world, str(tmp_path_factory.mktemp(f"dist{world}") / "out"))


@pytest.fixture(scope="module")
def single():
    return {case: expected(case) for case in LINEAR}


def ok(result, name):
    if isinstance(result, tuple) and result and result[0] == "error":
        pytest.fail(f"{name}: {result[1]}: {result[2]}\n{result[3]}")
    return result


def close(got, want, what, rtol=1e-9, atol=1e-12):
    assert set(got) == set(want), what
    for n, w in want.items():
        if w is None:
            assert got[n] is None, f"{what}: {n}"
        else:
            torch.testing.assert_close(got[n], w, rtol=rtol, atol=atol, msg=f"{what}: {n}")


def same_on_every_rank(results, name):
    first = ok(results[0][name], name)
    for r, res in enumerate(results[1:], 1):
        res = ok(res[name], name)
        for a, b in zip(first[:2], res[:2]):
            close(b, a, f"{name}: rank {r} vs rank 0", rtol=0, atol=0)


@pytest.mark.parametrize("case", LINEAR)
def test_plain_process_group_equals_one_process(job, single, case):
    _, results = job
    for rank, res in enumerate(results):
        grads, params, collectives = ok(res[f"plain/{case}"], case)
        close(grads, single[case][0], f"rank {rank} .grad")
        close(params, single[case][1], f"rank {rank} parameters after 3 steps")
        # one tiny agreement + one packed all-reduce per step (the float64 model has one dtype); calibrated:
        # the agreement + reduce-scatter + all-gather (shard-local Op 4)
        # pmr: its scores and class sums are all-reduced before the objective is formed, so one more
        shard_local = case.startswith("calibrated") and case != "calibrated-precision"
        assert collectives == (3 if shard_local or case == "pmr" else 2), collectives


def test_shard_local_calibration_sends_fewer_bytes(job):
    """Reduce-scatter + Op 4 on a 1/W slice + all-gather: the same gradient as an all-reduce of the whole banks,
    for fewer bytes. Prints the bytes per step beside DDP's plain step (run with -s to see them)."""
    world, results = job
    for rank, res in enumerate(results):
        table = ok(res["bytes"], "bytes")
        scatter, reduce = table["calibrated reduce_scatter"], table["calibrated all_reduce"]
        close(scatter[2], reduce[2], f"rank {rank}: reduce_scatter vs all_reduce", rtol=1e-12, atol=1e-15)
        assert scatter[0] == 3 and reduce[0] == 2
        assert scatter[1] < reduce[1]
    ddp = table["ddp"][1]
    print(
        f"\n{world} ranks, bytes per step and rank (ratio to DDP's one all-reduce of {ddp:.0f} B): "
        + ", ".join(f"{k} {v[1]:.0f} ({v[1] / ddp:.2f}x, {v[0]} collectives)" for k, v in table.items() if k != "ddp")
    )


@pytest.mark.parametrize("case", PER_RANK)
def test_per_rank_methods_agree_across_ranks(job, case):
    same_on_every_rank(job[1], f"plain/{case}")


@pytest.mark.parametrize("view", [False, True], ids=["copy", "gradient_as_bucket_view"])
@pytest.mark.parametrize("case", LINEAR + PER_RANK)
def test_ddp(job, single, case, view):
    """DDP's reducer never runs (so no gradient is all-reduced twice) and the result is one process's."""
    _, results = job
    givens = ("ddp", "module") if case == "calibrated-per_sample" else ("ddp",)
    for given in givens:
        name = f"ddp-view={view}-{given}/{case}"
        for rank, res in enumerate(results):
            grads, params, reducer_calls, ddp_sync = ok(res[name], name)
            assert reducer_calls == 0, f"{name}: DDP's reducer all-reduced {reducer_calls} buckets"
            assert ddp_sync is True, "close() (or collection) gives DDP its gradient sync back"
            if case in single:
                close(grads, single[case][0], f"{name} rank {rank} .grad")
                close(params, single[case][1], f"{name} rank {rank} parameters")
        if case not in single:
            same_on_every_rank(results, name)


@pytest.mark.parametrize("case", LINEAR + PER_RANK)
def test_fsdp2(job, single, case):
    """One backward through FSDP2's own reduce-scatter, then shard-local statistics (one tiny all-reduce) and each
    rank works on its own shards; calibrated's per-sample route runs Op 4 shard-local (moment banks
    reduce-scattered onto each rank's shards, no all-gather); the refused cases raise at construction, naming the
    method and FSDP2."""
    _, results = job
    name = f"fsdp2/{case}"
    for rank, res in enumerate(results):
        grads, params, stats = ok(res[name], name)
        # the linear methods' stats() are summed over the ranks' shards: the same numbers on every rank, and
        # one process's (inforeg's after an epoch: its Fisher trace from the shards' partial sums)
        assert case not in single or stats == ok(results[0][name], name)[2], (
            f"{name}: rank {rank} stats differ from rank 0"
        )
        if case in single:
            close(grads, single[case][0], f"{name} rank {rank} .grad")
            close(params, single[case][1], f"{name} rank {rank} parameters")
            assert set(stats) == set(single[case][2]), (name, stats)
            for key, want in single[case][2].items():
                # calibrated's per-element means: an element whose gradient is rounding noise (a dead feature)
                # may fall on either side of t^2 = 1, so they may differ by up to 2 of the head's elements
                tol = 2 / HEAD_NUMEL if key.endswith(("/belief", "/zero_evidence")) else 1e-12
                assert stats[key] == pytest.approx(want, rel=1e-9, abs=tol), f"{name} rank {rank} stats {key}"
    if case not in single:
        same_on_every_rank(results, name)


@pytest.mark.parametrize("case", FSDP2_RAGGED)
def test_fsdp2_ragged_batches_weight_every_sample_equally(job, single, case):
    """13+11 and 9+8+7 under FSDP2: FSDP2's reduce-scatter scaled by world * N_r / N and the methods' partial sums
    give one process on the concatenated batch."""
    _, results = job
    for rank, res in enumerate(results):
        grads, params = ok(res[f"fsdp2-ragged/{case}"], case)
        close(grads, single[case][0], f"FSDP2 ragged rank {rank} .grad")
        close(params, single[case][1], f"FSDP2 ragged rank {rank} parameters")


# the dtypes each fused op documents under bf16 autocast of a float32 model: linear_moments takes the layer's
# bf16 input and output gradient and returns float32 banks; Op 4 and Ops 6-7 see the float32 gradients and banks
BF16_KERNELS = {
    "none": {},
    "ogm_ge": {"segment_moments": ["torch.float32"], "segment_scale_": ["torch.float32"]},
    "calibrated-per_sample": {"linear_moments": ["torch.bfloat16"], "calibrated_aggregate": ["torch.float32"]},
    "calibrated-microbatch": {"moments_accumulate_": ["torch.float32"], "calibrated_aggregate": ["torch.float32"]},
}


@pytest.mark.parametrize("case", BF16_FSDP2)
def test_fsdp2_autocast_bf16(job, case):
    """The forward under torch.autocast("cpu", bfloat16), float32 parameters, FSDP2: the same step as one process
    under the same autocast, to a bf16-fit tolerance (the ranks' bf16 matmuls sum fewer samples each), and the
    fused ops see the dtypes they document."""
    _, results = job
    net = make_net().float()
    want, want_dtypes = bf16_step(net, net, case, 1, *data())
    assert want_dtypes == BF16_KERNELS[case], want_dtypes
    for rank, res in enumerate(results):
        grads, dtypes = ok(res[f"fsdp2-bf16/{case}"], case)
        assert dtypes == want_dtypes, (rank, dtypes)
        assert set(grads) == set(want)
        for n, w in want.items():
            g = grads[n]
            assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), n
            # relative to the tensor's norm: bf16 carries 8 bits (eps 7.8e-3)
            error = float((g - w).norm() / w.norm().clamp(min=1e-12))
            assert error < 2e-2, f"FSDP2 bf16 {case} rank {rank} {n}: relative error {error:.2e}"


@pytest.mark.parametrize("case", ["none", "calibrated-per_sample", "ogm_ge", "greedy", "mmpareto", "i2m2"])
def test_ragged_batches_weight_every_sample_equally(job, single, case):
    _, results = job
    for rank, res in enumerate(results):
        grads, params = ok(res[f"ragged/{case}"], case)
        close(grads, single[case][0], f"ragged rank {rank} .grad")
        close(params, single[case][1], f"ragged rank {rank} parameters")


def test_nan_on_one_rank_is_skipped_or_raised_by_every_rank(job):
    _, results = job
    for res in results:
        okay, skipped, grads = ok(res["nan/skip"], "nan/skip")
        assert okay is False and skipped == 1 and all(g is None for g in grads)
        raised, message, grads = ok(res["nan/raise"], "nan/raise")
        assert raised == "raised" and all(g is None for g in grads), message


def test_missing_modality_on_one_rank(job):
    world, results = job
    for case in ["none", "calibrated-per_sample", "calibrated-microbatch"]:
        name = f"missing/{case}"
        first = ok(results[0][name], name)
        assert first[0] is True
        for r, res in enumerate(results[1:], 1):
            close(ok(res[name], name)[1], first[1], f"{name}: rank {r} vs rank 0", rtol=0, atol=0)
    # mmpareto needs every modality's loss: every rank raises, none hangs
    for rank, res in enumerate(results):
        kind, etype, message, _ = res["missing/mmpareto"]
        assert kind == "error"
        if rank == world - 1:
            assert etype == "ValueError" and "unimodal" in message, message
        else:
            assert etype == "RuntimeError" and f"rank(s) [{world - 1}]" in message, message


def test_fsdp2_missing_modality_raises_on_every_rank(job):
    world, results = job
    for rank, res in enumerate(results):
        kind, etype, message, _ = res["missing/fsdp2-calibrated"]
        assert kind == "error"
        if rank == world - 1:
            assert etype == "ValueError" and "FSDP2" in message and "'b'" in message, message
        else:
            assert etype == "RuntimeError" and f"rank(s) [{world - 1}]" in message, message


def test_fsdp2_microbatch_needs_the_forward(job):
    """A Balancer built after the forward cannot know FSDP2's unsharded parameters: a clear error on every rank."""
    for res in job[1]:
        kind, etype, message, _ = res["fsdp2-microbatch-late"]
        assert kind == "error" and etype == "ValueError", message
        assert "FSDP2" in message and "before the forward" in message, message


def test_batch_too_small_raises_on_every_rank(job):
    world, results = job
    for rank, res in enumerate(results):
        kind, etype, message, _ = res["too_small"]
        assert kind == "error"
        assert ("microbatches" in message) if rank == world - 1 else (etype == "RuntimeError"), message


@pytest.mark.parametrize("case", LINEAR)
def test_accumulation_over_two_micro_steps(job, case):
    """Each call synced: the sum of two steps, each equal to one process on that step's concatenated batch."""
    _, results = job
    method, options = method_of(case, 1)
    if case == "calibrated-microbatch":
        options = {"microbatches": K_TOTAL}
    net = make_net()
    b = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method, **options)
    for seed in (1, 2):
        b.backward(**losses(net, *data(seed)))
    want = snapshot(net)[0]
    for rank, res in enumerate(results):
        close(ok(res[f"accumulate/{case}"], case), want, f"accumulate rank {rank}")


def test_no_sync_accumulates_locally_and_syncs_once(job):
    _, results = job
    net = make_net()
    for seed in (1, 2):
        kw = losses(net, *data(seed))
        (kw["fused"].mean() + sum(v.mean() for v in kw["unimodal"].values())).backward()
    want = snapshot(net)[0]
    for rank, res in enumerate(results):
        grads, inside, after = ok(res["no_sync/none"], "no_sync")
        assert inside == 0 and after == 2, (inside, after)
        close(grads, want, f"no_sync rank {rank}")


@pytest.mark.parametrize("case", ["none", "calibrated-microbatch", "ogm_ge"])
def test_autocast_bf16(job, case):
    _, results = job
    first = ok(results[0][f"bf16/{case}"], case)
    for r, res in enumerate(results[1:], 1):
        close(ok(res[f"bf16/{case}"], case), first, f"bf16 {case}: rank {r} vs rank 0", rtol=0, atol=0)
    assert all(g is not None and torch.isfinite(g).all() for g in first.values())


def test_replicas_checked_or_broadcast(job):
    _, results = job
    for res in results:
        _, etype, message, _ = res["replicas/check"]
        assert etype == "ValueError" and "differ between ranks" in message, message
    rank0 = ok(results[0]["replicas/broadcast"], "broadcast")
    for res in results[1:]:
        close(ok(res["replicas/broadcast"], "broadcast"), rank0, "broadcast", rtol=0, atol=0)
