"""Small multimodal models and data shared by the API, method and distributed tests."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SharedHeadNet(nn.Module):
    """Per-modality MLP encoders and one classifier head applied to each embedding and to their mean (fusion).

    The head is the shared parameter group (every objective reaches it); `fused_twice=True` applies it to each
    embedding inside the fused path too (logits averaged), so the fused objective calls the head twice per sample
    (the T > 1 case of linear_moments).
    """

    def __init__(self, dims: dict[str, int], hidden: int = 16, classes: int = 3, fused_twice: bool = False):
        super().__init__()
        self.enc = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
                for m, d in dims.items()
            }
        )
        self.fuse = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.fused_twice = fused_twice

    def forward(self, xs):
        hs = {m: self.enc[m](xs[m]) for m in self.enc}
        self.features = hs  # the embeddings of the last forward (pmr, cggm)
        if self.fused_twice:
            fused = torch.stack([self.head(h) for h in hs.values()]).mean(0)
        else:
            fused = self.head(torch.relu(self.fuse(torch.stack(list(hs.values())).mean(0))))
        return fused, {m: self.head(h) for m, h in hs.items()}


def batch(dims: dict[str, int], N: int = 24, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = {m: torch.randn(N, d, generator=g) for m, d in dims.items()}
    return xs, torch.randint(0, classes, (N,), generator=g)


def losses(net, xs, y):
    """Everything Balancer.backward can take, for any method."""
    fused, uni = net(xs)
    return dict(
        fused=F.cross_entropy(fused, y, reduction="none"),
        unimodal={m: F.cross_entropy(l, y, reduction="none") for m, l in uni.items()},
        logits=uni,
        fused_logits=fused,
        target=y,
        forward=lambda d: net(d)[0],
        inputs=xs,
        features=getattr(net, "module", net).features,
    )


def balancer_for(net, method, **options):
    import modfuse

    return modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method, **options)
