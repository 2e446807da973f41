"""`modfuse-train compare`: the baselines and every method, several seeds each, one table and two plots.

Rows (each trained with the same data, model, optimizer and epochs; only the method and its losses differ):
- none (fused only): plain joint training on the fused loss, the greedy case every method is measured against;
- none + unimodal: the fused loss plus each modality's own loss. The methods of config.UNIMODAL_METHODS add those
  losses too, so this control shows what the losses alone buy; a method is credited only with what it adds;
- every method of modfuse.methods.names(), with its default options, driven by the registry: a new method appears
  with no entry here. VARIANTS gives a method several rows (calibrated's two evidence forms, utilization's targets
  0.5 and 0.75, i2m2 with its own product head);
- the utilization paper's protocol: encoders pretrained each on its own modality and frozen, then only the fusion
  head trained (fused loss alone, and with utilization targets 0.5 and 0.75).

Columns, on the test split, mean ± standard deviation over seeds: clean accuracy and macro-F1; mean accuracy over
the noise sweep and accuracy at variance 0.12 and at the sweep's largest variance, with Gaussian noise on the
dominant modality; the dominant modality's shuffle utilization (the quantity the utilization targets set) and
conditional utilization rate; the accuracy of every other modality's branch; the accuracy with each modality
missing (input zeroed); each modality's Shapley value of accuracy and the imbalance score (metrics.py); the step
time and the part of it spent in modfuse's fused ops.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import numpy as np

from modfuse.train.config import METHODS, UNIMODAL_METHODS, Config
from modfuse.train.loop import load_data, run
from modfuse.train.rundir import RunError, claim, write_text

# The rows of a method, when it is not the single row (label = its name, its default options). A method registered
# with modfuse.methods.register appears in the table with no entry here; add one only to show several settings.
VARIANTS: dict[str, list[tuple[str, dict]]] = {
    "none": [
        ("none (fused only)", dict(method="none")),
        ("none + unimodal (control)", dict(method="none", unimodal=True)),
    ],
    "calibrated": [
        ("calibrated", dict(method="calibrated")),
        ("calibrated evidence=precision", dict(method="calibrated", options={"evidence": "precision"})),
    ],
    "utilization": [
        ("utilization 0.5", dict(method="utilization", options={"target": 0.5})),
        ("utilization 0.75", dict(method="utilization", options={"target": 0.75})),
    ],
    "i2m2": [("i2m2", dict(method="i2m2", fusion="i2m2"))],  # its own product head
}
# The utilization paper's protocol (pretrained frozen encoders, only the fusion head trained), after the methods.
FROZEN: list[tuple[str, dict]] = [
    ("frozen: none (fused only)", dict(method="none", freeze_encoders=True, fusion="concat")),
    (
        "frozen: utilization 0.5",
        dict(method="utilization", options={"target": 0.5}, freeze_encoders=True, fusion="concat"),
    ),
    (
        "frozen: utilization 0.75",
        dict(method="utilization", options={"target": 0.75}, freeze_encoders=True, fusion="concat"),
    ),
]
FIRST = ("none", "calibrated")  # the baselines, then the method the control is for; the rest in name order


def grid() -> list[tuple[str, dict]]:
    """(label, Config overrides) of every row: every method of modfuse.methods.names(), then the frozen rows."""
    order = [m for m in FIRST if m in METHODS] + [m for m in METHODS if m not in FIRST]
    return [row for m in order for row in VARIANTS.get(m, [(m, dict(method=m))])] + FROZEN


GRID: list[tuple[str, dict]] = grid()


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _one(config_dict: dict, run_dir: str, resume: bool) -> dict:
    """One run in a worker process (one thread each, so runs share the cores without oversubscribing)."""
    import torch

    torch.set_num_threads(1)
    return run(Config(**config_dict), run_dir, resume=resume, overwrite=not resume, progress=False)


def compare(
    base: Config,
    out_dir: str | Path,
    *,
    seeds: int = 3,
    jobs: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    only: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Every row of GRID (or those named in `only`), `seeds` seeds each, `jobs` runs at a time; table and plots."""
    out_dir = Path(out_dir)
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise RunError(f"--jobs must be a positive integer (runs at a time), got {jobs!r}")
    if not isinstance(seeds, int) or seeds < 1:
        raise RunError(f"--seeds must be a positive integer, got {seeds!r}")
    if base.options:
        raise RunError(
            "compare runs every method with its own options, so it takes no --option (options="
            f"{base.options}); run one method with `modfuse-train --method M --option ...` instead"
        )
    names = {slug(label) for label, _ in GRID} | {label for label, _ in GRID}
    unknown = [o for o in only or () if o not in names]
    if unknown:
        raise RunError(f"--only: no row named {unknown[0]!r}; rows are: {', '.join(slug(lb) for lb, _ in GRID)}")
    grid = [(label, o) for label, o in GRID if not only or label in only or slug(label) in only]
    tasks = []
    for label, overrides in grid:
        for seed in range(seeds):
            values = asdict(base)
            values.update(overrides, seed=base.seed + seed)
            config = Config(**values).validate()
            run_dir = out_dir / slug(label) / f"seed{seed}"
            tasks.append((label, seed, config, run_dir))
    load_data(tasks[0][2])  # the data options are checked before the directory is touched
    with claim(out_dir, "compare", resume=resume, overwrite=overwrite):
        return _compare(base, out_dir, grid, tasks, seeds=seeds, jobs=jobs, resume=resume, progress=progress)


def _compare(
    base: Config, out_dir: Path, grid: list, tasks: list, *, seeds: int, jobs: int | None, resume: bool, progress: bool
) -> dict:
    write_text(out_dir / "compare.started", base.to_json())
    results: dict[tuple[str, int], dict] = {}
    pending = []
    for label, seed, config, run_dir in tasks:
        if resume:
            _same_options(config, run_dir)
        if resume and (run_dir / "summary.json").is_file():
            results[(label, seed)] = json.loads((run_dir / "summary.json").read_text())
        else:
            pending.append((label, seed, config, run_dir))
    jobs = jobs or os.cpu_count() or 1
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), initial=len(results), desc="compare runs")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(_one, asdict(config), str(run_dir), resume and (run_dir / "config.json").is_file()): (
                label,
                seed,
            )
            for label, seed, config, run_dir in pending
        }
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    rows = [summarise(label, [results[(label, s)] for s in range(seeds)]) for label, _ in grid]
    dominant = rows[0]["dominant"]
    variances = results[(grid[0][0], 0)]["noise_variances"]
    report = {
        "base_config": json.loads(base.to_json()),
        "seeds": seeds,
        "dominant": dominant,
        "noise_variances": variances,
        "rows": rows,
        "wall_seconds": time.perf_counter() - start,
    }
    write_text(out_dir / "compare.json", json.dumps(report, indent=1))
    table = markdown_table(rows, dominant, seeds, variances)
    write_text(out_dir / "compare.md", table + "\n")
    from modfuse.train.plots import plot_comparison

    plot_comparison(rows, out_dir, dominant, variances)
    (out_dir / "compare.started").unlink(missing_ok=True)
    report["table"] = table
    return report


def _same_options(config: Config, run_dir: Path) -> None:
    """--resume reuses a row's runs only if they were started with the options asked for now."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} cannot be read ({err})") from None
    now = json.loads(config.to_json())
    differ = [k for k in now if isinstance(before, dict) and k in before and before[k] != now[k]]
    if not isinstance(before, dict) or differ:
        what = f"{differ[0]} {before[differ[0]]!r}, now {now[differ[0]]!r}" if differ else "not an object"
        raise RunError(
            f"--resume: {path} was started with other options ({what}); resume with the same options, "
            "or start over with --overwrite"
        )


def summarise(label: str, summaries: list[dict]) -> dict:
    """Per-seed figures of one row, and their mean and standard deviation."""
    dominant = summaries[0]["dominant"]
    others = [m for m in summaries[0]["modalities"] if m != dominant]
    variances = summaries[0]["noise_variances"]
    i012 = variances.index(0.12) if 0.12 in variances else None
    per_seed = {
        "accuracy": [],
        "macro_f1": [],
        "imbalance": [],
        "noise_mean": [],
        "acc_at_0.12": [],
        "acc_at_max": [],
        "mu_dominant": [],
        "cu_dominant": [],
        "step_ms": [],
        "modfuse_ms": [],
    }
    for m in others:
        per_seed[f"branch_{m}"] = []
    for m in summaries[0]["modalities"]:
        per_seed[f"missing_{m}"] = []
        per_seed[f"shapley_{m}"] = []
    for s in summaries:
        final, sweep = s["final"], s["noise"][dominant]
        per_seed["accuracy"].append(final["accuracy"])
        per_seed["macro_f1"].append(final["macro_f1"])
        per_seed["imbalance"].append(final["imbalance"])
        for m in s["modalities"]:
            per_seed[f"missing_{m}"].append(final["missing_accuracy"][m])
            per_seed[f"shapley_{m}"].append(final["shapley"][m])
        per_seed["noise_mean"].append(float(np.mean(sweep)))
        per_seed["acc_at_0.12"].append(sweep[i012] if i012 is not None else float("nan"))
        per_seed["acc_at_max"].append(sweep[variances.index(max(variances))])
        per_seed["mu_dominant"].append(final["shuffle_utilization"][dominant])
        per_seed["cu_dominant"].append(final["conditional_utilization"][dominant])
        for m in others:
            per_seed[f"branch_{m}"].append(final["branch_accuracy"][m])
        t = [e["time_ms"] for e in s["epochs"][1:]] or [e["time_ms"] for e in s["epochs"]]  # epoch 1 warms up
        per_seed["step_ms"].append(float(np.mean([x["model"] + x["modfuse"] for x in t])))
        per_seed["modfuse_ms"].append(float(np.mean([x["modfuse"] for x in t])))
    cfg = summaries[0]["config"]
    return {
        "label": label,
        "method": cfg["method"],
        "dominant": dominant,
        "others": others,
        "unimodal_losses": bool(cfg["unimodal"]) if cfg["unimodal"] is not None else cfg["method"] in UNIMODAL_METHODS,
        "freeze_encoders": cfg["freeze_encoders"],
        "fusion": cfg["fusion"],
        "per_seed": per_seed,
        "mean": {k: float(np.mean(v)) for k, v in per_seed.items()},
        "std": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in per_seed.items()},
        "noise": [s["noise"][dominant] for s in summaries],
        "utilization_curves": [[e["shuffle_utilization"][dominant] for e in s["epochs"]] for s in summaries],
    }


def markdown_table(rows: list[dict], dominant: str, seeds: int, variances: list[float]) -> str:
    others = rows[0]["others"]
    modalities = [dominant, *others]
    pct = lambda r, k: f"{100 * r['mean'][k]:.1f} ± {100 * r['std'][k]:.1f}"
    head = (
        [
            "method",
            "+unimodal losses",
            "clean acc %",
            "macro-F1 %",
            f"mean acc % over noise on {dominant}",
            "acc % at σ²=0.12",
            f"acc % at σ²={max(variances):g}",
            f"MU({dominant}) %",
            f"cond. util. {dominant} %",
        ]
        + [f"{m} branch acc %" for m in others]
        + [f"acc % {m} missing" for m in modalities]
        + [f"Shapley {m} %" for m in modalities]
        + ["imbalance %"]
        + ["step ms", "modfuse ms"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (
            [
                r["label"],
                "yes" if r["unimodal_losses"] else "no",
                pct(r, "accuracy"),
                pct(r, "macro_f1"),
                pct(r, "noise_mean"),
                pct(r, "acc_at_0.12"),
                pct(r, "acc_at_max"),
                pct(r, "mu_dominant"),
                pct(r, "cu_dominant"),
            ]
            + [pct(r, f"branch_{m}") for m in others]
            + [pct(r, f"missing_{m}") for m in modalities]
            + [pct(r, f"shapley_{m}") for m in modalities]
            + [pct(r, "imbalance")]
            + [f"{r['mean']['step_ms']:.2f}", f"{r['mean']['modfuse_ms']:.3f}"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nmean ± standard deviation over {seeds} seeds; MU = shuffle utilization share (Singh et al.); "
        "missing = that modality's input zeroed (its training mean); Shapley = per-modality Shapley value of "
        "accuracy over the modality subsets (BalanceMM), imbalance = (max - min) / sum |Shapley|; "
        "step ms = forward + Balancer.backward + optimizer step, of which modfuse ms is inside the fused ops."
    )
    return "\n".join(lines)
