"""Time spent inside modfuse's fused ops during a training step (the "modfuse" part of the step time)."""

from __future__ import annotations

import contextlib
import time

import torch

from modfuse import ops
from modfuse.methods import calibrated as calibrated_module

OP_NAMES = ops.OPS  # every public op, by its name in modfuse.ops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def op_timer(device: torch.device):
    """Wrap the fused ops, as the methods call them, to add up the seconds spent inside them.

    Yields a one-element list holding the running total. The methods call the ops through the `modfuse.ops`
    module (and calibrated through its `calibrate`, or `calibrate_precision`, the plain-PyTorch statistics stage of
    evidence="precision", timed in the same place so the two forms compare), so wrapping those attributes catches
    every call; they are restored on exit. On a GPU each call is synchronised, which serialises it: use this for a time split, not
    for peak throughput.
    """
    spent = [0.0]
    depth = [0]  # a stage calls an op inside it (calibrate -> calibrated_aggregate): count the outermost call only

    def wrap(fn):
        def timed(*args, **kwargs):
            if depth[0]:
                return fn(*args, **kwargs)
            synchronize(device)
            start = time.perf_counter()
            depth[0] += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                depth[0] -= 1
            synchronize(device)
            spent[0] += time.perf_counter() - start
            return out

        return timed

    saved = {name: getattr(ops, name) for name in OP_NAMES}
    stages = ("calibrate", "calibrate_precision")
    saved_stages = {name: getattr(calibrated_module, name) for name in stages}
    for name, fn in saved.items():
        setattr(ops, name, wrap(fn))
    for name, fn in saved_stages.items():
        setattr(calibrated_module, name, wrap(fn))
    try:
        yield spent
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
        for name, fn in saved_stages.items():
            setattr(calibrated_module, name, fn)
