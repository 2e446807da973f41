"""torch.distributed (gloo, 2 CPU processes): every rank's .grad equals one process on the concatenated batch.

Rank r gets the r-th half of the batch. The moment banks (S1, S2, n), the encoder gradient banks and the plain
gradients are all-reduced inside Balancer.backward; micro-batches are per rank, so K = 2 per rank matches K = 4
in one process. Methods whose objective is nonlinear in the batch statistics (utilization: the shuffled drop of
the local batch; mimo: logsumexp of local mean losses) are per-rank by design and not compared here.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _models import SharedHeadNet, balancer_for, batch, losses

DIMS = {"a": 5, "b": 7}
N = 32
CASES = {
    "calibrated-microbatch": ("calibrated", {"microbatches": 2}, {"microbatches": 4}),
    "calibrated-per_sample": ("calibrated", {"moments": "per_sample"}, {"moments": "per_sample"}),
    "none": ("none", {}, {}),
    "ogm_ge": ("ogm_ge", {}, {}),
    "greedy": ("greedy", {"window_steps": 1, "threshold": 0.0}, {"window_steps": 1, "threshold": 0.0}),
    "mmpareto": ("mmpareto", {}, {}),
    "i2m2": ("i2m2", {}, {}),
}


def model_and_data():
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS).double()
    xs, y = batch(DIMS, N=N, seed=1)
    return net, {m: x.double() for m, x in xs.items()}, y


def run_steps(net, balancer, xs, y, steps=2):
    """Two steps, so that greedy's hold (decided after step 1) is exercised too."""
    for _ in range(steps):
        net.zero_grad(set_to_none=True)
        assert balancer.backward(**losses(net, xs, y))
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}


def worker(rank, world, port, case, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method, options, _ = CASES[case]
        net, xs, y = model_and_data()
        part = slice(rank * N // world, (rank + 1) * N // world)
        balancer = balancer_for(net, method, **options)
        result = run_steps(net, balancer, {m: x[part] for m, x in xs.items()}, y[part])
        torch.save(result, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_equal_one_process_on_the_whole_batch(case, tmp_path):
    method, _, single_options = CASES[case]
    net, xs, y = model_and_data()
    expected = run_steps(net, balancer_for(net, method, **single_options), xs, y)
    path = str(tmp_path / "grads")
    mp.spawn(worker, args=(2, free_port(), case, path), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{path}.{rank}")
        for name, g in expected.items():
            if g is None:
                assert got[name] is None, name
            else:
                torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {name}")
