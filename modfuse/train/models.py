"""The trainer's model: one encoder per modality and late fusion.

Encoders: an MLP for feature vectors [N, d]; a small 1-D CNN for time series [N, channels, steps]. Each maps
its modality to an embedding h_m of `hidden` features.

Fusion (`fusion=`):
- "shared" (default): one linear head shared by every branch. Unimodal logits are head(h_m); fused logits are
  head(mean_m h_m), which equals the mean of the branches' logits (the head is linear). Every modality's
  objective reaches the head, so "calibrated" has something to weigh (DESIGN.md "Where modality gradients
  meet"), and a branch's accuracy is the accuracy of its own contribution to the fused prediction.
- "concat": a linear head on the concatenated embeddings; unimodal logits by the OGM-GE split
  W[:, block_m] h_m + b / M (docs/math.md#ogm_ge). Block m of the head only ever sees modality m.
- "i2m2": every modality its own linear classifier and a joint one on the concatenation, combined as the I2M2
  product of experts (modfuse.methods.i2m2). Used by --method i2m2.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from modfuse.methods.i2m2 import i2m2_log_probs
from modfuse.methods.ogm_ge import concat_head_unimodal_logits

FUSIONS = ("shared", "concat", "i2m2")


def mlp_encoder(features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


def conv_encoder(channels: int, hidden: int) -> nn.Module:
    """Two 1-D convolutions and global average pooling over time."""
    return nn.Sequential(
        nn.Conv1d(channels, 32, 7, padding=3),
        nn.ReLU(),
        nn.Conv1d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(64, hidden),
        nn.ReLU(),
    )


def encoder_for(shape: tuple[int, ...], hidden: int) -> nn.Module:
    """MLP for one sample of shape (features,), CNN for (channels, steps)."""
    if len(shape) == 1:
        return mlp_encoder(shape[0], hidden)
    if len(shape) == 2:
        return conv_encoder(shape[0], hidden)
    raise ValueError(f"a modality's samples must be vectors or (channels, steps) series, got sample shape {shape}")


class LateFusionNet(nn.Module):
    """Encoders + late fusion. forward(xs) -> (fused logits [N, C], {modality: unimodal logits [N, C]})."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], classes: int, hidden: int = 64, fusion: str = "shared"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        self.fusion = fusion
        self.enc = nn.ModuleDict({m: encoder_for(tuple(s), hidden) for m, s in shapes.items()})
        M = len(shapes)
        self.head = nn.Linear(hidden if fusion == "shared" else hidden * M, classes)
        self.branch = nn.ModuleDict({m: nn.Linear(hidden, classes) for m in shapes}) if fusion == "i2m2" else None

    def forward(self, xs: dict[str, torch.Tensor]):
        hs = {m: self.enc[m](xs[m]) for m in self.enc}
        self.features = hs  # the embeddings of the last forward (pmr's prototypes, cggm's classifiers)
        if self.fusion == "shared":
            return self.head(torch.stack(list(hs.values())).mean(0)), {m: self.head(h) for m, h in hs.items()}
        fused = self.head(torch.cat(list(hs.values()), 1))
        if self.fusion == "concat":
            return fused, concat_head_unimodal_logits(self.head, hs)
        return fused, {m: self.branch[m](h) for m, h in hs.items()}

    def scores(self, fused: torch.Tensor, unimodal: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's class scores for a prediction (argmax): fused logits, or the I2M2 product."""
        if self.fusion == "i2m2":
            return i2m2_log_probs([unimodal[m] for m in self.enc], fused)
        return fused

    def predict(self, xs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores(*self(xs))

    def shared(self) -> nn.Module | None:
        """The parameters every modality's objective reaches (for "calibrated"): the head, unless i2m2."""
        return None if self.fusion == "i2m2" else self.head
