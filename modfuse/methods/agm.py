"""Method "agm": adaptive gradient modulation from Shapley-style mono-modal responses.

Source: Li, Li, Hu, Zhou, "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation", ICCV 2023
(the authors' training code, 3 modalities, and GeWu-Lab/BalanceBenchmark's AGM_trainer.py).

Per step, with f(S) the fused logits when only the modalities in S are kept (the others' inputs zeroed; no-grad
forwards through `forward`, f(all) = the step's fused logits, f(empty) = 0 as in both codes):
    phi_m  = sum_{S subset of the others} |S|! (M - |S| - 1)! / M! * (f(S + m) - f(S))     (Shapley value)
    s_m    = mean_i -log max(softmax(phi_m)_i[y_i], 1e-8)                (mono-modal loss of the response)
    r_m    = exp(M / (M - 1) * (mean_j s_j - s_m))                        (current relative strength)
    eta_m  = exp(M / (M - 1) * (mean_j t_j - t_m))                        (the same from the running averages t)
    k_m    = exp(alpha * min(eta_m - r_m, 7))
    t_m   <- t_m (n - 1) / n + s_m / n                                    (n = steps so far, after k is formed)
Encoder m's gradients of the fused loss are scaled by k_m (one segment_scale_ launch per encoder): a modality
stronger than its running average relative to the others (r > eta) is slowed, a weaker one sped up. For M = 2
phi_a = (f(a, v) - f(v) + f(a)) / 2, the authors' two-modality form; the M = 3 weights are the authors' 1/3, 1/6.
Costs 2^M - 2 extra no-grad forwards per step. Active for start_epoch <= epoch <= end_epoch (0 and 50, theirs).
What differs from the authors' code, and why:
- the authors scale the gradient that flows back through each Shapley output (a backward hook); here encoder m's
  whole gradient of the objective is scaled (BalanceBenchmark's form), since the Balancer does not own the
  forward; BalanceBenchmark leaves biases unscaled, here every encoder tensor is scaled (as the hook does);
- BalanceBenchmark's M-modality version drops the empty coalition's term and flips the sign of r; this follows
  the authors' code (identical to it for M = 2 and 3);
- their gradient clipping when the head's gradient exceeds 5 is left to the training loop;
- the 1e-8 floor on the probability is BalanceBenchmark's (the authors' code has none; a zero gives inf).
Masked forwards run in the model's current mode (the authors switch to eval for them).
Distributed: the score sums and sample counts are summed over ranks before k is formed, so every rank scales by
the same k, equal to one process on the concatenated batch. Under FSDP2 the masked forwards run on every rank (each
all-gathers the parameters as FSDP2's forward does), the gradients come from one plain backward through FSDP2's
reduce-scatter, the score sums and counts go in one tiny all-reduce, and each rank scales its own shards by k.
"""

from __future__ import annotations

import itertools
import math

import torch

from modfuse import _checks as check
from modfuse import ops
from modfuse.methods import Method, reduce_encoder_banks, register, wire_dtype


def shapley_responses(forward, inputs, modalities, full_logits):
    """phi_m for every modality (Shapley values of the fused logits, f(empty) = 0), from 2^M - 2 no-grad forwards."""
    M = len(modalities)
    cache = {tuple(modalities): full_logits.detach(), (): torch.zeros_like(full_logits.detach())}

    def f(kept):
        key = tuple(m for m in modalities if m in kept)
        if key not in cache:
            masked = {m: (x if m in kept else torch.zeros_like(x)) for m, x in inputs.items()}
            with torch.no_grad():
                cache[key] = forward(masked).detach()
        return cache[key]

    out = {}
    for m in modalities:
        others = [j for j in modalities if j != m]
        phi = torch.zeros_like(full_logits.detach())
        for size in range(M):
            weight = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
            for S in itertools.combinations(others, size):
                phi = phi + weight * (f((*S, m)) - f(S))
        out[m] = phi
    return out


def response_losses(phi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log max(softmax(phi)[y], 1e-8) per sample, in float32 at least."""
    acc = torch.promote_types(phi.dtype, torch.float32)
    p = torch.softmax(phi.to(acc), dim=-1).gather(1, target.reshape(-1, 1)).squeeze(1)
    return -torch.log(torch.clamp(p, min=1e-8))


def coefficients(scores: torch.Tensor, running: torch.Tensor, alpha: float) -> torch.Tensor:
    """k_m from the step's scores s and the running averages t (both [M], float64)."""
    M = scores.numel()
    r = torch.exp(M / (M - 1) * (scores.mean() - scores))
    eta = torch.exp(M / (M - 1) * (running.mean() - running))
    return torch.exp(alpha * torch.clamp(eta - r, max=7.0))


@register
class AGM(Method):
    name = "agm"
    requires = ("fused", "fused_logits", "target", "forward", "inputs")
    modulates_encoders = True
    plain_gradients = False
    fsdp2 = True

    def __init__(self, groups, alpha: float = 0.1, start_epoch: int = 0, end_epoch: int = 50):
        super().__init__(groups)
        if len(groups.modalities) < 2:
            raise ValueError("method 'agm' needs at least two modalities")
        self.alpha = check.positive("alpha", alpha)
        for name, value in (("start_epoch", start_epoch), ("end_epoch", end_epoch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if end_epoch < start_epoch:
            raise ValueError(f"end_epoch ({end_epoch}) must be >= start_epoch ({start_epoch})")
        self.window = (start_epoch, end_epoch)
        self.running = torch.zeros(len(groups.modalities), dtype=torch.float64)
        self.steps = 0
        self._k: torch.Tensor | None = None

    def backward(self, step, total):
        groups = self.groups
        phi = shapley_responses(step.forward, step.inputs, groups.modalities, step.fused_logits)
        sums = torch.stack([response_losses(phi[m], step.target).sum() for m in groups.modalities]).double()
        count = torch.tensor([float(step.target.shape[0])], dtype=torch.float64, device=sums.device)
        if groups.fsdp:  # one backward through FSDP2's reduce-scatter, then the [M + 1] sums in one all-reduce
            groups.backward(total, groups.trainable)
            groups.all_reduce_(summed=[sums, count])
            banks = None
        else:  # one packed collective: encoder banks, other gradients, score sums and sample counts (in the
            # gradients' dtype when that is float32/float64, so they ride in the gradients' collective)
            sums, count = sums.to(wire_dtype(groups)), count.to(wire_dtype(groups))
            banks = reduce_encoder_banks(groups, total, summed=[sums, count])
            sums, count = sums.double(), count.double()
        scores = (sums / count).cpu()
        k = coefficients(scores, self.running, self.alpha)
        self.steps += 1
        self.running = self.running * (self.steps - 1) / self.steps + scores / self.steps
        active = self.window[0] <= step.epoch <= self.window[1]
        self._k = k if active else None
        if not active:
            return
        for u, m in enumerate(groups.modalities):
            if banks is None:  # FSDP2: this rank's shards of the encoder's gradients, one foreach launch
                ps = [p for layout in groups.encoder_layouts[m] for p in layout.params if p.grad is not None]
                shards = [g for g in (p.grad.to_local() for p in ps) if g.numel()]
                if shards:
                    torch._foreach_mul_(shards, float(k[u]))
                continue
            for layout, buf in banks[m]:
                scale = torch.full((len(layout.params),), float(k[u]), dtype=torch.float64, device=buf.device)
                ops.segment_scale_(buf[0], layout.offsets, scale)

    def stats(self):
        if self._k is None:
            return {}
        return {f"{m}/coefficient": float(v) for m, v in zip(self.groups.modalities, self._k.tolist())}

    def state_dict(self):
        return {"running": self.running.clone(), "steps": self.steps}

    def load_state_dict(self, state):
        running, steps = state.get("running"), state.get("steps")
        if not isinstance(running, torch.Tensor) or running.shape != self.running.shape:
            raise ValueError(
                f"the agm state's running scores must be a tensor of {self.running.numel()} values, got {running!r}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"the agm state's steps must be an int >= 0, got {steps!r}")
        self.running = running.to(torch.float64).cpu().clone()
        self.steps = steps
