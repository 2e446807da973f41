"""Method "mmpareto": Pareto integration of the multimodal and unimodal gradients of each encoder.

Source: Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024
(GeWu-Lab/MMPareto_ICML2024).

Per encoder m, with g_mm the gradient of the fused loss and g_m that of modality m's unimodal loss (separate
backwards), a = ||g_mm||^2, b = ||g_m||^2, ab = g_mm . g_m over all of the encoder's parameters:
    cos(g_mm, g_m) > 0:  w_mm = 1/2
    otherwise:           the authors' two-vector min-norm solver (MinNormSolver._min_norm_element_from2):
                         w_mm = 0.999 if ab >= a;  0.001 if ab >= b;  (b - ab) / (a - 2 ab + b) otherwise
    w_m = 1 - w_mm;  g = 2 (w_mm g_mm + w_m g_m)
    rescale="tensor" (default, the authors' code): for every parameter tensor t,
                         g_t <- gamma * g_t * max(1, ||g_mm,t + g_m,t|| / ||g_t||)   (factor 1 where ||g_t|| = 0)
    rescale="encoder":   the same factor once per encoder, from the norms over all of its parameters
gamma = 1.5. Parameters outside the encoders (the shared head, the fusion layers) get the plain sum fused +
unimodal. Needs unimodal losses for every modality; works for any M (each encoder pairs the fused gradient with its
own modality's gradient, which is what the two-modality code does per encoder).
The solver's ends (0.001, 0.999) matter when one gradient is exactly zero (a zero-initialised unimodal head): the
weight stays finite, where the unclipped formula would put the whole step on the zero gradient and then rescale
it by ~1e154 (inf in float32; inf * 0 = NaN in `.grad`).
Differences from the authors' code: none in the math on two modalities; their encoder selection is by parameter
name ('audio'/'visual' in the name, 'head' excluded), here the encoders given to the Balancer.
Fused ops: the two gradients are the rows of one [3, D] bank; Op 5 (gram) gives a, ab, b in one pass. For the
per-tensor rescale (the default) row 2 holds g_mm + g_m, g / 2 is written over g_m by one in-place `lerp_` (w sums
to 2; Op 6 would need a fresh output and a copy back), one Op 1 launch gives both per-tensor norms and one
segment_scale_ applies the factors (times 2). rescale="encoder" writes g with Op 6 (weighted_sum).
"""

from __future__ import annotations

import torch

from modfuse import _checks as check
from modfuse import ops, reference
from modfuse.methods import Method, register


def min_norm_weight(a: torch.Tensor, ab: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Weight of the first vector in min_w ||w x + (1 - w) y||, a = x.x, ab = x.y, b = y.y, as the authors' solver
    (ends clipped to 0.001 and 0.999; the interior solution is then strictly inside (0, 1))."""
    interior = (b - ab) / torch.clamp(a - 2 * ab + b, min=torch.finfo(a.dtype).tiny)
    return torch.where(ab >= a, torch.full_like(a, 0.999), torch.where(ab >= b, torch.full_like(a, 0.001), interior))


def pareto_weights(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [2] of g = w[0] g_mm + w[1] g_m before any rescale, cos) from the 2x2 Gram matrix (float64)."""
    G = G.double()
    a, ab, b = G[0, 0], G[0, 1], G[1, 1]
    cos = ab / torch.sqrt(torch.clamp(a * b, min=torch.finfo(torch.float64).tiny))
    w_mm = torch.where(cos > 0, torch.full_like(a, 0.5), min_norm_weight(a, ab, b))
    return torch.stack([w_mm, 1 - w_mm]) * 2, cos


def rescale_factor(sum_sq: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """max(1, ||g_mm + g_m|| / ||g||), and 1 where ||g|| = 0 (the authors' NaN comparison falls to that branch)."""
    ratio = torch.sqrt(sum_sq / torch.where(g_sq > 0, g_sq, torch.ones_like(g_sq)))
    return torch.where(g_sq > 0, torch.clamp(ratio, min=1), torch.ones_like(ratio))


@register
class MMPareto(Method):
    name = "mmpareto"
    requires = ("fused", "unimodal")
    modulates_encoders = True
    plain_gradients = False
    fsdp2 = True

    def __init__(self, groups, gamma: float = 1.5, rescale: str = "tensor"):
        super().__init__(groups)
        self.gamma = check.positive("gamma", gamma)
        if rescale not in ("tensor", "encoder"):
            raise ValueError(
                f"rescale must be 'tensor' (per parameter tensor, the authors' code) or 'encoder', got {rescale!r}"
            )
        self.rescale = rescale
        self._cos: dict[str, float] | None = None
        self.conflicts = 0  # (encoder, step) pairs with cos <= 0 so far

    def backward(self, step, total):
        groups = self.groups
        if groups.fsdp:
            self._fsdp_backward(step)
            return
        fused = step.mean(step.fused)
        all_params = [p for pairs in groups.encoders.values() for _, p in pairs]
        by_param = dict(zip(map(id, all_params), groups.grads(fused, all_params)))
        banks = []
        for m, layouts in groups.encoder_layouts.items():
            for layout in layouts:
                g_m = groups.grads(step.mean(step.unimodal[m]), layout.params)
                g_mm = [by_param[id(p)] for p in layout.params]
                # g_mm, g_m, and room for g_mm + g_m; persistent, row 1 ends as `.grad` (rescale="tensor")
                X = groups.buffer(("mmpareto", id(layout)), (3, layout.numel), layout.dtype, layout.device)
                layout.flatten_into(X[0], g_mm)
                layout.flatten_into(X[1], g_m)
                reached = torch.tensor(
                    [float(a is not None or b is not None) for a, b in zip(g_mm, g_m)], dtype=X.dtype, device=X.device
                )
                banks.append((m, layout, X, reached))
        encoder_ids = set(map(id, all_params))
        others = [p for p in groups.trainable if id(p) not in encoder_ids]
        groups.backward(total, others)
        # one packed collective: both rows of every encoder bank and every other gradient
        groups.reduce_grads_(others, weighted=[X[:2] for _, _, X, _ in banks], summed=[r for *_, r in banks])
        cos = {}
        for m, layout, X, reached in banks:
            pair = X[:2]
            G = ops.gram(pair.float() if pair.dtype in (torch.float16, torch.bfloat16) else pair).double()
            w, c = pareto_weights(G)
            out = self._combine(X, layout.offsets, w, G)
            for p, view, f in zip(layout.params, layout.views(out), reached.tolist()):
                p.grad = view if f > 0 else None
            cos[m] = c
        self._cos = {m: float(c) for m, c in cos.items()}
        self.conflicts += sum(1 for c in self._cos.values() if c <= 0)

    def _fsdp_backward(self, step):
        """FSDP2: one backward per objective (fused, then each modality's unimodal loss), each through FSDP2's own
        reduce-scatter, so every rank holds its shards of g_mm and g_m; the other parameters accumulate the plain
        sum. Per tensor, the shard-local partial sums g_mm.g_mm, g_mm.g_m, g_m.g_m are all-reduced in one tiny
        collective: the encoder's Gram is their sum and ||g_t||^2 = w0^2 xx + 2 w0 w1 xy + w1^2 yy, so each
        rank combines and rescales its own shards without an all-gather."""
        groups = self.groups
        enc = {m: [p for layout in groups.encoder_layouts[m] for p in layout.params] for m in groups.modalities}
        every = [p for ps in enc.values() for p in ps]

        def take():
            grads = {id(p): p.grad for p in every}
            for p in every:
                p.grad = None
            return grads

        groups.backward(step.mean(step.fused), groups.trainable, retain_graph=True)
        g_mm, g_m = take(), {}
        for i, m in enumerate(groups.modalities):
            groups.backward(step.mean(step.unimodal[m]), groups.trainable, retain_graph=i < len(groups.modalities) - 1)
            got = take()
            g_m.update({id(p): got[id(p)] for p in enc[m]})
        pairs = [(g_mm[id(p)], g_m[id(p)]) for p in every]
        local = [(None if x is None else x.to_local(), None if y is None else y.to_local()) for x, y in pairs]
        partial = torch.zeros(len(every), 3, dtype=torch.float64)
        for t, (x, y) in enumerate(local):
            xd = None if x is None else x.double()
            yd = None if y is None else y.double()
            if xd is not None:
                partial[t, 0] = xd.square().sum()
            if xd is not None and yd is not None:
                partial[t, 1] = (xd * yd).sum()
            if yd is not None:
                partial[t, 2] = yd.square().sum()
        groups.all_reduce_(summed=[partial])
        cos, t0 = {}, 0
        for m in groups.modalities:
            T = len(enc[m])
            xx, xy, yy = partial[t0 : t0 + T].unbind(1)
            G = torch.stack([torch.stack([xx.sum(), xy.sum()]), torch.stack([xy.sum(), yy.sum()])])
            w, c = pareto_weights(G)
            cos[m] = c
            if self.rescale == "encoder":
                a, ab, b = G[0, 0], G[0, 1], G[1, 1]
                g_sq = w[0] ** 2 * a + 2 * w[0] * w[1] * ab + w[1] ** 2 * b
                factors = (rescale_factor(a + 2 * ab + b, g_sq) * self.gamma).expand(T)
                coeffs = [w * f for f in factors]
                factors = torch.ones(T, dtype=torch.float64)
            else:
                g_sq = w[0] ** 2 * xx + 2 * w[0] * w[1] * xy + w[1] ** 2 * yy
                factors = rescale_factor(xx + 2 * xy + yy, g_sq) * self.gamma
                coeffs = [w] * T
            for j, p in enumerate(enc[m]):
                (x, y), (dx, dy) = local[t0 + j], pairs[t0 + j]
                if x is None and y is None:
                    p.grad = None
                    continue
                acc = reference.accumulation_dtype((x if x is not None else y).dtype)
                wx, wy = coeffs[j].tolist()
                with torch.no_grad():
                    g = (0 if x is None else x.to(acc) * wx) + (0 if y is None else y.to(acc) * wy)
                    g = g * float(factors[j])
                    target, grad = (x, dx) if x is not None else (y, dy)
                    target.copy_(g)
                p.grad = grad
            t0 += T
        self._cos = {m: float(c) for m, c in cos.items()}
        self.conflicts += sum(1 for c in self._cos.values() if c <= 0)

    def _combine(self, X, offsets, w, G):
        """gamma * rescaled (w[0] X[0] + w[1] X[1]); X is the encoder's [3, D] bank (row 2 free), G its Gram."""
        if self.rescale == "encoder":
            a, ab, b = G[0, 0], G[0, 1], G[1, 1]
            g_sq = w[0] ** 2 * a + 2 * w[0] * w[1] * ab + w[1] ** 2 * b
            return ops.weighted_sum(X[:2], w * rescale_factor(a + 2 * ab + b, g_sq) * self.gamma)
        torch.add(X[0], X[1], out=X[2])
        # g / 2 = w_mm g_mm + (1 - w_mm) g_m (w sums to 2), written over g_m in one pass with no new buffer
        X[1].lerp_(X[0], (w[0] / 2).to(X.dtype).to(X.device))
        sq = ops.segment_sq_norms(X[1:], offsets).double()  # [2, tensors]: ||g_t / 2||^2, ||g_mm,t + g_m,t||^2
        ops.segment_scale_(X[1], offsets, rescale_factor(sq[1], 4 * sq[0]) * (2 * self.gamma))
        return X[1]

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
