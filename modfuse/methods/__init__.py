"""Balancing methods (docs/math.md#methods), one small file each, registered by name.

A method decides two things for a `modfuse.Balancer` step:
- `objective(step)`: the scalar loss of the step (the fused loss, plus the unimodal losses the caller passed,
  plus whatever the method adds or replaces);
- `backward(step, total)`: how gradients reach `.grad` (plain backward, per-objective backwards combined by a
  fused op, modulation of encoder gradients afterwards).

Methods are built on modfuse.ops and the groups layer (modfuse.groups: parameter groups, gradient capture into
flat banks, collectives) only; they never see the Balancer. `create(name, groups, **options)` builds one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from modfuse.groups import Groups


@dataclass
class Step:
    """What one Balancer.backward call was given. Methods read the fields they need."""

    fused: torch.Tensor | None
    unimodal: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    fused_logits: torch.Tensor | None = None
    target: torch.Tensor | None = None
    forward: Callable | None = None
    inputs: Mapping | None = None
    epoch: int = 0  # epochs finished before this step
    #: modality -> unimodal embedding [N, d_m] (pmr's prototypes), with its graph
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per objective row (modalities, then "fused"): samples over all ranks that have it (set by the Balancer)
    row_samples: dict[str, float] = field(default_factory=dict)
    #: per objective row: how many ranks have it
    row_ranks: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def mean(loss: torch.Tensor) -> torch.Tensor:
        return loss.mean() if loss.dim() else loss

    def named_losses(self) -> list[tuple[str, torch.Tensor]]:
        """The losses that were passed, named as error messages name them."""
        return ([("fused", self.fused)] if self.fused is not None else []) + [
            (f"unimodal[{m!r}]", v) for m, v in self.unimodal.items()
        ]

    def objectives(self) -> list[tuple[str, torch.Tensor]]:
        """The per-modality objectives in modality order, then the fused one: the rows of a moment bank."""
        rows = list(self.unimodal.items())
        if self.fused is not None:
            rows.append(("fused", self.fused))
        return rows

    def batch_size(self) -> int:
        """N of this step: the length of a per-sample loss, else of target / logits; 1 for scalar losses only."""
        for t in [self.fused, *self.unimodal.values(), self.target, self.fused_logits, *self.logits.values()]:
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                return int(t.shape[0])
        return 1


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    _REGISTRY[cls.name] = cls
    return cls


class Method:
    """Base class: plain backward of the objective (what `loss.backward()` would do), plus distributed sync."""

    name = "base"
    #: Step fields that must be given to Balancer.backward for this method (checked before any work).
    requires: tuple[str, ...] = ("fused",)
    #: False when the method forms its objective from logits alone (i2m2).
    needs_loss = True
    #: True when the method acts on encoder gradients (so every encoder must have trainable parameters).
    modulates_encoders = False
    #: True when every gradient is the plain gradient of the objective (so no_sync() accumulation is exact).
    plain_gradients = True
    #: False when the method cannot run under FSDP2 (it needs several backwards or whole-group gradients).
    fsdp2 = True

    def __init__(self, groups: Groups):
        self.groups = groups
        # (parameters, bounds) from this step's own reductions: every |.grad| element of those parameters is at
        # most max(bounds), so the Balancer's finite check need not read them again (Groups.check_finite).
        # Emptied by the Balancer before each backward.
        self.proven: list[tuple[list, torch.Tensor]] = []
        if groups.fsdp and not self.fsdp2:
            raise ValueError(
                f"method {self.name!r} cannot run under FSDP2 (fully_shard) yet: it needs several "
                "backwards per step or the whole gradient of a group on every rank; use "
                "DistributedDataParallel, or a built-in method (all of them run under FSDP2)"
            )

    # -- the two decisions ----------------------------------------------------------------------------------
    def objective(self, step: Step) -> torch.Tensor:
        """fused + the sum of the unimodal losses that were passed (each mean-reduced)."""
        losses = ([step.fused] if step.fused is not None else []) + list(step.unimodal.values())
        return sum(step.mean(loss) for loss in losses[1:]) + step.mean(losses[0])

    def check(self, step: Step) -> None:
        """Raise on a step this method cannot take, before anything runs (errors are agreed by all ranks)."""

    def backward(self, step: Step, total: torch.Tensor) -> None:
        # one plain backward whose gradients are only reduced: the all-reduces start during it (bucketed)
        self.groups.backward_reduced(total)

    # -- training-loop hooks and state ----------------------------------------------------------------------
    def on_skip(self) -> None:
        """The step whose objective was just formed is skipped (non-finite loss): undo what objective() changed."""

    def end_epoch(self, epoch: int) -> None:
        """Called by Balancer.end_epoch; `epoch` is the number of epochs finished."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def stats(self) -> dict[str, float]:
        """Statistics of the last step, as Python numbers (for logging)."""
        return {}

    def close(self) -> None:
        """Remove whatever the method attached to the model (hooks)."""


def wire_dtype(groups: Groups) -> torch.dtype:
    """The dtype for a method's small sums (scores, counts) that travel with the encoder gradients in a collective:
    the banks' dtype when it is float32/float64 (they then ride in the gradients' collective), else float64; and
    float64 when no collective runs (one process, inside no_sync(), FSDP2's separate tiny all-reduce)."""
    dtype = groups.encoder_layouts[groups.modalities[0]][0].dtype
    reduced_with_grads = groups.distributed and groups.synced and not groups.fsdp
    return dtype if reduced_with_grads and dtype in (torch.float32, torch.float64) else torch.float64


def reduce_encoder_banks(groups: Groups, total: torch.Tensor, rows: int = 1, summed=()):
    """Plain backward with every encoder's gradients in flat banks (row 0 = `.grad`), then one packed
    collective for the banks, every other gradient and `summed`; unreached parameters end with `.grad = None`.
    Under a process group or DDP the collectives start while the backward runs (Groups.backward_into_banks_reduced:
    bucketed, a bank all-reduced as soon as its gradients are in, `summed` in the last bucket)."""
    if groups.distributed and groups.synced and not groups.fsdp:
        return groups.backward_into_banks_reduced(total, rows, summed)
    banks, reached = groups.backward_into_banks(total, rows)
    entries = [(layout, buf) for layouts in banks.values() for layout, buf in layouts]
    if not groups.distributed or not groups.synced:  # no collective: reached here is reached everywhere
        for layout, _ in entries:
            for p in layout.params:
                if id(p) not in reached:
                    p.grad = None
        return banks
    flags = [
        torch.tensor([float(id(p) in reached) for p in layout.params], dtype=buf.dtype, device=buf.device)
        for layout, buf in entries
    ]
    encoder_ids = {id(p) for layout, _ in entries for p in layout.params}
    others = [p for p in groups.trainable if id(p) not in encoder_ids]
    pairs, flats, others_reached = groups.grads_to_reduce(others)
    groups.all_reduce_(
        weighted=[*(buf[0] for _, buf in entries), *flats],
        summed=[*flags, *summed, *([] if others_reached is None else [others_reached])],
    )
    groups.finish_grads(pairs, others_reached)
    for (layout, _), flag in zip(entries, flags):
        for p, f in zip(layout.params, flag.tolist()):
            if f == 0:
                p.grad = None
    return banks


def create(name: str, groups: Groups, **options) -> Method:
    """Build the method registered as `name` with its options (each method documents its own)."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(map(repr, sorted(_REGISTRY)))}")
    cls = _REGISTRY[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "groups")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options are "
            f"{', '.join(map(repr, allowed)) or 'none'}"
        )
    return cls(groups, **options)


def get(name: str) -> type[Method]:
    """The class registered as `name` (its `requires`, options and defaults), for callers that inspect methods."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(map(repr, sorted(_REGISTRY)))}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def _load_all() -> None:
    # Importing the modules registers them; kept lazy so that `import modfuse` stays light.
    from modfuse.methods import (  # noqa: F401
        agm,
        calibrated,
        cggm,
        greedy,
        i2m2,
        inforeg,
        mimo,
        mmpareto,
        none,
        ogm_ge,
        pmr,
        utilization,
    )
