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
Under torch.distributed (a plain process group, DistributedDataParallel or FSDP2) every rank ends with the
gradients one process would compute on the concatenated batch (modfuse.groups says how, README "Distributed").
The Balancer composes the groups layer (modfuse.groups: parameter groups, banks, collectives) and a method.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Mapping

import torch

from modfuse import methods as _methods
from modfuse.groups import Groups, NonFiniteGradient, distributed
from modfuse.methods import Step

ON_NONFINITE = ("skip", "raise")


class Balancer:
    """Balanced multimodal training in one call per step (see the module docstring).

    Args:
        model: the whole model (or the DistributedDataParallel / fully_shard module wrapping it); its trainable
            parameters outside `shared` and `encoders` get plain gradients.
        encoders: modality name -> that modality's encoder (module or iterable of parameters). The names are the
            keys of the `unimodal` and `logits` dicts given to `backward`. At most 16 modalities.
        shared: parameters reached by every modality's objective (module or iterable), used by "calibrated".
        method: one of modfuse.methods.names(): "none", "calibrated", "ogm_ge", "greedy", "mmpareto",
            "utilization", "mimo", "i2m2", "agm", "inforeg", "pmr", "cggm".
        on_nonfinite: a NaN/Inf loss, or a NaN/Inf in a gradient the Balancer wrote, either skips the step with a
            warning ("skip": backward returns False and no gradient, method state or counter changes) or raises
            FloatingPointError ("raise"). Under torch.distributed all ranks decide together.
        replicas: under a plain process group, "check" (default) raises at construction if the parameters differ
            between ranks, "broadcast" copies rank 0's, "trust" does neither (DDP and FSDP2 handle it themselves).
        bucket_cap_mb: under a plain process group or DDP, the megabytes of gradients per all-reduce (default 25,
            DDP's): methods whose step is one plain backward start each bucket's all-reduce during the backward,
            as soon as its gradients are in (`float("inf")`: one all-reduce per dtype when the backward ends).
        **options: the method's options (see its class docstring), e.g. alpha=0.8 for "ogm_ge".

    The Balancer is a context manager; `close()` (or leaving the `with` block) removes its hooks from the model
    and gives DDP its own gradient sync back.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        encoders: Mapping[str, object],
        shared=None,
        method: str = "calibrated",
        *,
        on_nonfinite: str = "skip",
        replicas: str = "check",
        bucket_cap_mb: float = 25.0,
        **options,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(encoders, Mapping) or not encoders:
            raise ValueError("encoders must be a non-empty mapping of modality name -> encoder module or parameters")
        if len(encoders) > 16:
            raise ValueError(f"at most 16 modalities are supported, got {len(encoders)} encoders")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.steps = 0  # steps taken (skipped steps not counted)
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.epoch = 0  # epochs finished (Balancer.end_epoch)
        self.groups = groups = Groups(model, encoders, shared, replicas=replicas, bucket_cap_mb=bucket_cap_mb)
        try:
            self.method = _methods.create(method, groups, **options)
            # A frozen encoder (the utilization paper trains fusion layers on frozen encoders) is fine unless the
            # method acts on encoder gradients.
            for m, pairs in groups.encoders.items():
                if not pairs and self.method.modulates_encoders:
                    raise ValueError(
                        f"encoders[{m!r}] has no trainable parameters, but method {method!r} acts on encoder gradients"
                    )
        except BaseException:
            groups.close()
            raise

    # the groups, under the names the Balancer always had
    model = property(lambda self: self.groups.model)
    modalities = property(lambda self: self.groups.modalities)
    encoders = property(lambda self: self.groups.encoders)
    shared = property(lambda self: self.groups.shared)
    others = property(lambda self: self.groups.others)
    trainable = property(lambda self: self.groups.trainable)

    # -- the step ---------------------------------------------------------------------------------------------
    def backward(
        self,
        fused: torch.Tensor | None = None,
        unimodal: Mapping[str, torch.Tensor] | None = None,
        *,
        logits: Mapping[str, torch.Tensor] | None = None,
        fused_logits: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        forward: Callable | None = None,
        inputs: Mapping | None = None,
        features: Mapping[str, torch.Tensor] | None = None,
    ) -> bool:
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
            features: modality -> that modality's embedding [N, d_m], with its graph (pmr's prototypes).
        """
        groups = self.groups
        method_state = _copy_state(self.method.state_dict())
        step, total, bad_loss, error = None, None, None, None
        # Everything that may differ between ranks is decided locally first, then agreed in one tiny all-reduce,
        # so that ranks raise or skip together instead of leaving the others waiting in a collective.
        try:
            step = self._step(fused, unimodal, logits, fused_logits, target, forward, inputs, features)
            self.method.check(step)
            total = self.method.objective(step)
            bad_loss = self._nonfinite_loss(step, total)
        except Exception as e:
            if not distributed():
                self.method.load_state_dict(method_state)
                raise
            error = e
        rows = (
            (
                [step.batch_size() if m in step.unimodal else 0 for m in self.modalities]
                + [step.batch_size() if step.fused is not None else 0]
            )
            if step is not None
            else [0] * (len(self.modalities) + 1)
        )
        agreed = groups.agree(error is not None, bad_loss is not None, step.batch_size() if step else 0, rows)
        if error is not None or agreed.failed_ranks:
            self.method.load_state_dict(method_state)
            if error is not None:
                raise error
            raise RuntimeError(
                f"Balancer.backward raised on rank(s) {agreed.failed_ranks} at step {self.steps} "
                "(see their error); this rank stops too, no gradient was changed"
            )
        names = self.modalities + ["fused"]
        step.row_samples = dict(zip(names, agreed.rows))
        step.row_ranks = dict(zip(names, agreed.ranks_with_row))
        if agreed.nonfinite:
            where = bad_loss or "loss of another rank"
            return self._nonfinite(f"the {where} is NaN or Inf", method_state)
        saved = {p: p.grad for p in self.trainable}
        groups.hold(saved.values())  # the buffers these live in are not reused by this call
        for p in self.trainable:
            p.grad = None
        self.method.proven = []
        try:
            self.method.backward(step, total)
            self._check_reached()
            bad = groups.check_finite(self.trainable, proven=self.method.proven)
            if bad:
                raise NonFiniteGradient(f"the gradient of {bad[0]!r} is NaN or Inf")
        except NonFiniteGradient as e:
            for p, g in saved.items():
                p.grad = g
            return self._nonfinite(str(e), method_state)
        except BaseException:
            for p, g in saved.items():
                p.grad = g
            self.method.load_state_dict(method_state)
            raise
        self._add_back(saved)
        groups.after_step()
        self.steps += 1
        return True

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation with one sync per optimizer step: calls inside the block keep their gradients
        local (no collective); the first call after the block reduces them with its own, in one collective.
        Only for methods whose gradients are plain (none, i2m2, mimo, utilization); the others raise."""
        if not self.method.plain_gradients:
            raise ValueError(
                f"method {type(self.method).name!r} forms its gradients from each step's statistics "
                "across ranks, so it must sync every call: accumulate without no_sync()"
            )
        if self.groups.fsdp:
            raise ValueError("Balancer.no_sync() under FSDP2: use the model's set_requires_gradient_sync(False)")
        self.groups.synced = False
        try:
            yield
        finally:
            self.groups.synced = True
            # what the block accumulated locally is reduced by the next synced call
            if distributed():
                self.groups.pending = {id(p): p.grad for p in self.trainable if p.grad is not None}

    def end_epoch(self) -> None:
        """Tell the methods an epoch ended (greedy's window, utilization's lambda schedule)."""
        self.epoch += 1
        self.method.end_epoch(self.epoch)

    def stats(self) -> dict[str, float]:
        """The method's statistics of the last step, as Python numbers (synchronises a GPU)."""
        return self.method.stats()

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "skipped": self.skipped,
            "epoch": self.epoch,
            "method": type(self.method).name,
            "method_state": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """All or nothing: the state is validated in full (the method's part too) before anything changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from Balancer.state_dict(), got {type(state).__name__}")
        if state.get("method") != type(self.method).name:
            raise ValueError(
                f"the state is of method {state.get('method')!r}, this Balancer runs {type(self.method).name!r}"
            )
        counters = {}
        for key in ("steps", "skipped", "epoch"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state[{key!r}] must be an int >= 0, got {value!r}")
            counters[key] = value
        before = _copy_state(self.method.state_dict())
        try:
            self.method.load_state_dict(state.get("method_state", {}))
        except BaseException:
            self.method.load_state_dict(before)
            raise
        self.steps, self.skipped, self.epoch = counters["steps"], counters["skipped"], counters["epoch"]

    def close(self) -> None:
        """Remove the method's hooks from the model and give DDP its gradient sync back (idempotent)."""
        self.method.close()
        self.groups.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------------------
    def _step(self, fused, unimodal, logits, fused_logits, target, forward, inputs, features=None) -> Step:
        for arg, value in (("unimodal", unimodal), ("logits", logits), ("features", features)):
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(
                    f"{arg} must be a dict of modality name -> tensor (keys "
                    f"{', '.join(map(repr, self.modalities))}), got {type(value).__name__}"
                )
        unimodal = dict(unimodal or {})
        logits = dict(logits or {})
        features = dict(features or {})
        for arg, d in (("unimodal", unimodal), ("logits", logits), ("features", features)):
            unknown = [k for k in d if k not in self.modalities]
            if unknown:
                raise ValueError(
                    f"{arg} has key {unknown[0]!r}, which is not a modality of this Balancer "
                    f"({', '.join(map(repr, self.modalities))})"
                )
        # Keep modality order (it is the row order of the banks).
        unimodal = {m: unimodal[m] for m in self.modalities if m in unimodal}
        logits = {m: logits[m] for m in self.modalities if m in logits}
        features = {m: features[m] for m in self.modalities if m in features}
        step = Step(fused, unimodal, logits, fused_logits, target, forward, inputs, epoch=self.epoch, features=features)
        losses = step.named_losses()
        if not losses and self.method.needs_loss:
            raise ValueError("backward needs a loss: pass fused= and/or unimodal=")
        for name, loss in losses:
            if not isinstance(loss, torch.Tensor) or not loss.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {type(loss).__name__}")
            if loss.dim() > 1:
                raise ValueError(f"{name} must be a per-sample vector [N] or a scalar, got shape {tuple(loss.shape)}")
            if not loss.requires_grad:
                raise ValueError(
                    f"{name} does not require grad: compute it from the model's outputs with autograd enabled"
                )
        for need in self.method.requires:
            value = getattr(step, need)
            if value is None or (isinstance(value, dict) and set(value) != set(self.modalities)):
                what = f"a value for every modality ({', '.join(self.modalities)})" if isinstance(value, dict) else "it"
                raise ValueError(f"method {type(self.method).name!r} needs {need}= in backward: pass {what}")
        return step

    def _nonfinite_loss(self, step: Step, total: torch.Tensor) -> str | None:
        """One host sync: the name of the first NaN/Inf loss, or None."""
        named = step.named_losses() + [("total objective", total)]
        if all(t.device == total.device for _, t in named):  # one isfinite pass over all of them
            if bool(torch.isfinite(torch.cat([t.detach().reshape(-1) for _, t in named])).all()):
                return None
        flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
        if bool(flags.all()):
            return None
        return next(name + " loss" for (name, _), ok in zip(named, flags.tolist()) if not ok)

    def _nonfinite(self, what: str, method_state: dict) -> bool:
        """Apply on_nonfinite after the step's gradients were put back: raise, or skip with a warning."""
        self.method.load_state_dict(method_state)
        self.method.on_skip()
        message = f"{what} at step {self.steps}; "
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message + "no gradient was changed (on_nonfinite='raise')")
        self.skipped += 1
        warnings.warn(
            message + "the step is skipped: no gradient, method state or counter changed; do not call "
            "optimizer.step() for it (backward returned False)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False

    def _check_reached(self) -> None:
        """Every encoder and shared parameter must have received a gradient (unless the method held it)."""
        held = getattr(self.method, "held_params", set())
        for group, pairs in [(f"encoders[{m!r}]", ps) for m, ps in self.encoders.items()] + [("shared", self.shared)]:
            for name, p in pairs:
                if p.grad is None and id(p) not in held:
                    raise ValueError(
                        f"parameter {name!r} of {group} received no gradient from the losses of this "
                        "step: remove it from the group, freeze it (requires_grad=False), or make the "
                        "objectives depend on it"
                    )

    def _add_back(self, saved: dict) -> None:
        """Gradient accumulation: add what .grad held before the call to this call's contribution (except what a
        synced call already reduced together with its own, after no_sync())."""
        groups = self.groups
        if not groups.pending and all(old is None for old in saved.values()):
            return  # the usual step after zero_grad(set_to_none=True): nothing to add
        consumed = set(groups.pending) if groups.synced else set()
        if groups.synced:
            groups.pending = {}
        news, olds = [], []
        for p, old in saved.items():
            if old is None or id(p) in consumed:
                continue
            if p.grad is None:
                p.grad = old
            else:
                news.append(p.grad)
                olds.append(old)
        if news:
            torch._foreach_add_(news, olds)


def _copy_state(state):
    """A copy of a method's state_dict for rollback: tensors cloned, containers rebuilt, the rest deep-copied
    (copy.deepcopy's generic path costs more than the tensors it copies)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _copy_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)) and type(state) in (list, tuple):
        return type(state)(_copy_state(v) for v in state)
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    return copy.deepcopy(state)
