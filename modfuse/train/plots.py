"""matplotlib PNGs: utilization over epochs and accuracy vs noise variance, for one run or a comparison."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
    ax.set(xlabel="epoch", ylabel="utilization", ylim=(-0.05, 1.05),
           title=f"{summary['config']['method']}: utilization over epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "utilization.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = _noise_axis(ax, summary["noise_variances"])
    for m in modalities:
        ax.plot(xs, summary["noise"][m], "o-", label=f"noise on {m}" + (" (dominant)" if m == dominant else ""))
    ax.set(ylabel="test accuracy", title=f"{summary['config']['method']}: accuracy under noise")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "noise.png", dpi=110)
    plt.close(fig)


def _style(i: int, row: dict) -> dict:
    """A distinct colour per row (tab20) and dashed lines for the frozen-encoder protocol."""
    return {"color": plt.get_cmap("tab20")(i % 20), "linestyle": "--" if row.get("freeze_encoders") else "-"}


def plot_comparison(rows: list[dict], out_dir: Path, dominant: str, variances: list[float]) -> list[Path]:
    """rows: one per configuration, with 'label', 'utilization_curves' [seeds][epochs] and 'noise' [seeds][variances]."""
    paths = []
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, row in enumerate(rows):
        curves = np.asarray(row["utilization_curves"], dtype=float)
        mean = curves.mean(0)
        ax.plot(np.arange(1, len(mean) + 1), mean, label=row["label"], **_style(i, row))
        ax.fill_between(np.arange(1, len(mean) + 1), curves.min(0), curves.max(0), alpha=0.15,
                        color=_style(i, row)["color"])
    ax.set(xlabel="epoch (frozen-encoder runs: fusion epochs after pretraining)",
           ylabel=f"shuffle utilization of {dominant}", ylim=(-0.05, 1.05),
           title=f"utilization of the dominant modality ({dominant}), mean and range over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out_dir / "utilization.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs = _noise_axis(ax, variances)
    for i, row in enumerate(rows):
        acc = np.asarray(row["noise"], dtype=float)
        ax.errorbar(xs, acc.mean(0), yerr=[acc.mean(0) - acc.min(0), acc.max(0) - acc.mean(0)], marker="o",
                    markersize=3, capsize=2, label=row["label"], **_style(i, row))
    ax.set(ylabel="test accuracy", title=f"accuracy with Gaussian noise on {dominant}, mean and range over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out_dir / "noise.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
