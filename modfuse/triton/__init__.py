"""Triton kernels of modfuse (Ops 1, 3, 4 and 5), one op per file, each registered as a `torch.library.triton_op`
under `torch.ops.modfuse_triton.<op>` with `wrap_triton` launches, so `torch.compile` traces into them.

They run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before
triton is imported; slow, and without bfloat16 arithmetic: the CPU tests use it on small shapes). Import is lazy:
`modfuse.ops` loads this package only when the "triton" backend is chosen.
"""

from __future__ import annotations

import importlib.util
import os

import torch

OPS = ("segment_sq_norms", "linear_moments", "calibrated_aggregate", "gram")
_loaded = False


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run tensors on `device` here."""
    if not installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def load() -> None:
    """Import the kernels (registers torch.ops.modfuse_triton.*)."""
    global _loaded
    if not _loaded:
        from modfuse.triton import calibrated_aggregate, gram, linear_moments, segment_sq_norms  # noqa: F401

        _loaded = True


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
