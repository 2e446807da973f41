"""Method "ogm_ge": on-the-fly gradient modulation with generalisation enhancement.

Source: Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022,
and its official code (GeWu-Lab/OGM-GE_CVPR2022); generalised to M modalities (docs/math.md#ogm_ge).

Per step, from the unimodal logits out_u (see `concat_head_unimodal_logits` for a concat head):
    s_u   = sum_i softmax(out_u)_i[y_i]                         (confidence in the true class over the batch)
    rho_u = s_u / mean_{j != u} s_j
    k_u   = 1 - tanh(alpha * rho_u) if rho_u > 1 else 1         (default: the paper's form, a jump at rho = 1)
            at an exact tie (every rho_u = 1: all scores equal) the first modality gets 1 - tanh(alpha), as the
            official code's else-branch scales its first modality (audio) when ratio_v = 1
    k_u   = 1 - tanh(alpha * relu(rho_u - 1))                    (continuous=True: much weaker at one alpha)
Encoder u's gradients are scaled by k_u; with ge=True every modulated tensor of every encoder then gets
N(0, std^2) noise, std = the standard deviation of that tensor's unscaled gradient (+1e-8), as the official code
does. Modulated tensors: those with dim >= 2 (the official code: conv weights only) or all (modulate="all").
Active for start_epoch <= epoch <= end_epoch (official: 0 and 50). alpha has no general default in the paper
(0.8 for CREMA-D, 0.1 for VGGSound); 0.8 here.

The training objective is the fused loss (plus the unimodal losses, if passed). Fused ops: the encoder's
gradients sit in one flat bank (see Groups.backward_into_banks); Op 1 gives every tensor's sum of squares in one
launch and Op 6 (segment_scale_) scales and adds the noise to all of them in one more.
"""

from __future__ import annotations

import math

import torch

from modfuse import _checks as check
from modfuse import ops, reference
from modfuse.groups import NonFiniteGradient
from modfuse.methods import Method, reduce_encoder_banks, register
from modfuse.methods.utilization import true_class_probability


def concat_head_unimodal_logits(head: torch.nn.Linear, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unimodal logits of a concat-fusion head, the official code's split: W[:, block_u] h_u + b / M.

    `features` maps modality -> embedding [N, d_u], in the order the head concatenates them.
    """
    M = len(features)
    out, start = {}, 0
    for name, h in features.items():
        block = head.weight[:, start : start + h.shape[-1]]
        start += h.shape[-1]
        logits = h @ block.t()
        out[name] = logits + head.bias / M if head.bias is not None else logits
    if start != head.in_features:
        raise ValueError(f"the features have {start} dims in total but the head takes {head.in_features}")
    return out


def modulation(scores: torch.Tensor, alpha: float, continuous: bool) -> torch.Tensor:
    """k_u from the per-modality scores s_u (docs/math.md#ogm_ge)."""
    M = scores.numel()
    # the others' mean summed directly (not total - own), so that a tie gives rho = 1 exactly, as s_v / s_a does
    others = ~torch.eye(M, dtype=torch.bool, device=scores.device)
    rest = torch.where(others, scores.expand(M, M), torch.zeros_like(scores).expand(M, M)).sum(1) / (M - 1)
    rho = scores / rest
    if continuous:
        return 1 - torch.tanh(alpha * torch.relu(rho - 1))
    scaled = rho > 1
    if not bool(scaled.any()):  # an exact tie: the official code's else-branch scales its first modality
        scaled[0] = True
    return torch.where(scaled, 1 - torch.tanh(alpha * rho), torch.ones_like(rho))


@register
class OGMGE(Method):
    name = "ogm_ge"
    requires = ("logits", "target")
    modulates_encoders = True
    plain_gradients = False
    fsdp2 = True

    def __init__(
        self,
        groups,
        alpha: float = 0.8,
        ge: bool = True,
        continuous: bool = False,
        modulate: str = "matrices",
        start_epoch: int = 0,
        end_epoch: int = 50,
        seed: int = 0,
    ):
        super().__init__(groups)
        if len(groups.modalities) < 2:
            raise ValueError("method 'ogm_ge' needs at least two modalities")
        if modulate not in ("matrices", "all"):
            raise ValueError(f"modulate must be 'matrices' (tensors with dim >= 2) or 'all', got {modulate!r}")
        self.alpha = check.positive("alpha", alpha)
        for name, value in (("ge", ge), ("continuous", continuous)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        for name, value in (("start_epoch", start_epoch), ("end_epoch", end_epoch), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if end_epoch < start_epoch:
            raise ValueError(f"end_epoch ({end_epoch}) must be >= start_epoch ({start_epoch})")
        self.ge, self.continuous, self.modulate = ge, continuous, modulate
        self.window = (start_epoch, end_epoch)  # modulation is active for epochs in [start, end]
        device = groups.trainable[0].device
        self.generator = torch.Generator(device).manual_seed(seed)  # same seed on every rank: same noise
        self._k = None

    def backward(self, step, total):
        groups = self.groups
        active = self.window[0] <= step.epoch <= self.window[1]
        y = step.target
        scores = None
        if active:
            # packed with the gradients, so in their dtype when that is float32/float64 (one collective)
            dtype = groups.encoder_layouts[groups.modalities[0]][0].dtype
            scores = torch.stack(
                [true_class_probability(step.logits[m].detach(), y).sum() for m in groups.modalities]
            ).to(dtype if dtype in (torch.float32, torch.float64) else torch.float64)
        if groups.fsdp:
            self._fsdp_backward(total, scores)
            return
        # one packed collective: the encoder banks, the other gradients and the scores (sums over samples)
        banks = reduce_encoder_banks(groups, total, summed=[] if scores is None else [scores])
        if not active:
            self._k = None
            return
        k = modulation(scores.double(), self.alpha, self.continuous)
        self._k = k
        for u, m in enumerate(groups.modalities):
            for layout, buf in banks[m]:
                grad = buf[0]
                mask = torch.tensor([self.modulate == "all" or p.dim() >= 2 for p in layout.params], device=grad.device)
                scale = torch.where(mask, k[u].to(grad.device), torch.ones((), dtype=k.dtype, device=grad.device))
                noise_std = self._noise_std(grad, layout, mask) if self.ge else None
                if noise_std is not None and not bool(torch.isfinite(noise_std).all()):
                    raise NonFiniteGradient(f"the gradient of encoders[{m!r}] is NaN or Inf")
                ops.segment_scale_(grad, layout.offsets, scale, noise_std=noise_std, generator=self.generator)

    def _fsdp_backward(self, total, scores):
        """FSDP2: one plain backward through FSDP2's reduce-scatter, then every rank modulates its own shards.

        The whole-tensor statistics the noise needs (each tensor's sum and sum of squares) are shard-local partial
        sums, all-reduced with the scores in one tiny collective; every rank draws the encoder's whole noise
        vector (the same generator state everywhere, as one process draws it) and adds its own elements' part."""
        groups = self.groups
        groups.backward(total, groups.trainable)
        if scores is None:
            self._k = None
            return
        layouts = [(u, m, layout) for u, m in enumerate(groups.modalities) for layout in groups.encoder_layouts[m]]
        params = [p for _, _, layout in layouts for p in layout.params]
        local = [p.grad.to_local() if p.grad is not None else None for p in params]
        partial = [
            torch.zeros(2, dtype=torch.float64)
            if g is None
            else torch.stack([g.double().sum(), g.double().square().sum()]).cpu()
            for g in local
        ]
        packed = torch.cat([scores.double().cpu(), *partial]) if partial else scores.double().cpu()
        groups.all_reduce_(summed=[packed])
        M = len(groups.modalities)
        k = modulation(packed[:M], self.alpha, self.continuous)
        self._k = k
        sums = packed[M:].view(-1, 2)
        i = 0
        for u, m, layout in layouts:
            acc = reference.accumulation_dtype(layout.dtype)
            noise = (
                torch.randn(layout.numel, generator=self.generator, dtype=acc, device=layout.device)
                if self.ge
                else None
            )
            for p, (a, _) in zip(layout.params, layout._bounds):
                g, (total_sum, sq) = local[i], sums[i].tolist()
                i += 1
                modulated = self.modulate == "all" or p.dim() >= 2
                std = 0.0
                if self.ge and modulated and p.numel() > 1:
                    n = p.numel()
                    std = max(sq - total_sum * total_sum / n, 0.0) / (n - 1)
                    std = std**0.5 + 1e-8
                    if not math.isfinite(std):
                        raise NonFiniteGradient(f"the gradient of encoders[{m!r}] is NaN or Inf")
                if g is None:
                    continue
                start, count = groups.shard_range(p)
                with torch.no_grad():
                    y = g.to(acc) * (float(k[u]) if modulated else 1.0)
                    if noise is not None:
                        y = y + noise[a + start : a + start + count].view_as(y) * std
                    g.copy_(y)

    @staticmethod
    def _noise_std(grad, layout, mask):
        """Per-tensor std of the unscaled gradient (unbiased, as torch.std) + 1e-8; 0 where not modulated."""
        lengths = (layout.offsets[1:] - layout.offsets[:-1]).to(grad.device)
        sq = ops.segment_sq_norms(grad, layout.offsets).double()
        sums = torch.segment_reduce(grad.double(), "sum", lengths=lengths)
        n = lengths.double()
        var = torch.clamp(sq - sums.square() / n, min=0) / torch.clamp(n - 1, min=1)
        std = var.sqrt() + 1e-8
        return torch.where(mask & (lengths > 1), std, torch.zeros_like(std))

    def stats(self):
        if self._k is None:
            return {}
        return {f"{m}/coefficient": float(v) for m, v in zip(self.groups.modalities, self._k.tolist())}

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        generator = state.get("generator") if isinstance(state, dict) else None
        if not isinstance(generator, torch.Tensor):
            raise TypeError("the ogm_ge state needs its 'generator' state tensor")
        self.generator.set_state(generator)
