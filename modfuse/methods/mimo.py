"""Method "mimo": MIMO-style smoothed worst-modality objective.

    loss = L_fused + lam * tau * logsumexp_m(L_m / tau)

logsumexp / tau is a smooth maximum of the unimodal losses L_m (tau -> 0: the worst modality's loss only;
tau -> inf: their sum plus tau log M), so the modality that lags gets the most weight. Defaults lam = 1, tau = 1.
It replaces the plain sum of the unimodal losses; gradients are plain. Needs unimodal losses for every modality.
"""

from __future__ import annotations

import torch

from modfuse import _checks as check
from modfuse.methods import Method, register


@register
class Mimo(Method):
    name = "mimo"
    requires = ("fused", "unimodal")

    def __init__(self, groups, lam: float = 1.0, tau: float = 1.0):
        super().__init__(groups)
        self.lam = check.positive("lam", lam)
        self.tau = check.positive("tau", tau)
        self._weights = None

    def objective(self, step):
        losses = torch.stack([step.mean(step.unimodal[m]) for m in self.groups.modalities])
        self._weights = torch.softmax(losses.detach() / self.tau, 0)  # each modality's share of the smooth max
        return step.mean(step.fused) + self.lam * self.tau * torch.logsumexp(losses / self.tau, 0)

    def stats(self):
        if self._weights is None:
            return {}
        return {f"{m}/weight": float(w) for m, w in zip(self.groups.modalities, self._weights.tolist())}
