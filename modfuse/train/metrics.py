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
- macro-F1: the unweighted mean over classes of 2 TP / (2 TP + FP + FN), over the classes that occur in the labels
  or the predictions (scikit-learn's f1_score(average="macro") with its default labels).
- missing-modality accuracy: the accuracy with modality m missing at test time, "missing" meaning its input is
  zeroed. Every modality is standardised with training statistics, so zero is its training-set mean input: the
  masking of BalanceMM (GeWu-Lab/BalanceBenchmark zeroes a padded modality's input) and the replacement of the
  conditional utilization rate, so the model sees an uninformative but in-distribution input (a mean embedding
  would need a hook inside each model and is not what the field's toolkit does).
- Shapley values of accuracy (BalanceMM's Calculate_Shapley): v(S) = accuracy with the modalities outside S zeroed
  (v(empty) = every modality zeroed, not 0), phi_m = sum_{S not holding m} |S|! (M - |S| - 1)! / M! (v(S + m) -
  v(S)); they sum to v(all) - v(empty). Imbalance score: (max_m phi_m - min_m phi_m) / sum_m |phi_m| (0 when every
  phi is 0): 0 for equal contributions, 1 when one modality's contribution is everything (the toolkit logs the
  per-modality values only; this scalar is modfuse's, defined so that it is comparable across M and accuracies).

Every random draw comes from a generator seeded by the caller, so an evaluation never touches the training RNG
(a resumed run evaluates exactly as the uninterrupted one).
"""

from __future__ import annotations

import itertools
import math

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
def predictions(model, xs: dict[str, torch.Tensor], batch: int = 4096) -> torch.Tensor:
    n = next(iter(xs.values())).shape[0]
    return torch.cat(
        [model.predict({m: x[i : i + batch] for m, x in xs.items()}).argmax(1) for i in range(0, n, batch)]
    )


def macro_f1(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the classes in y or pred of 2 TP / (2 TP + FP + FN)."""
    pred, y = pred.reshape(-1).long().cpu(), y.reshape(-1).long().cpu()
    if pred.shape != y.shape or y.numel() == 0:
        raise ValueError(f"macro_f1 needs predictions and labels of one non-empty length, got {pred.shape}, {y.shape}")
    classes = torch.unique(torch.cat([y, pred]))
    hit = pred == y
    scores = []
    for c in classes.tolist():
        tp = int((hit & (y == c)).sum())
        fp, fn = int(((pred == c) & ~hit).sum()), int(((y == c) & ~hit).sum())
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


@torch.no_grad()
def coalition_accuracies(model, xs, y) -> dict[tuple[str, ...], float]:
    """v(S) for every subset S of the modalities (in their order): accuracy with the others' inputs zeroed."""
    names = list(xs)
    out = {}
    for size in range(len(names) + 1):
        for kept in itertools.combinations(names, size):
            masked = {m: (x if m in kept else torch.zeros_like(x)) for m, x in xs.items()}
            out[kept] = accuracy(model, masked, y)
    return out


def shapley_values(v: dict[tuple[str, ...], float], names: list[str]) -> dict[str, float]:
    """phi_m = sum over S without m of |S|! (M - |S| - 1)! / M! (v(S + m) - v(S)); v keyed by ordered tuples."""
    M = len(names)
    key = lambda members: tuple(m for m in names if m in members)
    out = {}
    for m in names:
        others = [j for j in names if j != m]
        phi = 0.0
        for size in range(M):
            weight = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
            for S in itertools.combinations(others, size):
                phi += weight * (v[key((*S, m))] - v[key(S)])
        out[m] = phi
    return out


def imbalance_score(phi: dict[str, float]) -> float:
    """(max phi - min phi) / sum |phi|: 0 for equal contributions, 1 when one modality contributes everything."""
    total = sum(abs(x) for x in phi.values())
    return (max(phi.values()) - min(phi.values())) / total if total > 0 else 0.0


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
    pred = predictions(model, xs)
    full = int((pred == y).sum()) / y.shape[0]
    names = list(xs)
    v = coalition_accuracies(model, xs, y)
    phi = shapley_values(v, names)
    out = {
        "accuracy": full,
        "macro_f1": macro_f1(pred, y),
        "branch_accuracy": branch_accuracies(model, xs, y),
        "missing_accuracy": {m: v[tuple(j for j in names if j != m)] for m in names},
        "shapley": phi,
        "imbalance": imbalance_score(phi),
        "accuracy_none": v[()],
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
