"""Method "cggm": classifier-guided gradient modulation.

Source: Guo, Jia, Zhao, Shi, "Classifier-guided Gradient Modulation for Enhanced Multimodal Learning", NeurIPS
2024 (the authors' code zrguo/CGGM, src/msatrain.py and src/foodtrain.py; defaults of run/food_run.py).

An auxiliary linear classifier per modality, W_u h_u + b_u on the detached embedding h_u (`features=` in
Balancer.backward), is trained beside the model on its own cross-entropy (its own AdamW, lr cls_lr = 5e-4,
weight decay 3e-3, as the authors' cls_optimizer). Per step t, with a_u(t) its accuracy on the batch:
    d_u      = a_u(t) - a_u(t - 1)                      (a_u(0) = 0: the authors' acc1 = [0] * M)
    B_u      = (D - d_u) / D,   D = sum_j d_j + 1e-8    (balancing term: slower-improving modality, larger B)
    cos_u    = cos(W_u, W_F)                            (classifier weight against the fusion head's weight W_F)
    L_gm     = (sum_u |B_u| - sum_u B_u cos_u) / M      (direction term)
Encoder u's gradient of the fused loss (plus the unimodal losses, if passed) is scaled by rou * B_u (rou = 1.3;
one segment_scale_ launch per encoder), and lamda * L_gm (lamda = 0.05) of step t is added to the objective of step
t + 1, whose only gradient is on W_F (the authors zero the classifiers' part):
    dL_gm / dW_F = -(1 / M) sum_u B_u (W_u / (|W_u| |W_F|) - cos_u W_F / |W_F|^2)
evaluated at step t's weights (the authors' graph holds clones of them). The norms and cosines come from one Gram
launch over the rows [W_F, W_1, ..., W_M] (ops.gram), the gradient from one weighted_sum launch over the same rows.
W_F is `fusion_head` (default: the one 2-D parameter of `shared` with one row per class), and must have the shape
of each W_u ([C, d]; the trainer's shared head has it): the direction term compares them element by element.
For M >= 3 the formulas are the authors' (their MSA code has 3 modalities, the food code 2).
What differs from the authors' code, and why:
- the paper writes the cosines between the classifiers' and the fusion module's gradients; the authors' code takes
  them between the out-layer weights (the parameters, in variables named *_grad): this follows the code;
- the auxiliary classifiers here are linear (the authors': a transformer or an MLP and an out layer), owned by the
  method and saved in its state_dict;
- B_u is the authors' formula with no guard: when the accuracy changes nearly cancel (D near 0) it becomes very
  large or negative, as theirs does (the stats show it). What keeps their training stable is the gradient
  clipping of their step, clip_grad_norm_(model, 0.8) after the modulation, so the method does it too
  (clip=0.8; clip=None leaves it to the loop): the call's gradients are then clipped to total norm 0.8, which a
  plain `loss.backward()` would not do.
Distributed: the classifier gradients (weighted N_r / N) and the correct counts are summed in the same collective
as the encoder banks, so every rank's classifiers and B stay identical and the step equals one process on the
concatenated batch. Under FSDP2 (W_F sharded by rows): one plain backward through FSDP2's reduce-scatter; every
whole-tensor quantity is a sum over elements, so each rank forms shard-local partial sums and one float64
all-reduce carries them with the classifier gradients and the counts: the Gram of [W_F, W_1, ..., W_M] over its
own rows of W_F (the classifiers are replicated), each encoder's squared gradient norm before scaling and the
other parameters' (W_F's after the pending term); the clip's total norm is then
sqrt(sum_u (rou B_u)^2 |g_u|^2 + |g_rest|^2), and each rank scales, clips and adds the direction term (its own rows
of dL_gm / dW_F; `pending` is that rank's shard) on its own shards. No gradient is all-gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modfuse import _checks as check
from modfuse import ops
from modfuse.methods import Method, reduce_encoder_banks, register


def balancing_terms(accuracy: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """B_u = (D - d_u) / D, d = accuracy - previous, D = sum d + 1e-8 (the authors' coeff)."""
    d = accuracy - previous
    D = d.sum() + 1e-8
    return (D - d) / D


def direction_gradient(fusion: torch.Tensor, heads: list[torch.Tensor], B: torch.Tensor):
    """(cos_u, dL_gm / dW_F) from the flattened weights: one Gram launch and one weighted_sum launch."""
    X = torch.stack([fusion.detach().reshape(-1), *(h.detach().reshape(-1).to(fusion.dtype) for h in heads)])
    acc = torch.promote_types(X.dtype, torch.float32)
    X = X.to(acc)
    cos, w = direction_weights(ops.gram(X).double(), B)
    return cos, ops.weighted_sum(X, w).view_as(fusion)


def direction_weights(G: torch.Tensor, B: torch.Tensor):
    """(cos_u, w) from the float64 Gram of [W_F, W_1, ..., W_M]: dL_gm / dW_F = sum_r w_r X_r over those rows."""
    norms = G.diagonal().sqrt()
    M = G.shape[0] - 1
    cos = G[0, 1:] / (norms[0] * norms[1:])
    Bd = B.to(G.dtype)
    w = torch.empty(M + 1, dtype=torch.float64, device=G.device)
    w[0] = (Bd * cos).sum() / (M * norms[0] ** 2)
    w[1:] = -Bd / (M * norms[1:] * norms[0])
    return cos, w


@register
class CGGM(Method):
    name = "cggm"
    requires = ("fused", "features", "target", "fused_logits")
    modulates_encoders = True
    plain_gradients = False
    fsdp2 = True

    def __init__(
        self,
        groups,
        rou: float = 1.3,
        lamda: float = 0.05,
        cls_lr: float = 5e-4,
        clip: float | None = 0.8,
        fusion_head=None,
    ):
        super().__init__(groups)
        if len(groups.modalities) < 2:
            raise ValueError("method 'cggm' needs at least two modalities")
        self.rou = check.positive("rou", rou)
        if isinstance(lamda, bool) or not isinstance(lamda, (int, float)) or not lamda >= 0:
            raise ValueError(f"lamda must be a number >= 0, got {lamda!r}")
        self.lamda = float(lamda)
        self.cls_lr = check.positive("cls_lr", cls_lr)
        self.clip = None if clip is None else check.positive("clip", clip)
        if fusion_head is None:
            candidates = [p for _, p in groups.shared if p.dim() == 2]
            if len(candidates) != 1:
                raise ValueError(
                    "method 'cggm' needs the fusion head's weight: pass fusion_head=<the [C, d] parameter>, or "
                    f"shared= with exactly one 2-D parameter (it has {len(candidates)})"
                )
            fusion_head = candidates[0]
        if not isinstance(fusion_head, torch.nn.Parameter) or fusion_head.dim() != 2:
            raise TypeError(f"fusion_head must be a 2-D nn.Parameter [C, d], got {type(fusion_head).__name__}")
        if not any(fusion_head is p for p in groups.trainable):
            raise ValueError("fusion_head must be a trainable parameter of the model given to Balancer")
        self.fusion_head = fusion_head
        self.classifiers: list[list[torch.Tensor]] | None = None  # per modality [weight [C, d], bias [C]]
        self.optimizer: torch.optim.Optimizer | None = None
        self.previous = torch.zeros(len(groups.modalities), dtype=torch.float64)
        self.pending: torch.Tensor | None = None  # lamda * dL_gm/dW_F of the last step, added at the next
        self._last: dict[str, float] = {}

    def _build(self, step) -> None:
        C = step.fused_logits.shape[-1]
        W = self.fusion_head
        self.classifiers = []
        g = torch.Generator().manual_seed(0)  # the same initial classifiers on every rank
        for m in self.groups.modalities:
            d = step.features[m].shape[1]
            bound = 1 / d**0.5  # nn.Linear's initialisation
            weight = (torch.rand(C, d, generator=g, dtype=torch.float64) * 2 - 1) * bound
            bias = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * bound
            self.classifiers.append([t.to(W.device, step.features[m].dtype).requires_grad_() for t in (weight, bias)])
        self.optimizer = self._optimizer()

    def _optimizer(self):
        params = [t for pair in self.classifiers for t in pair]
        return torch.optim.AdamW(params, lr=self.cls_lr, weight_decay=3e-3)

    def check(self, step):
        C, N = step.fused_logits.shape[-1], step.target.shape[0]
        if self.fusion_head.shape[0] != C:
            raise ValueError(f"fusion_head has {self.fusion_head.shape[0]} rows but fused_logits has {C} classes")
        for u, m in enumerate(self.groups.modalities):
            z = step.features[m]
            if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != N or not z.is_floating_point():
                raise ValueError(
                    f"features[{m!r}] must be a floating-point embedding [N, d] with N = {N} (the target's "
                    f"length), got {getattr(z, 'shape', type(z).__name__)}"
                )
            if self.lamda > 0 and z.shape[1] != self.fusion_head.shape[1]:
                raise ValueError(
                    f"cggm's direction term compares each classifier's weight [C, d] with the fusion head's "
                    f"{tuple(self.fusion_head.shape)}, but features[{m!r}] has d = {z.shape[1]}: use a fusion head "
                    "of the embeddings' width, or lamda=0 to drop the term"
                )
            if self.classifiers is not None and self.classifiers[u][0].shape != (C, z.shape[1]):
                raise ValueError(f"features[{m!r}] must keep d = {self.classifiers[u][0].shape[1]} features")

    def backward(self, step, total):
        groups, mods = self.groups, self.groups.modalities
        if self.classifiers is None:
            self._build(step)
        y = step.target
        params = [t for pair in self.classifiers for t in pair]
        correct, losses = [], []
        for (weight, bias), m in zip(self.classifiers, mods):
            logits = F.linear(step.features[m].detach(), weight, bias)
            losses.append(F.cross_entropy(logits, y))
            correct.append((logits.detach().argmax(1) == y).sum().double())
        grads = torch.autograd.grad(sum(losses), params)
        flat = torch.cat([g.reshape(-1) for g in grads]) * groups.weight  # N_r / N: summed, it is the mean
        counts = torch.stack([*correct, torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device)])
        if groups.fsdp:
            flat, accuracy, B, cos = self._fsdp_backward(total, flat, counts)
        else:
            accuracy, B, cos = self._modulate(total, flat, counts)
        start = 0
        for p in params:
            p.grad = flat[start : start + p.numel()].view_as(p).clone()
            start += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._last = {f"{m}/coefficient": float(B[u]) for u, m in enumerate(mods)}
        self._last.update({f"{m}/classifier_accuracy": float(accuracy[u]) for u, m in enumerate(mods)})
        if cos is not None:
            self._last.update({f"{m}/cos": float(cos[u]) for u, m in enumerate(mods)})
            self._last["direction_loss"] = float((B.abs().sum() - (B * cos).sum()) / len(mods))

    def _modulate(self, total, flat, counts):
        """Without FSDP2: encoder banks, classifier gradients and counts in one packed collective, then the
        direction term, the encoder scaling and the clip on the whole (reduced) gradients."""
        groups, mods = self.groups, self.groups.modalities
        banks = reduce_encoder_banks(groups, total, summed=[flat, counts])
        counts = counts.cpu()
        accuracy = counts[:-1] / counts[-1]
        B = balancing_terms(accuracy, self.previous)
        self.previous = accuracy
        W = self.fusion_head
        if W.grad is None:
            raise ValueError("the fusion head received no gradient from the step's losses (cggm's fusion_head)")
        if self.pending is not None:
            W.grad.add_(self.pending.to(W.grad.dtype))
        cos = None
        if self.lamda > 0:
            cos, grad = direction_gradient(W, [w for w, _ in self.classifiers], B.to(W.device))
            self.pending = self.lamda * grad
            cos = cos.cpu()
        for u, m in enumerate(mods):
            for layout, buf in banks[m]:
                scale = torch.full((len(layout.params),), self.rou * float(B[u]), dtype=torch.float64)
                ops.segment_scale_(buf[0], layout.offsets, scale.to(buf.device))
        if self.clip is not None:  # the authors' clip_grad_norm_ over the model, after the modulation
            torch.nn.utils.clip_grad_norm_([p for p in groups.trainable if p.grad is not None], self.clip)
        return accuracy, B, cos

    def _fsdp_backward(self, total, flat, counts):
        """FSDP2: see the module docstring. Returns (summed classifier gradients, accuracy, B, cos)."""
        groups, mods = self.groups, self.groups.modalities
        M = len(mods)
        groups.backward(total, groups.trainable)
        W = self.fusion_head
        if W.grad is None:
            raise ValueError("the fusion head received no gradient from the step's losses (cggm's fusion_head)")
        W_grad = W.grad.to_local()
        if self.pending is not None:
            W_grad.add_(self.pending.to(W_grad.dtype))
        # this rank's rows of W_F and of every classifier weight (FSDP2's Shard(0) chunk of W_F)
        start, count = groups.shard_range(W)
        first, rows = start // W.shape[1], count // W.shape[1]
        X = torch.stack(
            [W.detach().to_local().reshape(-1)]
            + [w.detach()[first : first + rows].reshape(-1).to(W.dtype) for w, _ in self.classifiers]
        ).to(torch.promote_types(W.dtype, torch.float32))
        dev = W_grad.device
        gram = ops.gram(X).double() if X.shape[1] else torch.zeros(M + 1, M + 1, dtype=torch.float64, device=dev)
        encoders = {id(p) for m in mods for layout in groups.encoder_layouts[m] for p in layout.params}
        shards = {m: _shards(p for layout in groups.encoder_layouts[m] for p in layout.params) for m in mods}
        rest = _shards(p for p in groups.trainable if id(p) not in encoders)
        sq = torch.stack([_sq_norm(shards[m], dev) for m in mods] + [_sq_norm(rest, dev)])
        packed = torch.cat([flat.double().to(dev), counts.double().to(dev), gram.to(dev).reshape(-1), sq])
        groups.all_reduce_(summed=[packed])  # one float64 collective
        packed = packed.cpu()
        flat = packed[: flat.numel()].to(flat)
        counts = packed[flat.numel() : flat.numel() + M + 1]
        gram = packed[flat.numel() + M + 1 : -(M + 1)].view(M + 1, M + 1)
        sq = packed[-(M + 1) :]
        accuracy = counts[:-1] / counts[-1]
        B = balancing_terms(accuracy, self.previous)
        self.previous = accuracy
        cos = None
        if self.lamda > 0:
            cos, w = direction_weights(gram, B)
            local = ops.weighted_sum(X, w.to(X.device)) if X.shape[1] else X[0]
            self.pending = self.lamda * local.view_as(W_grad)
        scales = [self.rou * float(B[u]) for u in range(M)]
        with torch.no_grad():
            for u, m in enumerate(mods):
                if shards[m]:
                    torch._foreach_mul_(shards[m], scales[u])
            if self.clip is not None:  # clip_grad_norm_'s rule, on the global norm
                norm = float(sum(s * s * float(sq[u]) for u, s in enumerate(scales)) + float(sq[M])) ** 0.5
                coefficient = min(self.clip / (norm + 1e-6), 1.0)
                everything = [g for m in mods for g in shards[m]] + rest
                if everything:
                    torch._foreach_mul_(everything, coefficient)
        return flat, accuracy, B, cos

    def stats(self):
        return dict(self._last)

    def state_dict(self):
        return {
            "classifiers": None
            if self.classifiers is None
            else [[t.detach().clone() for t in p] for p in self.classifiers],
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "previous": self.previous.clone(),
            "pending": None if self.pending is None else self.pending.clone(),
        }

    def load_state_dict(self, state):
        if not isinstance(state, dict) or set(state) != {"classifiers", "optimizer", "previous", "pending"}:
            raise ValueError("the cggm state must hold classifiers, optimizer, previous and pending")
        M = len(self.groups.modalities)
        classifiers, previous, pending = state["classifiers"], state["previous"], state["pending"]
        if not isinstance(previous, torch.Tensor) or previous.shape != (M,):
            raise ValueError(f"the cggm state's previous accuracies must be a tensor of {M} values, got {previous!r}")
        # under FSDP2, pending is this rank's rows of dL_gm / dW_F
        shape = self.fusion_head.to_local().shape if self.groups.fsdp else self.fusion_head.shape
        if pending is not None and (not isinstance(pending, torch.Tensor) or pending.shape != shape):
            raise ValueError(f"the cggm state's pending gradient must be None or of shape {tuple(shape)}")
        if classifiers is not None and (
            not isinstance(classifiers, list)
            or len(classifiers) != M
            or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(t, torch.Tensor) for t in p) for p in classifiers
            )
        ):
            raise ValueError(f"the cggm state's classifiers must be None or {M} [weight, bias] pairs")
        if classifiers is None:
            self.classifiers, self.optimizer = None, None
        else:
            device = self.fusion_head.device
            self.classifiers = [[t.detach().to(device).clone().requires_grad_() for t in p] for p in classifiers]
            self.optimizer = self._optimizer()
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
        self.previous = previous.double().cpu().clone()
        self.pending = None if pending is None else pending.detach().clone()


def _shards(params) -> list[torch.Tensor]:
    """FSDP2: this rank's non-empty gradient shards of `params` (None gradients skipped)."""
    return [g for g in (p.grad.to_local() for p in params if p.grad is not None) if g.numel()]


def _sq_norm(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """float64 sum of the squared norms of `tensors`, on `device` (0 for none)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([t.double().square().sum().to(device) for t in tensors]).sum()
