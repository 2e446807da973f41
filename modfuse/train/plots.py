"""matplotlib PNGs: utilization over epochs and accuracy vs noise variance, for one run or a comparison.

A comparison draws every row in its own panel (small multiples, the fused-only baseline in grey behind each), so
no row hides another, plus a grouped bar chart of the table's main columns. The spread everywhere is the
standard deviation over seeds (ddof=1), the same as in the table.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from modfuse.train.rundir import write_atomically


def _save(fig, path: Path) -> Path:
    """Render to memory, then write atomically (never through a planted symlink, never half a file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomically(path, lambda f: f.write(buffer.getvalue()))
    return path


def _mean_std(values) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds (axis 0), ddof=1 as in the table; 0 for a single seed."""
    a = np.asarray(values, dtype=float)
    return a.mean(0), (a.std(0, ddof=1) if a.shape[0] > 1 else np.zeros(a.shape[1:]))


def _noise_axis(ax, variances):
    # variance 0 on a log axis: put it at a small offset left of the first positive variance
    positive = [v for v in variances if v > 0]
    floor = min(positive) / 3 if positive else 1e-2
    ax.set_xscale("log")
    ax.set_xlabel("noise variance on standardised input (0 plotted at the far left)")
    return [v if v > 0 else floor for v in variances]


def plot_run(summary: dict, run_dir: Path) -> None:
    epochs = summary["epochs"]
    modalities, dominant = summary["modalities"], summary["dominant"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["epoch"] for r in epochs]
    for m in modalities:
        ax.plot(x, [r["shuffle_utilization"][m] for r in epochs], label=f"{m} (shuffle)")
        ax.plot(x, [r["conditional_utilization"][m] for r in epochs], "--", label=f"{m} (conditional)")
    ax.set(
        xlabel="epoch",
        ylabel="utilization",
        ylim=(-0.05, 1.05),
        title=f"{summary['config']['method']}: utilization over epochs",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, run_dir / "utilization.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = _noise_axis(ax, summary["noise_variances"])
    for m in modalities:
        ax.plot(xs, summary["noise"][m], "o-", label=f"noise on {m}" + (" (dominant)" if m == dominant else ""))
    ax.set(ylabel="test accuracy", title=f"{summary['config']['method']}: accuracy under noise")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, run_dir / "noise.png")


def _panels(n: int, title: str):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.6), sharex=True, sharey=True, squeeze=False
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig, list(axes.flat[:n])


def plot_comparison(rows: list[dict], out_dir: Path, dominant: str, variances: list[float]) -> list[Path]:
    """rows: one per configuration, with 'label', 'utilization_curves' [seeds][epochs], 'noise' [seeds][variances],
    'mean' and 'std' of the table's columns. Writes utilization.png, noise.png and summary.png."""
    paths = []
    baseline = rows[0]
    base_curve, _ = _mean_std(baseline["utilization_curves"])
    fig, axes = _panels(
        len(rows),
        f"shuffle utilization of {dominant} over epochs: mean ± standard deviation over "
        f"seeds (grey: {baseline['label']})",
    )
    for ax, row in zip(axes, rows):
        mean, std = _mean_std(row["utilization_curves"])
        epochs = np.arange(1, len(mean) + 1)
        ax.plot(np.arange(1, len(base_curve) + 1), base_curve, color="0.6", linewidth=1)
        ax.plot(epochs, mean, color="C0")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.25, color="C0")
        ax.set_title(row["label"], fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.tick_params(labelsize=7)
    fig.supxlabel("epoch (frozen rows: fusion epochs after pretraining)", fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "utilization.png"))

    base_noise, _ = _mean_std(baseline["noise"])
    fig, axes = _panels(
        len(rows),
        f"test accuracy with Gaussian noise on {dominant}: mean ± standard deviation "
        f"over seeds (grey: {baseline['label']})",
    )
    for ax, row in zip(axes, rows):
        xs = _noise_axis(ax, variances)
        mean, std = _mean_std(row["noise"])
        ax.plot(xs, base_noise, color="0.6", linewidth=1)
        ax.errorbar(xs, mean, yerr=std, marker="o", markersize=3, capsize=2, color="C1")
        ax.set_title(row["label"], fontsize=8)
        ax.set_xlabel("")
        ax.tick_params(labelsize=7)
    fig.supxlabel("noise variance on standardised input (0 plotted at the far left)", fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "noise.png"))

    columns = [
        ("accuracy", "clean accuracy"),
        ("acc_at_max", f"accuracy at σ²={max(variances):g}"),
        ("mu_dominant", f"MU({dominant})"),
        ("macro_f1", "macro-F1"),
        ("imbalance", "Shapley imbalance"),
    ]
    columns = [(key, name) for key, name in columns if all(key in r["mean"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.75 * len(rows) + 2), 4.5))
    width = 0.8 / len(columns)
    x = np.arange(len(rows))
    for k, (key, name) in enumerate(columns):
        ax.bar(
            x + (k - (len(columns) - 1) / 2) * width,
            [r["mean"][key] for r in rows],
            width,
            yerr=[r["std"][key] for r in rows],
            capsize=2,
            label=name,
        )
    ax.set_xticks(x, [r["label"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set(
        ylim=(0, 1.2), ylabel="fraction", title="the table's main columns per row, mean ± standard deviation over seeds"
    )
    ax.legend(fontsize=8, loc="upper center", ncol=len(columns))
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "summary.png"))
    return paths
