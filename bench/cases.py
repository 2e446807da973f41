"""Benchmark inputs shared by the table script and the pytest-benchmark microbenchmarks."""

from __future__ import annotations

import torch

# ResNet-18's 62 parameter tensors (conv weights, BN weight/bias, fc), 11.69M elements.
RESNET18_SIZES = (
    [9408, 64, 64]
    + [36864, 64, 64] * 4
    + [73728, 128, 128, 147456, 128, 128, 8192, 128, 128]
    + [147456, 128, 128] * 2
    + [294912, 256, 256, 589824, 256, 256, 32768, 256, 256]
    + [589824, 256, 256] * 2
    + [1179648, 512, 512, 2359296, 512, 512, 131072, 512, 512]
    + [2359296, 512, 512] * 2
)[:61] + [5130]


def resnet18_like(dtype=torch.float32, seed=0):
    """A flat gradient buffer, its 63 offsets (62 segments), and the same gradients as separate tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g).to(dtype) for n in RESNET18_SIZES]
    flat = torch.cat(tensors)
    offsets = torch.tensor([0] + RESNET18_SIZES).cumsum(0)
    return flat, offsets, tensors


def moment_banks(M, D, dtype=torch.float32, K=8, seed=0):
    """S1, S2 banks of K samples per modality with a mix of signal and noise, and the counts n."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(M, D, generator=g) * 0.5
    S1 = (K * mean + K**0.5 * torch.randn(M, D, generator=g)).to(dtype)
    S2 = (K * mean.square() + (K - 1) * (1 + torch.rand(M, D, generator=g)) + S1.float().square() / K).to(dtype)
    return S1, S2, torch.full((M,), float(K))


def samples(M, K, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, 1, D, generator=g) * 0.5 + torch.randn(M, K, D, generator=g)).to(dtype)
