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
from modfuse.banks import all_reduce_sum_, distributed
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

    def __init__(self, balancer, gamma: float = 1.5):
        super().__init__(balancer)
        self.gamma = check.positive("gamma", gamma)
        self._cos: dict[str, float] | None = None
        self.conflicts = 0  # (encoder, step) pairs with cos <= 0 so far

    def backward(self, step, total):
        balancer = self.balancer
        fused = step.mean(step.fused)
        encoder_ids, cos = set(), {}
        all_params = [p for pairs in balancer.encoders.values() for _, p in pairs]
        g_mm_all = torch.autograd.grad(fused, all_params, retain_graph=True, allow_unused=True)
        by_param = dict(zip(map(id, all_params), g_mm_all))
        results = []
        for m, layouts in balancer.encoder_layouts.items():
            for layout in layouts:
                params = layout.params
                encoder_ids.update(map(id, params))
                g_m = torch.autograd.grad(step.mean(step.unimodal[m]), params, retain_graph=True, allow_unused=True)
                g_mm = [by_param[id(p)] for p in params]
                X = layout.grad_rows(2)
                layout.flatten_into(X[0], g_mm)
                layout.flatten_into(X[1], g_m)
                if distributed():
                    all_reduce_sum_(X).div_(torch.distributed.get_world_size())
                w, c = pareto_weights(ops.gram(X.float() if X.dtype in (torch.float16, torch.bfloat16) else X),
                                      self.gamma)
                out = ops.weighted_sum(X, w)
                unreached = [p for p, a, b in zip(params, g_mm, g_m) if a is None and b is None]
                results.append((layout, out, unreached))
                cos[m] = c
        others = [p for p in balancer.trainable if id(p) not in encoder_ids]
        torch.autograd.backward(total, inputs=others)
        balancer.sync_plain_grads(others)
        for layout, out, unreached in results:
            for p, view in zip(layout.params, layout.views(out)):
                p.grad = None if any(p is q for q in unreached) else view
        self._cos = {m: float(c) for m, c in cos.items()}
        self.conflicts += sum(1 for c in self._cos.values() if c <= 0)

    def stats(self):
        if self._cos is None:
            return {}
        return {**{f"{m}/cos": c for m, c in self._cos.items()}, "conflicts": float(self.conflicts)}

    def state_dict(self):
        return {"conflicts": self.conflicts}

    def load_state_dict(self, state):
        self.conflicts = int(state["conflicts"])
