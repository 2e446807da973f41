"""The training-loop API: `Balancer`, one object per model and one call per step in place of `loss.backward()`.

    balancer = modfuse.Balancer(model, encoders={"audio": model.audio, "video": model.video},
                                shared=model.head, method="calibrated")
    ...
    if balancer.backward(fused=loss_mm, unimodal={"audio": loss_a, "video": loss_v}):
        optimizer.step()

Losses are per-sample vectors [N] (reduction="none") or scalars; the gradients left in `.grad` are on the scale of
the mean-reduced losses, exactly as `loss.mean().backward()` gives them, so any torch.optim optimizer and learning
rate carries over. Methods that need statistics over samples (calibrated) require the per-sample vectors.

Parameter groups: `encoders` maps each modality name to its encoder (a module or parameters); `shared` holds the
parameters every modality's objective reaches (a classifier head applied to each embedding and to the fusion, a
shared trunk); every other trainable parameter of `model` gets its plain gradient. The method (modfuse.methods)
decides how the groups' gradients are formed.

Gradient accumulation works as with `loss.backward()`: a call adds its contribution to whatever `.grad` holds.
A call is all-or-nothing: if it raises (or skips a non-finite loss), every `.grad` is left as it was before.
Under torch.distributed (initialised, world size > 1) every rank ends with the same gradients: the moment banks
(S1, S2, n) and the encoder gradient banks are all-reduced (one collective per bank) before the fused ops run, and
plain gradients are averaged. Do not wrap the model in DistributedDataParallel as well.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch

from modfuse import methods as _methods
from modfuse.banks import FlatParams, all_reduce_sum_, distributed

ON_NONFINITE = ("skip", "raise")


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

    @staticmethod
    def mean(loss: torch.Tensor) -> torch.Tensor:
        return loss.mean() if loss.dim() else loss

    def named_losses(self) -> list[tuple[str, torch.Tensor]]:
        """The losses that were passed, named as error messages name them."""
        return ([("fused", self.fused)] if self.fused is not None else []) + \
            [(f"unimodal[{m!r}]", v) for m, v in self.unimodal.items()]

    def objectives(self) -> list[tuple[str, torch.Tensor]]:
        """The per-modality objectives in modality order, then the fused one: the rows of a moment bank."""
        rows = list(self.unimodal.items())
        if self.fused is not None:
            rows.append(("fused", self.fused))
        return rows


def _named(model: torch.nn.Module, what, group: str, names: dict[int, str]) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable (name, parameter) pairs of a module or an iterable of parameters, all belonging to `model`."""
    params = what.parameters() if isinstance(what, torch.nn.Module) else what
    if isinstance(params, torch.Tensor):
        params = [params]
    out = []
    for p in params:
        if not isinstance(p, torch.nn.Parameter):
            raise TypeError(f"{group} must be a module or an iterable of nn.Parameter, got an item of type "
                            f"{type(p).__name__}")
        if id(p) not in names:
            raise ValueError(f"a parameter of {group} (shape {tuple(p.shape)}) is not a parameter of the model "
                             "given to Balancer")
        if p.requires_grad:
            out.append((names[id(p)], p))
    return out


class Balancer:
    """Balanced multimodal training in one call per step (see the module docstring).

    Args:
        model: the whole model; its trainable parameters outside `shared` and `encoders` get plain gradients.
        encoders: modality name -> that modality's encoder (module or iterable of parameters). The names are the
            keys of the `unimodal` and `logits` dicts given to `backward`. At most 16 modalities.
        shared: parameters reached by every modality's objective (module or iterable), used by "calibrated".
        method: one of modfuse.methods.names(): "none", "calibrated", "ogm_ge", "greedy", "mmpareto",
            "utilization", "mimo", "i2m2".
        on_nonfinite: a NaN/Inf loss either skips the step with a warning ("skip": backward returns False and
            no gradient, method state or counter changes) or raises FloatingPointError ("raise").
        **options: the method's options (see its class docstring), e.g. alpha=0.8 for "ogm_ge".
    """

    def __init__(self, model: torch.nn.Module, encoders: Mapping[str, object], shared=None,
                 method: str = "calibrated", *, on_nonfinite: str = "skip", **options):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(encoders, Mapping) or not encoders:
            raise ValueError("encoders must be a non-empty mapping of modality name -> encoder module or parameters")
        if len(encoders) > 16:
            raise ValueError(f"at most 16 modalities are supported, got {len(encoders)} encoders")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        self.model = model
        self.on_nonfinite = on_nonfinite
        self.names = names = {id(p): n for n, p in model.named_parameters()}
        self.modalities = [str(m) for m in encoders]
        self.encoders = {str(m): _named(model, e, f"encoders[{m!r}]", names) for m, e in encoders.items()}
        self.shared = _named(model, shared, "shared", names) if shared is not None else []
        owner: dict[int, str] = {}
        for group, pairs in [(f"encoders[{m!r}]", ps) for m, ps in self.encoders.items()] + [("shared", self.shared)]:
            for name, p in pairs:
                if id(p) in owner:
                    raise ValueError(f"parameter {name!r} is in both {owner[id(p)]} and {group}: each parameter "
                                     "may belong to one group only")
                owner[id(p)] = group
        self.others = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
        self.trainable = [p for _, ps in self.encoders.items() for _, p in ps] + \
                         [p for _, p in self.shared] + [p for _, p in self.others]
        # The groups never change: lay each encoder out once, not on every step.
        self.encoder_layouts = {m: self.layouts(pairs) for m, pairs in self.encoders.items()}
        self.steps = 0          # steps taken (skipped steps not counted)
        self.skipped = 0        # steps skipped for a non-finite loss
        self.epoch = 0          # epochs finished (Balancer.end_epoch)
        self.method = _methods.create(method, self, **options)
        # A frozen encoder (the utilization paper trains fusion layers on frozen encoders) is fine unless the
        # method acts on encoder gradients.
        for m, pairs in self.encoders.items():
            if not pairs and self.method.modulates_encoders:
                raise ValueError(f"encoders[{m!r}] has no trainable parameters, but method {method!r} acts on "
                                 "encoder gradients")

    # -- groups as flat layouts -------------------------------------------------------------------------------
    def layouts(self, pairs: list[tuple[str, torch.nn.Parameter]]) -> list[FlatParams]:
        """Split (name, param) pairs into one FlatParams per (device, dtype), in order."""
        groups: dict[tuple, list] = {}
        for name, p in pairs:
            groups.setdefault((p.device, p.dtype), []).append((name, p))
        return [FlatParams([p for _, p in g], [n for n, _ in g]) for g in groups.values()]

    # -- the step ---------------------------------------------------------------------------------------------
    def backward(self, fused: torch.Tensor | None = None, unimodal: Mapping[str, torch.Tensor] | None = None, *,
                 logits: Mapping[str, torch.Tensor] | None = None, fused_logits: torch.Tensor | None = None,
                 target: torch.Tensor | None = None, forward: Callable | None = None,
                 inputs: Mapping | None = None) -> bool:
        """Compute this step's gradients into `.grad` (adding to what is there). Returns False if skipped.

        Args:
            fused: the fused objective, per sample [N] (reduction="none") or a scalar.
            unimodal: modality -> that modality's objective ([N] or scalar), e.g. the loss of the shared head
                applied to the modality's embedding. Passed losses are added to the objective (methods say where
                they differ).
            logits: modality -> unimodal logits [N, C] (ogm_ge scores, i2m2).
            fused_logits: the fused logits [N, C] (utilization, i2m2).
            target: class labels [N] (ogm_ge, utilization, i2m2).
            forward: inputs dict -> fused logits, and inputs: the step's modality -> input dict (utilization
                re-runs the model with one modality shuffled across the batch).
        """
        step = self._step(fused, unimodal, logits, fused_logits, target, forward, inputs)
        total = self.method.objective(step)
        if not self._finite(step, total):
            return False
        saved = {p: p.grad for p in self.trainable}
        for p in self.trainable:
            p.grad = None
        try:
            self.method.backward(step, total)
            self._check_reached()
        except BaseException:
            for p, g in saved.items():
                p.grad = g
            raise
        self._add_back(saved)
        self.steps += 1
        return True

    def end_epoch(self) -> None:
        """Tell the methods an epoch ended (greedy's window, utilization's lambda schedule)."""
        self.epoch += 1
        self.method.end_epoch(self.epoch)

    def stats(self) -> dict[str, float]:
        """The method's statistics of the last step, as Python numbers (synchronises a GPU)."""
        return self.method.stats()

    def state_dict(self) -> dict:
        return {"steps": self.steps, "skipped": self.skipped, "epoch": self.epoch,
                "method": type(self.method).name, "method_state": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("method") != type(self.method).name:
            raise ValueError(f"the state is of method {state.get('method')!r}, this Balancer runs "
                             f"{type(self.method).name!r}")
        self.steps, self.skipped, self.epoch = int(state["steps"]), int(state["skipped"]), int(state["epoch"])
        self.method.load_state_dict(state["method_state"])

    # -- helpers for methods ----------------------------------------------------------------------------------
    def sync_plain_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of `params` over ranks: one collective per (device, dtype) of flat gradients."""
        if not distributed():
            return
        world = torch.distributed.get_world_size()
        pairs = [(self.names[id(p)], p) for p in params if p.grad is not None]
        for layout in self.layouts(pairs) if pairs else []:
            flat = layout.grad_rows(1)[0]
            layout.flatten_into(flat, [p.grad for p in layout.params])
            all_reduce_sum_(flat).div_(world)
            for p, v in zip(layout.params, layout.views(flat)):
                p.grad.copy_(v)

    def name_of(self, p: torch.nn.Parameter) -> str:
        return self.names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")

    # -- internals --------------------------------------------------------------------------------------------
    def _step(self, fused, unimodal, logits, fused_logits, target, forward, inputs) -> Step:
        for arg, value in (("unimodal", unimodal), ("logits", logits)):
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"{arg} must be a dict of modality name -> tensor (keys "
                                f"{', '.join(map(repr, self.modalities))}), got {type(value).__name__}")
        unimodal = dict(unimodal or {})
        logits = dict(logits or {})
        for arg, d in (("unimodal", unimodal), ("logits", logits)):
            unknown = [k for k in d if k not in self.modalities]
            if unknown:
                raise ValueError(f"{arg} has key {unknown[0]!r}, which is not a modality of this Balancer "
                                 f"({', '.join(map(repr, self.modalities))})")
        # Keep modality order (it is the row order of the banks).
        unimodal = {m: unimodal[m] for m in self.modalities if m in unimodal}
        logits = {m: logits[m] for m in self.modalities if m in logits}
        step = Step(fused, unimodal, logits, fused_logits, target, forward, inputs)
        losses = step.named_losses()
        if not losses and self.method.needs_loss:
            raise ValueError("backward needs a loss: pass fused= and/or unimodal=")
        for name, loss in losses:
            if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {type(loss).__name__}")
            if loss.dim() > 1:
                raise ValueError(f"{name} must be a per-sample vector [N] or a scalar, got shape {tuple(loss.shape)}")
            if not loss.requires_grad:
                raise ValueError(f"{name} does not require grad: compute it from the model's outputs with "
                                 "autograd enabled")
        for need in self.method.requires:
            value = getattr(step, need)
            if value is None or (isinstance(value, dict) and set(value) != set(self.modalities)):
                what = f"a value for every modality ({', '.join(self.modalities)})" if isinstance(value, dict) else "it"
                raise ValueError(f"method {type(self.method).name!r} needs {need}= in backward: pass {what}")
        return step

    def _finite(self, step: Step, total: torch.Tensor) -> bool:
        """One host sync: are all losses finite? Skip (warn) or raise, naming the first bad one."""
        named = step.named_losses() + [("total objective", total)]
        flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
        if bool(flags.all()):
            return True
        bad = next(name for (name, _), ok in zip(named, flags.tolist()) if not ok)
        message = (f"the {bad} loss is NaN or Inf at step {self.steps}; ")
        self.method.on_skip()
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message + "no gradient was changed (on_nonfinite='raise')")
        self.skipped += 1
        warnings.warn(message + "the step is skipped: no gradient, method state or counter changed; do not call "
                      "optimizer.step() for it (backward returned False)", RuntimeWarning, stacklevel=3)
        return False

    def _check_reached(self) -> None:
        """Every encoder and shared parameter must have received a gradient (unless the method held it)."""
        held = getattr(self.method, "held_params", set())
        for group, pairs in [(f"encoders[{m!r}]", ps) for m, ps in self.encoders.items()] + [("shared", self.shared)]:
            for name, p in pairs:
                if p.grad is None and id(p) not in held:
                    raise ValueError(f"parameter {name!r} of {group} received no gradient from the losses of this "
                                     "step: remove it from the group, freeze it (requires_grad=False), or make the "
                                     "objectives depend on it")

    @staticmethod
    def _add_back(saved: dict) -> None:
        """Gradient accumulation: add what .grad held before the call to this call's contribution."""
        news, olds = [], []
        for p, old in saved.items():
            if old is None:
                continue
            if p.grad is None:
                p.grad = old
            else:
                news.append(p.grad)
                olds.append(old)
        if news:
            torch._foreach_add_(news, olds)
