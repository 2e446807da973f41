"""Balancing methods (docs/math.md#methods), one small file each, registered by name.

A method decides two things for a `modfuse.Balancer` step:
- `objective(step)`: the scalar loss of the step (the fused loss, plus the unimodal losses the caller passed,
  plus whatever the method adds or replaces);
- `backward(step, total)`: how gradients reach `.grad` (plain backward, per-objective backwards combined by a
  fused op, modulation of encoder gradients afterwards).

Methods are built only on modfuse.ops. `create(name, balancer, **options)` builds one; `METHODS` lists them.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from modfuse.banks import FlatParams, all_reduce_sum_, distributed

if TYPE_CHECKING:  # pragma: no cover
    from modfuse.autograd import Balancer, Step

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
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

    def __init__(self, balancer: "Balancer"):
        self.balancer = balancer

    # -- the two decisions ----------------------------------------------------------------------------------
    def objective(self, step: "Step") -> torch.Tensor:
        """fused + the sum of the unimodal losses that were passed (each mean-reduced)."""
        losses = ([step.fused] if step.fused is not None else []) + list(step.unimodal.values())
        return sum(step.mean(loss) for loss in losses[1:]) + step.mean(losses[0])

    def backward(self, step: "Step", total: torch.Tensor) -> None:
        params = self.balancer.trainable
        torch.autograd.backward(total, inputs=params)
        self.balancer.sync_plain_grads(params)

    def backward_into_banks(self, total: torch.Tensor, rows: int = 1) -> dict[str, list[tuple[FlatParams, torch.Tensor]]]:
        """Plain backward of `total` with every encoder's gradients landing in one flat bank per encoder.

        For each encoder (and each device/dtype inside it) a fresh [rows, D] buffer is made and the `.grad` of
        its parameters are set to views of row 0 before the backward, so autograd accumulates straight into the
        bank (DDP's gradient_as_bucket_view) and a method can then modulate all of an encoder's gradients with
        one launch. Rows 1.. are free for the method. Encoder parameters the backward did not reach get
        `.grad = None` (the Balancer then reports them). Under torch.distributed the banks are averaged over
        ranks, one collective per bank, and the other parameters' gradients too.
        """
        balancer = self.balancer
        banks = {m: [(layout, layout.grad_rows(rows)) for layout in layouts]
                 for m, layouts in balancer.encoder_layouts.items()}
        reached: set[int] = set()
        handles = []
        for layouts in banks.values():
            for layout, buf in layouts:
                for p, view in zip(layout.params, layout.views(buf[0])):
                    p.grad = view
                    handles.append(p.register_post_accumulate_grad_hook(lambda q: reached.add(id(q))))
        try:
            torch.autograd.backward(total, inputs=balancer.trainable)
        finally:
            for handle in handles:
                handle.remove()
        encoder_ids = set()
        for layouts in banks.values():
            for layout, buf in layouts:
                encoder_ids.update(id(p) for p in layout.params)
                for p in layout.params:
                    if id(p) not in reached:
                        p.grad = None
                if distributed():
                    all_reduce_sum_(buf[0]).div_(torch.distributed.get_world_size())
        balancer.sync_plain_grads([p for p in balancer.trainable if id(p) not in encoder_ids])
        return banks

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


def create(name: str, balancer: "Balancer", **options) -> Method:
    """Build the method registered as `name` with its options (each method documents its own)."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(map(repr, sorted(_REGISTRY)))}")
    cls = _REGISTRY[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "balancer")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options are "
                        f"{', '.join(map(repr, allowed)) or 'none'}")
    return cls(balancer, **options)


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def _load_all() -> None:
    # Importing the modules registers them; kept lazy so that `import modfuse` stays light.
    from modfuse.methods import (  # noqa: F401
        calibrated,
        greedy,
        i2m2,
        mimo,
        mmpareto,
        none,
        ogm_ge,
        utilization,
    )
