"""Method "utilization": hold each modality's utilization at a target.

Source: Singh et al. 2024 (the seed paper, "000"): the utilization of modality m is how much the model loses
when m's link to the label is broken by shuffling m across the batch, normalised over modalities.

In training, with p_i = softmax(fused logits)_i[y_i] and p_i^(m) the same with modality m's inputs permuted
across the batch (one extra forward per modality, differentiable):
    d_m  = mean_i (p_i - p_i^(m))                         (soft accuracy drop)
    MU_m = relu(d_m) / (sum_j relu(d_j) + 1e-8)
    loss = L_fused (+ unimodal losses if passed) + lambda(t) * sum_m (MU_m - target_m)^2
A step where every d_j <= 0 adds no term (counted in stats). lambda rises clipped-exponentially from
lambda_max / 1000 at epoch 0 to lambda_max (1) at warmup_epochs (10): lambda = lambda_max * 1000^(min(t/10, 1) - 1),
t the epochs finished plus the fraction of the current epoch when steps_per_epoch is given.
(A cross-entropy drop in place of d_m overstates the dominant share; docs/math.md#utilization.)
What the target controls is the share of reliance, not survival without the dominant modality; the paper trains
only the decision layers on frozen, pretrained encoders (the trainer's --freeze-encoders).

Options: target: a dict modality -> target share (summing to 1), or a float for `dominant` with the rest
sharing 1 - target equally; dominant: the modality a float target is for (default the first); lambda_max (1.0);
warmup_epochs (10); steps_per_epoch (None: lambda changes at epoch ends only); seed (0, for the permutations).
Needs fused_logits, target, forward (inputs dict -> fused logits) and inputs (modality -> input tensor).
"""

from __future__ import annotations

import torch

from modfuse import _checks as check
from modfuse.methods import Method, register


def true_class_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[i, y_i], in float32 at least (autocast logits are half precision)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    return torch.softmax(logits.to(acc), dim=-1).gather(1, target.reshape(-1, 1)).squeeze(1)


def soft_accuracy_drops(forward, inputs, fused_logits, target, modalities, generator) -> torch.Tensor:
    """d_m for every modality: mean drop of the true-class probability when m is shuffled across the batch."""
    p = true_class_probability(fused_logits, target)
    drops = []
    for m in modalities:
        x = inputs[m]
        perm = torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)
        shuffled = dict(inputs)
        shuffled[m] = x[perm]
        p_m = true_class_probability(forward(shuffled), target)
        drops.append((p - p_m).mean())
    return torch.stack(drops)


def utilization_shares(drops: torch.Tensor) -> torch.Tensor:
    """MU_m = relu(d_m) / (sum_j relu(d_j) + 1e-8)."""
    r = torch.relu(drops)
    return r / (r.sum() + 1e-8)


@register
class Utilization(Method):
    name = "utilization"
    requires = ("fused", "fused_logits", "target", "forward", "inputs")

    def __init__(
        self,
        groups,
        target=0.5,
        dominant: str | None = None,
        lambda_max: float = 1.0,
        warmup_epochs: float = 10,
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ):
        super().__init__(groups)
        mods = groups.modalities
        if len(mods) < 2:
            raise ValueError("method 'utilization' needs at least two modalities")
        if isinstance(target, dict):
            if set(target) != set(mods):
                raise ValueError(
                    f"target must give a share for every modality ({', '.join(mods)}), got {sorted(target)}"
                )
            shares = [float(target[m]) for m in mods]
        else:
            dominant = mods[0] if dominant is None else dominant
            if dominant not in mods:
                raise ValueError(f"dominant {dominant!r} is not a modality ({', '.join(mods)})")
            t = float(target)
            shares = [t if m == dominant else (1 - t) / (len(mods) - 1) for m in mods]
        if any(not 0 <= s <= 1 for s in shares) or abs(sum(shares) - 1) > 1e-6:
            raise ValueError(f"target shares must lie in [0, 1] and sum to 1, got {dict(zip(mods, shares))}")
        self.targets = torch.tensor(shares, dtype=torch.float64)
        self.lambda_max = check.positive("lambda_max", lambda_max)
        self.warmup_epochs = check.positive("warmup_epochs", warmup_epochs)
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1
        ):
            raise ValueError(f"steps_per_epoch must be None or an int >= 1, got {steps_per_epoch!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0  # epochs finished, as the Balancer counts them
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_in_epoch = 0
        self.empty_steps = 0  # steps where every d_j <= 0 (no term added)
        self._mu = None

    def lam(self) -> float:
        t = self.epoch
        if self.steps_per_epoch:
            t += min(self.steps_in_epoch / self.steps_per_epoch, 1.0)
        return self.lambda_max * 1000.0 ** (min(t / self.warmup_epochs, 1.0) - 1.0)

    def objective(self, step):
        self.epoch = step.epoch
        total = super().objective(step)
        self._generator_before = self.generator.get_state()  # restored if the step is skipped
        drops = soft_accuracy_drops(
            step.forward, step.inputs, step.fused_logits, step.target, self.groups.modalities, self.generator
        )
        mu = utilization_shares(drops)
        self._mu = mu.detach()
        penalty = (mu - self.targets.to(mu.device, mu.dtype)).square().sum()
        # every d_j <= 0: no utilization signal this step, so no term (the flag stays on the device: no sync)
        active = (torch.relu(drops).sum() > 0).to(penalty.dtype)
        self._active = active.detach()
        return total + self.lam() * active * penalty

    def backward(self, step, total):
        super().backward(step, total)
        self.steps_in_epoch += 1
        self.empty_steps += int(self._active.item() == 0)

    def on_skip(self):
        self.generator.set_state(self._generator_before)
        self._mu = None

    def end_epoch(self, epoch):
        self.epoch = epoch
        self.steps_in_epoch = 0

    def stats(self):
        if self._mu is None:
            return {}
        out = {f"{m}/utilization": float(v) for m, v in zip(self.groups.modalities, self._mu.tolist())}
        out.update(lambda_=self.lam(), empty_steps=float(self.empty_steps))
        return out

    def state_dict(self):
        return {
            "generator": self.generator.get_state(),
            "steps_in_epoch": self.steps_in_epoch,
            "empty_steps": self.empty_steps,
        }

    def load_state_dict(self, state):
        generator = state.get("generator")
        if not isinstance(generator, torch.Tensor):
            raise TypeError("the utilization state needs its 'generator' state tensor")
        counts = [state.get("steps_in_epoch"), state.get("empty_steps")]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"the utilization state's steps_in_epoch and empty_steps must be ints >= 0, got {counts}")
        self.generator.set_state(generator)
        self.steps_in_epoch, self.empty_steps = counts
