"""Evaluation metrics of the trainer (docs/math.md#metrics), on the test split, without gradients.

- accuracy: of the model's prediction (fused logits, or the I2M2 product).
- branch accuracy per modality: argmax of that modality's unimodal logits.
- conditional utilization rate (Wu et al. 2022): u(m | rest) = (A(all) - A(m replaced by its training-set mean
  feature)) / A(all).
- shuffle utilization (Singh et al. 2024): the accuracy drop when m is shuffled across the test set,
  normalised over modalities: MU_m = relu(A - A_shuffled_m) / sum_j relu(A - A_shuffled_j). Averaged over
  `shuffles` fixed permutations (one permutation moves MU by a few points on 600 samples).
- noise robustness: accuracy when N(0, variance) noise is added to one modality's standardised input, averaged
  over `draws` fixed noise draws, for each variance of a sweep.

Every random draw comes from a generator seeded by the caller, so an evaluation never touches the training RNG
(a resumed run evaluates exactly as the uninterrupted one).
"""

from __future__ import annotations

import torch

NOISE_VARIANCES = (0.0, 0.12, 0.25, 0.5, 1.0, 2.0, 4.0)


@torch.no_grad()
def accuracy(model, xs: dict[str, torch.Tensor], y: torch.Tensor, batch: int = 4096) -> float:
    correct = 0
    for i in range(0, y.shape[0], batch):
        part = {m: x[i : i + batch] for m, x in xs.items()}
        correct += int((model.predict(part).argmax(1) == y[i : i + batch]).sum())
    return correct / y.shape[0]


@torch.no_grad()
def branch_accuracies(model, xs, y) -> dict[str, float]:
    _, unimodal = model(xs)
    return {m: float((logits.argmax(1) == y).float().mean()) for m, logits in unimodal.items()}


@torch.no_grad()
def conditional_utilization(model, xs, y, train_means: dict[str, torch.Tensor], full: float) -> dict[str, float]:
    out = {}
    for m, mean in train_means.items():
        replaced = dict(xs)
        replaced[m] = mean.expand_as(xs[m])
        out[m] = (full - accuracy(model, replaced, y)) / full if full > 0 else 0.0
    return out


@torch.no_grad()
def shuffle_utilization(model, xs, y, full: float, *, shuffles: int = 3, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    drops = {}
    for m in xs:
        total = 0.0
        for _ in range(shuffles):
            perm = torch.randperm(y.shape[0], generator=g).to(y.device)
            shuffled = dict(xs)
            shuffled[m] = xs[m][perm]
            total += full - accuracy(model, shuffled, y)
        drops[m] = max(total / shuffles, 0.0)
    s = sum(drops.values())
    return {m: d / s if s > 0 else 0.0 for m, d in drops.items()}


@torch.no_grad()
def evaluate(model, xs, y, train_means, *, seed: int = 0) -> dict:
    """Every per-epoch metric, as plain numbers."""
    was_training = model.training
    model.eval()
    full = accuracy(model, xs, y)
    out = {
        "accuracy": full,
        "branch_accuracy": branch_accuracies(model, xs, y),
        "conditional_utilization": conditional_utilization(model, xs, y, train_means, full),
        "shuffle_utilization": shuffle_utilization(model, xs, y, full, seed=seed),
    }
    model.train(was_training)
    return out


@torch.no_grad()
def noise_sweep(model, xs, y, variances=NOISE_VARIANCES, *, draws: int = 3, seed: int = 0) -> dict[str, list[float]]:
    """{modality: [accuracy at each variance]} with Gaussian noise added to that modality only."""
    was_training = model.training
    model.eval()
    out = {}
    for k, m in enumerate(xs):
        accs = []
        for variance in variances:
            if variance == 0:
                accs.append(accuracy(model, xs, y))
                continue
            g = torch.Generator().manual_seed(seed * 1000 + k)
            total = 0.0
            for _ in range(draws):
                noisy = dict(xs)
                noise = torch.randn(xs[m].shape, generator=g).to(xs[m].device, xs[m].dtype)
                noisy[m] = xs[m] + variance**0.5 * noise
                total += accuracy(model, noisy, y)
            accs.append(total / draws)
        out[m] = accs
    model.train(was_training)
    return out
