"""Method "pmr": prototypical modal rebalance.

Source: Fan, Xu, Wei, Hu, Wang, "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023 (the
authors' code fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py, and GeWu-Lab/BalanceBenchmark's
PMR_trainer.py, whose coefficient is the paper's clipped ratio).

Per step, with z_u the embedding of modality u ([N, d_u], `features=` in Balancer.backward), c_u[k] the prototype
of class k for modality u and d(z, c) the Euclidean distance:
    p_u(k | z)  = softmax_k(-d(z_u, c_u[k]))                          (prototype classifier)
    L_PCE,u     = mean_i -log p_u(y_i | z_u,i)                        (prototypical cross-entropy)
    s_u         = sum_i p_u(y_i | z_u,i)                              (prototype score)
    rho_u       = mean_{j != u} s_j / s_u
    beta_u      = clip(rho_u - 1, 0, 1)            (form="ratio", the paper / BalanceBenchmark; the weak modality)
                = 1 if rho_u > 1 else 0            (form="step", the authors' script)
    H_u         = mean_i entropy(p_u(. | z_u,i))                      (prototypical entropy, PER)
    gamma_u     = clip(s_u / mean_{j != u} s_j - 1, 0, 1)             (the dominant modality's weight)
    loss        = L_fused (+ unimodal losses if passed) + alpha sum_u beta_u L_PCE,u - mu sum_u gamma_u H_u
The PCE term accelerates the slow (weak) modality through its prototype classifier; the PER term (mu > 0, for
the first `per_epochs` epochs of the window) raises the entropy of the dominant modality's prototype classifier,
slowing it. For M = 2 both coefficients are exactly BalanceBenchmark's (beta on the weak modality = lam on the
dominant's PER = clip(s_dom / s_weak - 1, 0, 1)); for M >= 3 each modality is compared with the mean score of the
others (as ogm_ge and inforeg do). Active for start_epoch <= epoch <= end_epoch (0 and 100, the authors').

Prototypes: per class, the mean of the embeddings of that class (detached), updated as in the authors' code
    c_u <- (1 - momentum) mean_epoch + momentum c_u          (momentum 0.2; no momentum at the first update)
at each end_epoch, from the embeddings this method saw during the epoch (summed over ranks). Before the first
end_epoch the prototypes are the class means of the steps so far (this step excluded); a class with no sample
yet has no prototype: it is left out of the softmax, and samples of that class add no PCE term.
What differs from the authors' code, and why:
- the authors recompute the prototypes with an extra no-grad pass over a tenth of the training set at each epoch
  start (in eval mode); the Balancer does not own the data loader, so the epoch's own training embeddings are
  used (older by up to one epoch);
- their PER (BalanceBenchmark's PMR_PER) picks the dominant modality by the unimodal losses and sums the entropy
  over the batch; here the dominant modality is the one the prototype scores pick and the entropy is a mean
  (mu here = theirs x batch size), so that distributed steps equal one process on the concatenated batch;
- BalanceBenchmark's M >= 3 branch switches to an OGM-GE-style gradient scaling; here the same PCE/PER objective
  is used for any M (the comparison with the mean of the others, above).
Distributed: the scores and the class sums and counts are summed over ranks in one collective before the
coefficients are formed, so every rank uses the same coefficients and prototypes, and the step equals one
process on the concatenated batch. Gradients are those of one plain backward of the objective.
"""

from __future__ import annotations

import torch

from modfuse import _checks as check
from modfuse.methods import Method, register

FORMS = ("ratio", "step")


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """-d(z_i, c_k) [N, C]; classes without a prototype are -inf (left out of the softmax)."""
    acc = torch.promote_types(features.dtype, torch.float32)
    sim = -torch.cdist(features.to(acc), prototypes.to(acc))
    return sim.masked_fill(~present, float("-inf"))


def pce_terms(sim: torch.Tensor, target: torch.Tensor, present: torch.Tensor):
    """Per-sample -log p(y_i) (0 where y_i has no prototype), the score sum_i p(y_i), and the entropies."""
    valid = present[target]
    logp = torch.log_softmax(sim, dim=1)
    nll = -logp.gather(1, target.reshape(-1, 1)).squeeze(1)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(1)
    score = torch.where(valid, (-nll).exp(), torch.zeros_like(nll)).sum()
    return nll, score, entropy


def coefficients(scores: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta, gamma) per modality from the prototype scores s ([M], float64)."""
    M = scores.numel()
    rest = (scores.sum() - scores) / (M - 1)
    if form == "step":
        beta = (rest > scores).to(scores.dtype)
    else:
        beta = torch.clamp(rest / scores - 1, 0, 1)
    gamma = torch.clamp(scores / rest - 1, 0, 1)
    # a modality (or all) with a zero score: no finite ratio, no term
    return torch.nan_to_num(beta, nan=0.0, posinf=1.0), torch.nan_to_num(gamma, nan=0.0, posinf=1.0)


@register
class PMR(Method):
    name = "pmr"
    requires = ("fused", "features", "target", "fused_logits")
    plain_gradients = False  # the coefficients need every rank's scores each call
    fsdp2 = True

    def __init__(
        self,
        groups,
        alpha: float = 1.0,
        mu: float = 0.0,
        momentum: float = 0.2,
        form: str = "ratio",
        start_epoch: int = 0,
        end_epoch: int = 100,
        per_epochs: int = 10,
    ):
        super().__init__(groups)
        if len(groups.modalities) < 2:
            raise ValueError("method 'pmr' needs at least two modalities")
        self.alpha = check.positive("alpha", alpha)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu >= 0:
            raise ValueError(f"mu must be a number >= 0, got {mu!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
        for name, value in (("start_epoch", start_epoch), ("end_epoch", end_epoch), ("per_epochs", per_epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if end_epoch < start_epoch:
            raise ValueError(f"end_epoch ({end_epoch}) must be >= start_epoch ({start_epoch})")
        self.mu, self.momentum, self.form = float(mu), float(momentum), form
        self.window = (start_epoch, end_epoch)
        self.per_epochs = per_epochs
        # float64 on the CPU: tiny [C, d] tables, exact whatever the model dtype
        self.prototypes: list[torch.Tensor] | None = None  # per modality [C, d_u], after the first end_epoch
        self.present: torch.Tensor | None = None  # [C] classes that have a prototype
        self.sums: list[torch.Tensor] | None = None  # this epoch's class sums per modality
        self.counts: torch.Tensor | None = None  # this epoch's class counts
        self._last: dict[str, float] = {}

    def check(self, step):
        C = step.fused_logits.shape[-1]
        N = step.target.shape[0]
        for u, m in enumerate(self.groups.modalities):
            z = step.features[m]
            if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != N or not z.is_floating_point():
                raise ValueError(
                    f"features[{m!r}] must be a floating-point embedding [N, d] with N = {N} (the target's "
                    f"length), got {getattr(z, 'shape', type(z).__name__)}"
                )
            known = self.sums[u].shape if self.sums is not None else None
            if known is not None and tuple(z.shape[1:]) != (known[1],):
                raise ValueError(f"features[{m!r}] must keep d = {known[1]} features per sample, got {z.shape[1]}")
        if self.counts is not None and self.counts.numel() != C:
            raise ValueError(f"fused_logits must keep {self.counts.numel()} classes, got {C}")
        if N and (int(step.target.min()) < 0 or int(step.target.max()) >= C):
            raise ValueError(f"target must hold class indices in [0, {C}), the classes of fused_logits")

    def _current(self, C: int):
        """The prototypes this step uses and which classes have one (float64, CPU)."""
        if self.prototypes is not None:
            return self.prototypes, self.present
        if self.counts is None:
            return None, torch.zeros(C, dtype=torch.bool)
        present = self.counts > 0
        return [s / self.counts.clamp(min=1).unsqueeze(1) for s in self.sums], present

    def backward(self, step, total):
        groups, mods = self.groups, self.groups.modalities
        y = step.target
        C = step.fused_logits.shape[-1]
        if self.counts is None:
            self.sums = [torch.zeros(C, step.features[m].shape[1], dtype=torch.float64) for m in mods]
            self.counts = torch.zeros(C, dtype=torch.float64)
        protos, present = self._current(C)
        terms, scores = [], []
        for u, m in enumerate(mods):
            z = step.features[m]
            if protos is None or not bool(present.any()):
                terms.append(None)
                scores.append(torch.zeros((), dtype=torch.float64))
                continue
            sim = prototype_logits(z, protos[u].to(z.device), present.to(z.device))
            nll, score, entropy = pce_terms(sim, y, present.to(z.device))
            terms.append((nll.mean(), entropy.mean()))
            scores.append(score.detach().double().cpu())
        # one collective: scores, this batch's class sums and counts (float64, on the features' device)
        device = step.features[mods[0]].device
        onehot = torch.nn.functional.one_hot(y.to(device), C).double()
        batch_sums = [onehot.t() @ step.features[m].detach().to(device, torch.float64) for m in mods]
        packed = torch.cat([torch.stack(scores).to(device), *(b.reshape(-1) for b in batch_sums), onehot.sum(0)])
        groups.all_reduce_(summed=[packed])
        packed = packed.cpu()
        M = len(mods)
        s = packed[:M]
        start = M
        for u in range(M):
            n = batch_sums[u].numel()
            self.sums[u] += packed[start : start + n].view(self.sums[u].shape)
            start += n
        self.counts += packed[start:]
        active = self.window[0] <= step.epoch <= self.window[1] and all(t is not None for t in terms)
        beta, gamma = coefficients(s, self.form) if active else (torch.zeros(M, dtype=torch.float64),) * 2
        per = self.mu > 0 and step.epoch <= self.window[0] + self.per_epochs
        extra = []
        for u, t in enumerate(terms):
            if t is None:
                continue
            if beta[u] > 0:
                extra.append(self.alpha * float(beta[u]) * t[0])
            if per and gamma[u] > 0:
                extra.append(-self.mu * float(gamma[u]) * t[1])
        if extra:
            total = total + sum(e.to(total.dtype) for e in extra)
        self._last = {f"{m}/prototype_score": float(s[u]) for u, m in enumerate(mods)}
        self._last.update({f"{m}/pce_coefficient": float(beta[u]) for u, m in enumerate(mods)})
        if per:
            self._last.update({f"{m}/per_coefficient": float(gamma[u]) for u, m in enumerate(mods)})
        super().backward(step, total)

    def end_epoch(self, epoch):
        if self.counts is None:
            return
        seen = self.counts > 0
        means = [s / self.counts.clamp(min=1).unsqueeze(1) for s in self.sums]
        if self.prototypes is None:
            self.prototypes, self.present = means, seen.clone()
        else:
            k = self.momentum
            self.prototypes = [
                torch.where(seen.unsqueeze(1), (1 - k) * new + k * old, old) for new, old in zip(means, self.prototypes)
            ]
            self.present = self.present | seen
        self.sums = [torch.zeros_like(s) for s in self.sums]
        self.counts = torch.zeros_like(self.counts)

    def stats(self):
        return dict(self._last)

    def state_dict(self):
        clone = lambda ts: None if ts is None else [t.clone() for t in ts]  # noqa: E731
        return {
            "prototypes": clone(self.prototypes),
            "present": None if self.present is None else self.present.clone(),
            "sums": clone(self.sums),
            "counts": None if self.counts is None else self.counts.clone(),
        }

    def load_state_dict(self, state):
        if not isinstance(state, dict) or set(state) != {"prototypes", "present", "sums", "counts"}:
            raise ValueError("the pmr state must hold prototypes, present, sums and counts")
        M = len(self.groups.modalities)
        for key in ("prototypes", "sums"):
            v = state[key]
            if v is not None and (
                not isinstance(v, list) or len(v) != M or not all(isinstance(t, torch.Tensor) for t in v)
            ):
                raise ValueError(f"the pmr state's {key} must be None or a list of {M} tensors, got {v!r}")
        for key in ("present", "counts"):
            if state[key] is not None and not isinstance(state[key], torch.Tensor):
                raise ValueError(f"the pmr state's {key} must be None or a tensor")
        if (state["prototypes"] is None) != (state["present"] is None) or (state["sums"] is None) != (
            state["counts"] is None
        ):
            raise ValueError("the pmr state's prototypes/present and sums/counts must be given together")
        self.prototypes = (
            None if state["prototypes"] is None else [t.double().cpu().clone() for t in state["prototypes"]]
        )
        self.present = None if state["present"] is None else state["present"].bool().cpu().clone()
        self.sums = None if state["sums"] is None else [t.double().cpu().clone() for t in state["sums"]]
        self.counts = None if state["counts"] is None else state["counts"].double().cpu().clone()
