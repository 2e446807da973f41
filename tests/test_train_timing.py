"""The trainer's "modfuse ms": every public op is timed, a stage that calls an op inside it is counted once, and
the module attributes are restored afterwards."""

from __future__ import annotations

import time

import torch

from modfuse import ops
from modfuse.methods import calibrated as calibrated_module
from modfuse.train.timing import op_timer


def test_every_public_op_is_wrapped_and_restored():
    before = {name: getattr(ops, name) for name in ops.OPS}
    with op_timer(torch.device("cpu")):
        assert all(getattr(ops, name) is not before[name] for name in ops.OPS)
    assert all(getattr(ops, name) is before[name] for name in ops.OPS)


def test_a_stage_calling_an_op_is_counted_once():
    M, D = 3, 2_000_000
    S1, S2 = torch.randn(M, D), torch.rand(M, D) + 1
    n = torch.full((M,), 8.0)
    with op_timer(torch.device("cpu")) as spent:
        start = time.perf_counter()
        for _ in range(3):
            calibrated_module.calibrate(S1, S2, n, 1.0, 1e-12, 1e6)
        wall = time.perf_counter() - start
    # counting calibrate and the calibrated_aggregate inside it would give about twice the wall time
    assert 0 < spent[0] <= wall


def test_tensor_sq_norms_is_timed():
    xs = [torch.randn(1000, 100) for _ in range(4)]
    with op_timer(torch.device("cpu")) as spent:
        ops.tensor_sq_norms(xs)
    assert spent[0] > 0
