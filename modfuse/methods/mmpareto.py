"""Method "mmpareto": Pareto integration of the multimodal and unimodal gradients of each encoder.

Source: Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024
(GeWu-Lab/MMPareto_ICML2024).

Per encoder m (all its parameters flattened), with g_mm the gradient of the fused loss and g_m that of modality
m's unimodal loss (separate backwards):
    cos(g_mm, g_m) > 0:  w = (1/2, 1/2)
    otherwise:           the two-objective min-norm weights, w_mm = clip(((g_m - g_mm) . g_m) / ||g_mm - g_m||^2, 0, 1),
                         w_m = 1 - w_mm
    g = 2 (w_mm g_mm + w_m g_m);  g <- g * max(1, ||g_mm + g_m|| / ||g||);  g <- gamma * g   (gamma = 1.5)
Parameters outside the encoders (the shared head, the fusion layers) get the plain sum fused + unimodal.
Needs unimodal losses for every modality.
Fused ops: the two gradients are the rows of one [2, D] bank; Op 5 (gram) gives every dot product and norm
above in one pass, and Op 6 (weighted_sum) writes g in one more, with all scalars folded into its two weights.
"""
from __future__ import annotations

import torch

from modfuse import _checks as check
from modfuse import ops
from modfuse.methods import Method, register


def pareto_weights(G: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(final weights [2] for (g_mm, g_m), cos) from the 2x2 Gram matrix of the two gradients (float64 math)."""
    G = G.double()
    a, ab, b = G[0, 0], G[0, 1], G[1, 1]
    tiny = torch.finfo(torch.float64).tiny
    cos = ab / torch.sqrt(torch.clamp(a * b, min=tiny))
    w_mm = torch.clamp((b - ab) / torch.clamp(a - 2 * ab + b, min=tiny), 0, 1)
    w_mm = torch.where(cos > 0, torch.full_like(w_mm, 0.5), w_mm)
    w = torch.stack([w_mm, 1 - w_mm]) * 2
    norm_g2 = w[0] ** 2 * a + 2 * w[0] * w[1] * ab + w[1] ** 2 * b
    norm_sum2 = a + 2 * ab + b
    rescale = torch.clamp(torch.sqrt(norm_sum2 / torch.clamp(norm_g2, min=tiny)), min=1)
    return w * rescale * gamma, cos


@register
class MMPareto(Method):
    name = "mmpareto"
    requires = ("fused", "unimodal")
    modulates_encoders = True
    plain_gradients = False
    fsdp2 = False

    def __init__(self, groups, gamma: float = 1.5):
        super().__init__(groups)
        self.gamma = check.positive("gamma", gamma)
        self._cos: dict[str, float] | None = None
        self.conflicts = 0  # (encoder, step) pairs with cos <= 0 so far

    def backward(self, step, total):
        groups = self.groups
        fused = step.mean(step.fused)
        all_params = [p for pairs in groups.encoders.values() for _, p in pairs]
        by_param = dict(zip(map(id, all_params), groups.grads(fused, all_params)))
        banks = []
        for m, layouts in groups.encoder_layouts.items():
            for layout in layouts:
                g_m = groups.grads(step.mean(step.unimodal[m]), layout.params)
                g_mm = [by_param[id(p)] for p in layout.params]
                X = layout.grad_rows(2)
                layout.flatten_into(X[0], g_mm)
                layout.flatten_into(X[1], g_m)
                reached = torch.tensor([float(a is not None or b is not None) for a, b in zip(g_mm, g_m)],
                                       dtype=X.dtype, device=X.device)
                banks.append((m, layout, X, reached))
        encoder_ids = set(map(id, all_params))
        others = [p for p in groups.trainable if id(p) not in encoder_ids]
        groups.backward(total, others)
        # one packed collective: both rows of every encoder bank and every other gradient
        groups.reduce_grads_(others, weighted=[X for _, _, X, _ in banks], summed=[r for *_, r in banks])
        cos = {}
        for m, layout, X, reached in banks:
            w, c = pareto_weights(ops.gram(X.float() if X.dtype in (torch.float16, torch.bfloat16) else X),
                                  self.gamma)
            out = ops.weighted_sum(X, w)
            for p, view, f in zip(layout.params, layout.views(out), reached.tolist()):
                p.grad = view if f > 0 else None
            cos[m] = c
        self._cos = {m: float(c) for m, c in cos.items()}
        self.conflicts += sum(1 for c in self._cos.values() if c <= 0)

    def stats(self):
        if self._cos is None:
            return {}
        return {**{f"{m}/cos": c for m, c in self._cos.items()}, "conflicts": float(self.conflicts)}

    def state_dict(self):
        return {"conflicts": self.conflicts}

    def load_state_dict(self, state):
        conflicts = state.get("conflicts")
        if isinstance(conflicts, bool) or not isinstance(conflicts, int) or conflicts < 0:
            raise ValueError(f"the mmpareto state's conflicts must be an int >= 0, got {conflicts!r}")
        self.conflicts = conflicts
