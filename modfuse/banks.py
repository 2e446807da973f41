"""Flat gradient banks (docs/math.md): one contiguous buffer per group of parameters, a view per parameter.

A `FlatParams` lays a list of parameters of one device and dtype end to end: parameter p owns the elements
[offsets[p], offsets[p + 1]) of a flat [D] buffer. Every bank built on it is one contiguous tensor whose rows are
[D] buffers, so one launch of a fused op covers all the parameters (as DDP's gradient_as_bucket_view does for
all-reduce):

- `MomentBank`: S1[M, D] and S2[M, D] (sums and sums of squares of samples, float32 or float64) and n[M] for
  calibrated_aggregate; each modality row has a view per parameter.
- `FlatParams.grad_rows(R)`: an [R, D] buffer in the parameters' dtype whose rows are gradients of several
  objectives (mmpareto), or whose row 0 serves as the parameters' `.grad` (ogm_ge, greedy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modfuse import reference


class FlatParams:
    """Parameters of one device and dtype, laid end to end: the index of every bank built on them."""

    def __init__(self, params: Sequence[torch.nn.Parameter], names: Sequence[str]):
        if not params:
            raise ValueError("FlatParams needs at least one parameter")
        self.params = list(params)
        self.names = list(names)
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        for p, name in zip(self.params, self.names):
            if p.device != self.device or p.dtype != self.dtype:
                raise ValueError(
                    f"parameter {name!r} is {p.dtype} on {p.device}; a FlatParams group holds one "
                    f"dtype and device ({self.dtype} on {self.device})"
                )
        sizes = [p.numel() for p in self.params]
        self.offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0)
        self.numel = int(self.offsets[-1])
        self._bounds = [(int(a), int(b)) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat [D] buffer shaped like each parameter (no copy)."""
        return [flat[a:b].view(p.shape) for (a, b), p in zip(self._bounds, self.params)]

    def grad_rows(self, rows: int) -> torch.Tensor:
        """A zeroed [rows, D] buffer in the parameters' dtype, for gradients of `rows` objectives."""
        return torch.zeros(rows, self.numel, device=self.device, dtype=self.dtype)

    def flatten_into(self, out: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Copy per-parameter tensors into the flat [D] buffer `out`; None (an unreached parameter) gives zeros."""
        for view, t in zip(self.views(out), tensors):
            if t is None:
                view.zero_()
            else:
                view.copy_(t)
        return out


class MomentBank:
    """Per-modality moment banks S1[M, D], S2[M, D] and counts n[M] of one FlatParams group.

    Banks are float32 (float64 for float64 parameters) whatever the gradient dtype, as Op 2 requires (docs/math.md).
    Summing them over ranks (modfuse.groups) gives the statistics of the global batch.
    """

    def __init__(self, layout: FlatParams, rows: int, allocate=None):
        """`allocate(purpose, shape, dtype, device)` gives zeroed buffers (default: fresh ones; the methods pass
        Groups.buffer so that the banks persist across steps)."""
        self.layout = layout
        acc = reference.accumulation_dtype(layout.dtype)
        allocate = allocate or (lambda _, shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
        self.S1 = allocate(("S1", id(layout)), (rows, layout.numel), acc, layout.device)
        self.S2 = allocate(("S2", id(layout)), (rows, layout.numel), acc, layout.device)
        self.n = allocate(("n", id(layout)), (rows,), acc, layout.device)

    def zero_(self) -> None:
        self.S1.zero_()
        self.S2.zero_()
        self.n.zero_()

    def row_views(self, bank: torch.Tensor, row: int) -> list[torch.Tensor]:
        """Per-parameter views of one modality's row of S1 or S2."""
        return self.layout.views(bank[row])
