"""Method "i2m2" and `I2M2Head`: inter- and intra-modality modelling (the model side of balancing).

Source: Madaan et al., "Jointly Modeling Inter- & Intra-Modality Dependencies for Multi-modal Learning",
NeurIPS 2024. The prediction is the product of every unimodal classifier's and the joint classifier's
distributions, renormalised:

    log p(y | x) = log_softmax f_1 + ... + log_softmax f_M + log_softmax f_joint - logsumexp_y(same sum)

Each modality keeps its own classifier that must predict y on its own, so a weak modality cannot be ignored the
way a single fused head lets it be. The method's objective is the negative log-likelihood of that product
(plus the fused and unimodal losses, if passed); gradients are plain. Needs logits for every modality, fused_logits
(f_joint) and target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from modfuse.methods import Method, register


def i2m2_log_probs(unimodal_logits: Sequence[torch.Tensor], joint_logits: torch.Tensor) -> torch.Tensor:
    """log p(y|x) [N, C] of the I2M2 product of experts (see the module docstring)."""
    # float32 at least (autocast logits are half precision), float64 kept
    acc = torch.promote_types(joint_logits.dtype, torch.float32)
    total = F.log_softmax(joint_logits.to(acc), dim=-1)
    for logits in unimodal_logits:
        total = total + F.log_softmax(logits.to(acc), dim=-1)
    return total - torch.logsumexp(total, dim=-1, keepdim=True)


class I2M2Head(torch.nn.Module):
    """Combines unimodal and joint logits into I2M2 log-probabilities (use them with F.nll_loss)."""

    def forward(self, unimodal_logits: Sequence[torch.Tensor], joint_logits: torch.Tensor) -> torch.Tensor:
        return i2m2_log_probs(unimodal_logits, joint_logits)


@register
class I2M2(Method):
    name = "i2m2"
    requires = ("logits", "fused_logits", "target")
    needs_loss = False

    def __init__(self, groups):
        super().__init__(groups)

    def objective(self, step):
        log_p = i2m2_log_probs([step.logits[m] for m in self.groups.modalities], step.fused_logits)
        total = F.nll_loss(log_p, step.target)
        if step.fused is not None or step.unimodal:
            total = total + super().objective(step)
        return total
