"""Method "inforeg": adaptive unimodal regulation in the prime learning window (Fisher trace + proximal term).

Source: Huang, Wei, Hu et al., "Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition",
CVPR 2025 (GeWu-Lab/InfoReg_CVPR2025, main.py).

Objective: L_fused + sum_m L_m (the authors' loss + loss_a + loss_v). Per epoch e, for every encoder m:
    Fisher trace   tr_m(e) = sum_t mean_elements( sum_steps g_t^2 )   over m's weight tensors t (dim >= 2; the
                   authors: Conv2d/Linear weights), g the final `.grad` of the step (after the proximal term)
    window signal  k_m(e)  = (A - B) / A,  A = sum(tr_m[-10:]) / 10,  B = sum(tr_m[-11:-1]) / 10  (epochs before e;
                   k = 1 in epoch 0, 0 when A = 0): the trace still rising = the prime learning window is open
Per step, with s_u = sum_i softmax(logits_u)_i[y_i] (a sum over the batch, as the authors'):
    modality u is dominant when s_u > mean_{j != u} s_j; when also k_u > window (0.04):
        g_u <- g_u + beta_u (theta_u - theta_u^anchor),   beta_u = coefficient * exp(tanh(s_u - mean_{j != u} s_j))
    theta^anchor = the encoder's parameters at the start of the epoch (the authors' deepcopy of the model), i.e.
    the gradient of the proximal term beta_u / 2 ||theta_u - theta_u^anchor||^2.
M >= 3: each modality is compared with the mean score of the others (for M = 2: s_a > s_v, the authors' test), and
each has its own trace history and window.
What differs from the authors' code, and why:
- the authors compute the window from the audio trace only and their second branch repeats the first condition
  (`elif score_v < score_a`), so only audio is ever regulated (coefficient 0.95; 0.1 was meant for visual); here
  every modality is regulated when it dominates and its own window is open, with one `coefficient` (0.95);
- the authors' trace is over Conv2d/Linear weights; here over every encoder tensor with dim >= 2.
Fused ops: the encoder's gradients sit in a flat bank (Groups.backward_into_banks); one Op 1 launch per encoder
gives every tensor's sum of squares for the trace; row 1 of the bank holds theta - theta^anchor.
Distributed: the scores are sums over samples and the gradients the reduced ones, so every rank takes the same
decision and the step equals one process on the concatenated batch. Under FSDP2: one plain backward through
FSDP2's reduce-scatter; the anchors are this rank's shards; per modality the shard-local partial sums of
g.g / n_t, g.d / n_t and d.d / n_t (d = theta - theta^anchor, over its dim >= 2 tensors of n_t elements) go with
the scores in one tiny all-reduce, so the trace of g + beta d is g.g + 2 beta g.d + beta^2 d.d without a second
collective, and each rank adds beta d to its own shards (d only where the window is open, which every rank knows).
"""

from __future__ import annotations

import torch

from modfuse import _checks as check
from modfuse import ops
from modfuse.methods import Method, reduce_encoder_banks, register, wire_dtype
from modfuse.methods.utilization import true_class_probability


def window_signal(traces: list[float]) -> float:
    """k from the per-epoch Fisher traces so far (the authors' 10-epoch moving averages); 1 before any epoch."""
    if not traces:
        return 1.0
    newer, older = sum(traces[-10:]) / 10, sum(traces[-11:-1]) / 10
    return (newer - older) / newer if newer != 0 else 0.0


def proximal_coefficients(scores: torch.Tensor, open_: torch.Tensor, coefficient: float) -> torch.Tensor:
    """beta_u for every modality: coefficient * exp(tanh(s_u - mean of the others)) where u dominates and its
    window is open, else 0."""
    M = scores.numel()
    others = ~torch.eye(M, dtype=torch.bool, device=scores.device)
    rest = torch.where(others, scores.expand(M, M), torch.zeros_like(scores).expand(M, M)).sum(1) / (M - 1)
    gap = scores - rest
    beta = coefficient * torch.exp(torch.tanh(gap))
    return torch.where((gap > 0) & open_, beta, torch.zeros_like(beta))


@register
class InfoReg(Method):
    name = "inforeg"
    requires = ("fused", "unimodal", "logits", "target")
    modulates_encoders = True
    plain_gradients = False
    fsdp2 = True

    def __init__(self, groups, coefficient: float = 0.95, window: float = 0.04):
        super().__init__(groups)
        if len(groups.modalities) < 2:
            raise ValueError("method 'inforeg' needs at least two modalities")
        self.coefficient = check.positive("coefficient", coefficient)
        if isinstance(window, bool) or not isinstance(window, (int, float)):
            raise TypeError(f"window must be a number, got {window!r}")
        self.window = float(window)
        self.traces: dict[str, list[float]] = {m: [] for m in groups.modalities}  # one entry per finished epoch
        self._epoch_trace = {m: 0.0 for m in groups.modalities}
        self.anchors = self._snapshot()
        self._beta: list[float] | None = None

    def _snapshot(self) -> dict[str, list[torch.Tensor]]:
        """Every encoder's parameters now, flat per layout (the proximal anchors)."""
        out = {}
        for m, layouts in self.groups.encoder_layouts.items():
            out[m] = []
            for layout in layouts:
                if self.groups.fsdp:  # this rank's shards, end to end
                    shards = [p.detach().to_local().reshape(-1) for p in layout.params]
                    out[m].append(torch.cat(shards).clone())
                    continue
                flat = layout.grad_rows(1)[0]
                layout.flatten_into(flat, [p.detach() for p in layout.params])
                out[m].append(flat)
        return out

    def backward(self, step, total):
        groups = self.groups
        scores = torch.stack(
            [true_class_probability(step.logits[m].detach(), step.target).sum() for m in groups.modalities]
        )
        if groups.fsdp:
            self._fsdp_backward(total, scores.double())
            return
        # packed with the gradients, so in their dtype when that is float32/float64 (one collective, not two)
        scores = scores.to(wire_dtype(groups))
        banks = reduce_encoder_banks(groups, total, rows=2, summed=[scores])
        scores = scores.double()
        open_ = torch.tensor(
            [window_signal(self.traces[m]) > self.window for m in groups.modalities], device=scores.device
        )
        beta = proximal_coefficients(scores, open_, self.coefficient)
        self._beta = beta.tolist()
        for u, m in enumerate(groups.modalities):
            for (layout, buf), anchor in zip(banks[m], self.anchors[m]):
                if self._beta[u] > 0:
                    layout.flatten_into(buf[1], [p.detach() for p in layout.params])
                    buf[1].sub_(anchor)
                    buf[0].add_(buf[1], alpha=self._beta[u])
                sq = ops.segment_sq_norms(buf[0], layout.offsets).double()  # one launch: every tensor's sum g^2
                sizes = (layout.offsets[1:] - layout.offsets[:-1]).to(sq)
                weights = torch.tensor([p.dim() >= 2 for p in layout.params], dtype=sq.dtype, device=sq.device)
                self._epoch_trace[m] += float((sq / sizes.clamp(min=1) * weights).sum())

    def _fsdp_backward(self, total, scores):
        """FSDP2: plain backward through FSDP2's reduce-scatter, then one tiny all-reduce (scores and the trace's
        partial sums, see the module docstring); each rank adds beta d to its own gradient shards."""
        groups, mods = self.groups, self.groups.modalities
        groups.backward(total, groups.trainable)
        open_ = [window_signal(self.traces[m]) > self.window for m in mods]  # the same on every rank
        # per modality: g.g, g.d, d.d over n_t, on the scores' device (one collective for both)
        partial = torch.zeros(len(mods), 3, dtype=torch.float64, device=scores.device)
        shards = []
        for u, m in enumerate(mods):
            for layout, anchor in zip(groups.encoder_layouts[m], self.anchors[m]):
                start = 0
                for p in layout.params:
                    theta = p.detach().to_local()
                    a = anchor[start : start + theta.numel()].view_as(theta)
                    start += theta.numel()
                    g = p.grad.to_local() if p.grad is not None else None
                    d = theta - a if open_[u] else None
                    shards.append((u, g, d))
                    if p.dim() < 2 or theta.numel() == 0:
                        continue
                    gd = None if g is None else g.double()
                    dd = None if d is None else d.double()
                    for j, (x, y) in enumerate([(gd, gd), (gd, dd), (dd, dd)]):
                        if x is not None and y is not None:
                            partial[u, j] += torch.dot(x.reshape(-1), y.reshape(-1)).to(partial.device) / p.numel()
        groups.all_reduce_(summed=[scores, partial])
        beta = proximal_coefficients(scores, torch.tensor(open_, device=scores.device), self.coefficient)
        self._beta = beta.tolist()
        with torch.no_grad():
            for u, g, d in shards:
                if self._beta[u] > 0 and g is not None and d is not None:
                    g.add_(d.to(g.dtype), alpha=self._beta[u])
        for u, (gg, gd, dd) in enumerate(partial.tolist()):
            b = self._beta[u]
            self._epoch_trace[mods[u]] += gg + 2 * b * gd + b * b * dd

    def end_epoch(self, epoch):
        for m in self.groups.modalities:
            self.traces[m].append(self._epoch_trace[m])
            self._epoch_trace[m] = 0.0
        self.anchors = self._snapshot()

    def stats(self):
        out = {f"{m}/window": window_signal(self.traces[m]) for m in self.groups.modalities}
        if self._beta is not None:
            out.update({f"{m}/beta": b for m, b in zip(self.groups.modalities, self._beta)})
        for m in self.groups.modalities:
            if self.traces[m]:
                out[f"{m}/fisher_trace"] = self.traces[m][-1]
        return out

    def state_dict(self):
        # anchors as one float64 tensor (exact for every float dtype), in encoder and layout order
        flat = [a.detach().to("cpu", torch.float64) for m in self.groups.modalities for a in self.anchors[m]]
        return {
            "traces": {m: list(v) for m, v in self.traces.items()},
            "epoch_trace": dict(self._epoch_trace),
            "anchors": torch.cat(flat),
        }

    def load_state_dict(self, state):
        traces, epoch_trace, anchors = state.get("traces"), state.get("epoch_trace"), state.get("anchors")
        mods = set(self.groups.modalities)
        if (
            not isinstance(traces, dict)
            or set(traces) != mods
            or not isinstance(epoch_trace, dict)
            or set(epoch_trace) != mods
        ):
            raise ValueError(f"the inforeg state must hold traces and epoch_trace for the modalities {sorted(mods)}")
        sizes = [a.numel() for m in self.groups.modalities for a in self.anchors[m]]
        if not isinstance(anchors, torch.Tensor) or anchors.shape != (sum(sizes),):
            raise ValueError(
                f"the inforeg state's anchors must be one tensor of {sum(sizes)} values (this model's "
                f"encoder parameters; under FSDP2 this rank's shards), got {getattr(anchors, 'shape', anchors)!r}"
            )
        parts = iter(torch.split(anchors, sizes))
        self.anchors = {m: [next(parts).to(a) for a in self.anchors[m]] for m in self.groups.modalities}
        self.traces = {m: [float(x) for x in traces[m]] for m in self.groups.modalities}
        self._epoch_trace = {m: float(epoch_trace[m]) for m in self.groups.modalities}
