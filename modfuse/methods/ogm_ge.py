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
gradients sit in one flat bank (see Groups.backward_into_banks); Op 7 (segment_moments) gives every tensor's sum
and sum of squares, accumulated in float64, in one launch, and Op 6 (segment_scale_) scales every tensor and adds
its noise, drawn inside the kernel, in one more. The noise is the counter-based stream of docs/math.md (Op 6) keyed
by `seed`: element e of the step's encoder banks (all encoders' layouts in order) gets the stream's value
offset + e, and `offset` advances by the banks' size rounded up to a multiple of 4 every active step, so a run is
reproducible from `seed`, the same on every rank and device, and an FSDP2 rank draws exactly the elements of its
own shards. The state records the stream's version (STREAM_VERSION): a state saved with another stream is refused.
"""

from __future__ import annotations

import math

import torch

from modfuse import _checks as check
from modfuse import ops
from modfuse.groups import NonFiniteGradient
from modfuse.methods import Method, reduce_encoder_banks, register
from modfuse.methods.utilization import true_class_probability

# The noise stream's version in the method state: 2 = four normals per Philox call (docs/math.md, Op 6). A state
# from before (no "stream" key: one normal per call) would resume with different noise, silently.
STREAM_VERSION = 2


def _advance(offset: int, drawn: int) -> int:
    """The next step's offset: past the `drawn` counters, rounded up to a multiple of 4 so that every step starts a
    fresh Philox call (four counters share one; an unaligned start would cost the kernels a partial head group per
    step and make step t's last call and step t + 1's first overlap)."""
    return (offset + (drawn + 3) // 4 * 4) % 2**64


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
        self.seed = seed  # the noise stream's key: the same on every rank, so the same noise
        self.offset = 0  # the stream's counter of the next step's first encoder element
        self._masks = {}
        self._k = None

    def backward(self, step, total):
        groups = self.groups
        active = self.window[0] <= step.epoch <= self.window[1]
        y = step.target
        scores = None
        if active:
            scores = torch.stack(
                [true_class_probability(step.logits[m].detach(), y).sum() for m in groups.modalities]
            ).to(_wire(groups))
        if groups.fsdp:
            self._fsdp_backward(total, scores)
            return
        # one packed collective: the encoder banks, the other gradients and the scores (sums over samples); zeros
        # outside the window, so that the collective (and its persistent buffer) is the same in every epoch
        if scores is None:
            sent = torch.zeros(len(groups.modalities), dtype=_wire(groups), device=_device(groups))
        else:
            sent = scores  # summed over ranks in place
        banks = reduce_encoder_banks(groups, total, summed=[sent])
        if not active:
            self._k = None
            return
        k = modulation(scores.double(), self.alpha, self.continuous)
        self._k = k
        offset = self.offset
        for u, m in enumerate(groups.modalities):
            for layout, buf in banks[m]:
                grad = buf[0]
                mask = self._mask(layout, grad.device)
                scale = torch.where(mask, k[u].to(grad.device), torch.ones((), dtype=k.dtype, device=grad.device))
                noise_std = None
                if self.ge:
                    noise_std, bound = self._std_and_bound(grad, layout, mask, scale)
                    if not bool(torch.isfinite(noise_std).all()):
                        raise NonFiniteGradient(f"the gradient of encoders[{m!r}] is NaN or Inf")
                    self.proven.append((layout.params, bound))  # the Balancer's finite check reads it, not grad
                ops.segment_scale_(
                    grad, layout.offsets, scale, noise_std=noise_std, seed=self.seed, offset=offset % 2**64
                )
                offset += layout.numel
        if self.ge:
            self.offset = _advance(self.offset, offset - self.offset)

    def _fsdp_backward(self, total, scores):
        """FSDP2: one plain backward through FSDP2's reduce-scatter, then every rank modulates its own shards.

        The whole-tensor statistics the noise needs (each tensor's sum and sum of squares, Op 7 on the local shard)
        are shard-local partial sums, all-reduced with the scores in one tiny collective; every rank then scales
        its shards and draws their noise in the kernel at the counters the unsharded bank would give them (the
        tensor's start in the layout plus the shard's start), so the result is the one-process result and no rank
        allocates a full-size noise vector."""
        groups = self.groups
        groups.backward(total, groups.trainable)
        if scores is None:
            self._k = None
            return
        layouts = [(u, m, layout) for u, m in enumerate(groups.modalities) for layout in groups.encoder_layouts[m]]
        params = [p for _, _, layout in layouts for p in layout.params]
        local = [p.grad.to_local() if p.grad is not None else None for p in params]
        partial = [
            torch.zeros(1, 2, dtype=torch.float64)
            if g is None or g.numel() == 0
            else ops.segment_moments(g.reshape(-1), [0, g.numel()]).cpu()
            for g in local
        ]
        packed = torch.cat([scores.double().cpu(), *(t.view(-1) for t in partial)])
        groups.all_reduce_(summed=[packed])
        M = len(groups.modalities)
        k = modulation(packed[:M], self.alpha, self.continuous)
        self._k = k
        sums = packed[M:].view(-1, 2)
        i, offset = 0, self.offset
        for u, m, layout in layouts:
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
                if g is None or g.numel() == 0:
                    continue
                start, count = groups.shard_range(p)
                flat = g.view(-1) if g.is_contiguous() else g.contiguous().view(-1)
                ops.segment_scale_(
                    flat,
                    [0, count],
                    [float(k[u]) if modulated else 1.0],
                    noise_std=[std] if self.ge else None,
                    seed=self.seed,
                    offset=(offset + a + start) % 2**64,
                )
                if flat.data_ptr() != g.data_ptr():
                    g.copy_(flat.view_as(g))
            offset += layout.numel
        if self.ge:
            self.offset = _advance(self.offset, offset - self.offset)

    def _mask(self, layout, device):
        """Which tensors of the layout are modulated, as a bool [P] on `device` (built once per layout)."""
        key = (id(layout), device)
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.tensor([self.modulate == "all" or p.dim() >= 2 for p in layout.params], device=device)
            self._masks[key] = mask
        return mask

    @staticmethod
    def _noise_std(grad, layout, mask):
        """Per-tensor std of the unscaled gradient (unbiased, as torch.std) + 1e-8; 0 where not modulated.

        Sums and sums of squares come from one Op 7 launch, accumulated in float64 (no float64 copy of the bank)."""
        return OGMGE._std_and_bound(grad, layout, mask, None)[0]

    @staticmethod
    def _std_and_bound(grad, layout, mask, scale):
        """`_noise_std`, and a bound on every |element| after segment_scale_(grad, scale, noise_std): a NaN or Inf
        gradient makes it NaN or Inf, so the Balancer's finite check need not read the bank again.

        |k g + std z| <= |k| sqrt(sum g^2) + 9 std, as |z| < 9 for the kernel's normals (Box-Muller radius
        sqrt(-2 ln u) <= 6.7 with u >= 2^-32, docs/math.md), and std <= sqrt(sum g^2) + 1e-8."""
        moments = ops.segment_moments(grad, layout.offsets)
        n = (layout.offsets[1:] - layout.offsets[:-1]).to(device=grad.device, dtype=torch.float64)
        sums, sq = moments[:, 0], moments[:, 1]
        var = torch.clamp(sq - sums.square() / n.clamp(min=1), min=0) / torch.clamp(n - 1, min=1)
        std = torch.where(mask & (n > 1), var.sqrt() + 1e-8, torch.zeros_like(var))
        if scale is None:
            return std, None
        return std, sq.sqrt() * scale.abs().to(sq.dtype) + 9 * std

    def stats(self):
        if self._k is None:
            return {}
        return {f"{m}/coefficient": float(v) for m, v in zip(self.groups.modalities, self._k.tolist())}

    def state_dict(self):
        return {"seed": self.seed, "offset": self.offset, "stream": STREAM_VERSION}

    def load_state_dict(self, state):
        values = [state.get(name) if isinstance(state, dict) else None for name in ("seed", "offset")]
        for name, value in zip(("seed", "offset"), values):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
                raise TypeError(
                    f"the ogm_ge state needs its noise stream's {name!r} (an int in [0, 2**64)), got {value!r}"
                )
        stream = state.get("stream")
        if stream != STREAM_VERSION:
            raise ValueError(
                f"the ogm_ge state's noise stream is version {stream!r} (None: saved before modfuse drew four normals "
                f"per Philox call), this modfuse draws version {STREAM_VERSION}; resuming would silently change the "
                f"noise. To continue with the new stream deliberately, set state['stream'] = {STREAM_VERSION}."
            )
        self.seed, self.offset = values


def _wire(groups) -> torch.dtype:
    """The scores' dtype: the encoder banks' when float32/float64 (packed with the gradients, one collective), else
    float64. Unlike methods.wire_dtype, also in one process, where ogm_ge has always used it (the trainer's
    figures come from it)."""
    dtype = groups.encoder_layouts[groups.modalities[0]][0].dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float64


def _device(groups) -> torch.device:
    return groups.encoder_layouts[groups.modalities[0]][0].device
