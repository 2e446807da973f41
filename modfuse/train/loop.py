"""One training run: data, model, a modfuse.Balancer step, per-epoch metrics, checkpoints, resume, noise sweep.

Run directory layout (rundir.py: the marker, the lock, atomic writes):
    modfuse-run.json  the marker that this directory is modfuse's (--overwrite removes nothing else)
    .modfuse.lock     locked for the run's lifetime; holds the PID of the run using the directory
    config.json       the run's full configuration (a resumed run reads it back)
    metrics.jsonl     one line per finished epoch (docs/math.md#metrics plus the step-time split)
    checkpoint.pt     the latest finished epoch: model, optimizer, scheduler, RNG states, Balancer/method state
    pretrained.pt     the pretrained encoders (--freeze-encoders only)
    summary.json      the final evaluation: metrics and the noise sweep per modality
    utilization.png, noise.png   plots of this run

A run killed at any point and started again with --resume continues from the last finished epoch and ends with
exactly the metrics of an uninterrupted run (the timings aside): every random draw comes from a generator
whose state is in the checkpoint or that is seeded per epoch, and the metrics of epochs after the checkpoint
are dropped from metrics.jsonl before they are recomputed.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import modfuse
import modfuse.methods
from modfuse.train import data as data_module
from modfuse.train import metrics as metrics_module
from modfuse.train.config import Config, ConfigError
from modfuse.train.models import LateFusionNet
from modfuse.train.rundir import (
    RunError,
    append_line,
    claim,
    write_atomically,
    write_text,
)
from modfuse.train.timing import op_timer, synchronize

CHECKPOINT_VERSION = 1
# Test hook: SIGKILL this process after that many optimizer steps (tests kill a run mid-epoch with it).
KILL_ENV = "MODFUSE_TRAIN_KILL_AFTER_STEPS"


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


# -- checkpoints ---------------------------------------------------------------------------------------------
def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise RunError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is "
            "corrupted or not a modfuse checkpoint: delete it to restart the run from scratch"
        ) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise RunError(f"checkpoint {path} is not a modfuse trainer checkpoint (version {CHECKPOINT_VERSION})")
    return state


def save_atomically(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill or a full disk never leaves a half-written checkpoint."""
    write_atomically(path, lambda f: torch.save(obj, f))


# -- pieces of a run -----------------------------------------------------------------------------------------
def load_data(config: Config) -> data_module.Dataset:
    try:
        return data_module.load(
            config.data,
            views=config.modalities() or None,
            data_dir=config.data_dir,
            test_fraction=config.test_fraction,
            seed=config.split_seed,
            window=config.window,
        )
    except data_module.DataError as err:
        raise ConfigError(str(err)) from None


def batches(n: int, size: int, generator: torch.Generator):
    """Shuffled mini-batch indices; a last batch of one sample is dropped (a variance needs two)."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, size):
        idx = perm[i : i + size]
        if idx.numel() >= 2:
            yield idx


def pretrain_encoders(model: LateFusionNet, xs, y, config: Config, progress: bool) -> dict[str, float]:
    """Train each encoder with its own linear classifier on its own modality (then they are frozen)."""
    accuracy = {}
    for m, encoder in model.enc.items():
        probe = torch.nn.Linear(config.hidden, int(y.max()) + 1).to(y.device)
        params = list(encoder.parameters()) + list(probe.parameters())
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
        g = torch.Generator().manual_seed(config.seed * 7919 + 17)
        for _ in _progress(range(config.pretrain_epochs), progress, desc=f"pretrain {m}", leave=False):
            for idx in batches(y.shape[0], config.batch_size, g):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(probe(encoder(xs[m][idx])), y[idx]).backward()
                optimizer.step()
        with torch.no_grad():
            accuracy[m] = float((probe(encoder(xs[m])).argmax(1) == y).float().mean())
    return accuracy


def method_options(config: Config, dominant: str, steps_per_epoch: int) -> dict:
    """The method's options: the user's, plus what the run knows for any method whose constructor takes it
    (seed: the run's seed; dominant: the followed modality; steps_per_epoch), so a new method needs no entry here."""
    options = dict(config.options)
    accepted = inspect.signature(modfuse.methods.get(config.method).__init__).parameters
    for name, value in (("seed", config.seed), ("dominant", dominant), ("steps_per_epoch", steps_per_epoch)):
        if name in accepted:
            options.setdefault(name, value)
    if config.method == "calibrated" and config.fusion == "shared":
        options.setdefault("moments", "per_sample")  # the head is an nn.Linear: exact per-sample moments
    return options


def train_epoch(
    model,
    balancer,
    optimizer,
    xs,
    y,
    config: Config,
    generator,
    device,
    progress: bool,
    kill_after: int | None,
    steps_done: int,
) -> dict:
    """One epoch of Balancer steps. Returns the mean loss and the per-step time split (ms)."""
    model.train()
    use_unimodal = config.uses_unimodal_losses()
    times = dict(forward=0.0, backward=0.0, optimizer=0.0)
    losses, steps = 0.0, 0
    with op_timer(device) as spent:
        for idx in _progress(
            list(batches(y.shape[0], config.batch_size, generator)), progress, desc="batches", leave=False
        ):
            part, target = {m: x[idx] for m, x in xs.items()}, y[idx]
            synchronize(device)
            t0 = time.perf_counter()
            fused, unimodal = model(part)
            synchronize(device)
            t1 = time.perf_counter()
            kw = dict(logits=unimodal, fused_logits=fused, target=target, forward=lambda d: model(d)[0], inputs=part)
            kw["features"] = model.features  # the embeddings (pmr, cggm); methods that do not read them ignore them
            if config.method != "i2m2":
                kw["fused"] = F.cross_entropy(fused, target, reduction="none")
            if use_unimodal:
                kw["unimodal"] = {m: F.cross_entropy(v, target, reduction="none") for m, v in unimodal.items()}
            optimizer.zero_grad(set_to_none=True)
            stepped = balancer.backward(**kw)
            synchronize(device)
            t2 = time.perf_counter()
            if stepped:
                optimizer.step()
            synchronize(device)
            t3 = time.perf_counter()
            times["forward"] += t1 - t0
            times["backward"] += t2 - t1
            times["optimizer"] += t3 - t2
            with torch.no_grad():
                losses += float(F.cross_entropy(model.scores(fused, unimodal), target))
            steps += 1
            if kill_after is not None and steps_done + steps >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        ops_s = spent[0]
    ms = {k: 1e3 * v / steps for k, v in times.items()}
    ops_ms = 1e3 * ops_s / steps
    return {
        "train_loss": losses / steps,
        "steps": steps,
        "time_ms": {
            "forward": ms["forward"],
            "balancer_backward": ms["backward"],
            "optimizer": ms["optimizer"],
            "modfuse_ops": ops_ms,
            "model": ms["forward"] + ms["backward"] - ops_ms + ms["optimizer"],
            "modfuse": ops_ms,
        },
    }


# -- the run ---------------------------------------------------------------------------------------------------
def read_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path} cannot be read ({err})") from None
    try:
        return Config.from_dict(values, str(path)).validate()
    except (ConfigError, TypeError) as err:
        raise RunError(f"{path}: {err}") from None


def build(config: Config) -> dict:
    """Data, model, optimizer, scheduler and Balancer: every option is checked here, before any file is written."""
    data = load_data(config)
    modalities = list(data.modalities)
    dominant = config.dominant or modalities[0]
    if dominant not in modalities:
        raise ConfigError(f"--dominant {dominant!r} is not a modality of this data ({', '.join(modalities)})")
    device = torch.device(config.device)
    tensors = lambda split: (
        {m: torch.from_numpy(x).to(device) for m, x in split[0].items()},
        torch.from_numpy(split[1]).to(device),
    )
    (xtr, ytr), (xte, yte) = tensors(data.split("train")), tensors(data.split("test"))
    train_means = {m: torch.from_numpy(v).to(device) for m, v in data.train_means().items()}
    torch.manual_seed(config.seed)
    model = LateFusionNet(
        {m: tuple(x.shape[1:]) for m, x in xtr.items()}, data.classes, config.hidden, config.fusion
    ).to(device)
    if config.freeze_encoders:
        for p in model.enc.parameters():
            p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    steps_per_epoch = len(list(batches(ytr.shape[0], config.batch_size, torch.Generator())))
    try:
        balancer = modfuse.Balancer(
            model,
            encoders=dict(model.enc),
            shared=model.shared(),
            method=config.method,
            **method_options(config, dominant, steps_per_epoch),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--method {config.method} --option: {err}") from None
    return {
        "modalities": modalities,
        "dominant": dominant,
        "device": device,
        "xtr": xtr,
        "ytr": ytr,
        "xte": xte,
        "yte": yte,
        "train_means": train_means,
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "balancer": balancer,
    }


def check_checkpoint(state: dict, path: Path, config: Config) -> tuple[int, int]:
    """The checkpoint's finished epochs and optimizer steps, if they make sense for this run."""
    epoch, steps = state.get("epoch"), state.get("steps")
    for name, value, top in (("epoch", epoch, config.epochs), ("steps", steps, None)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (top is not None and value > top):
            limit = f" and at most the run's {top} epochs" if top is not None else ""
            raise RunError(f"checkpoint {path}: {name} must be an integer >= 0{limit}, got {value!r}")
    return epoch, steps


def run(
    config: Config | None, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict:
    """Train (or continue) one run in `run_dir`; returns the summary (also written to summary.json).

    Every option, the data and the method's options are checked before the run directory is created or touched.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if resume:
        if run_dir.exists() and not run_dir.is_dir():
            raise RunError(f"--out {run_dir} is a file, not a directory")
        if not (run_dir / "config.json").is_file():
            raise RunError(f"--resume: {run_dir} holds no run (no config.json)")
        config = read_run_config(run_dir)
    config = config.validate()
    built = build(config)
    with claim(run_dir, "run", resume=resume, overwrite=overwrite):
        return _train(config, run_dir, built, resume=resume, progress=progress)


def _train(config: Config, run_dir: Path, built: dict, *, resume: bool, progress: bool) -> dict:
    modalities, dominant, device = built["modalities"], built["dominant"], built["device"]
    xtr, ytr, xte, yte, train_means = (built[k] for k in ("xtr", "ytr", "xte", "yte", "train_means"))
    model, optimizer, scheduler, balancer = (built[k] for k in ("model", "optimizer", "scheduler", "balancer"))
    if not resume:
        write_text(run_dir / "config.json", config.to_json())

    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = load_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    pretrain_accuracy = None
    if config.freeze_encoders and checkpoint is None:
        pretrained_path = run_dir / "pretrained.pt"
        for p in model.enc.parameters():
            p.requires_grad_(True)
        if resume and pretrained_path.exists():
            pretrained = load_checkpoint(pretrained_path)
            try:
                model.enc.load_state_dict(pretrained["encoders"])
            except (KeyError, RuntimeError) as err:
                raise RunError(f"{pretrained_path} does not fit this run ({str(err)[:200]})") from None
            pretrain_accuracy = pretrained.get("train_accuracy")
        else:
            pretrain_accuracy = pretrain_encoders(model, xtr, ytr, config, progress)
            save_atomically(
                {
                    "version": CHECKPOINT_VERSION,
                    "encoders": model.enc.state_dict(),
                    "train_accuracy": pretrain_accuracy,
                },
                pretrained_path,
            )
        for p in model.enc.parameters():
            p.requires_grad_(False)
    loader_generator = torch.Generator().manual_seed(config.seed)

    start_epoch, steps_done = 0, 0
    if checkpoint is not None:
        start_epoch, steps_done = check_checkpoint(checkpoint, checkpoint_path, config)
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            balancer.load_state_dict(checkpoint["balancer"])
            loader_generator.set_state(checkpoint["loader_rng"])
            torch.set_rng_state(checkpoint["torch_rng"])
            if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
            pretrain_accuracy = checkpoint.get("pretrain_accuracy")
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise RunError(
                f"checkpoint {checkpoint_path} does not fit this run's configuration "
                f"({type(err).__name__}: {str(err)[:200]})"
            ) from None
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start_epoch)

    kill_after = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    epochs = _progress(
        range(start_epoch, config.epochs), progress, desc=f"{config.method}", initial=start_epoch, total=config.epochs
    )
    for epoch in epochs:
        record = {"epoch": epoch + 1, "method": config.method, "lr": scheduler.get_last_lr()[0]}
        record.update(
            train_epoch(
                model, balancer, optimizer, xtr, ytr, config, loader_generator, device, progress, kill_after, steps_done
            )
        )
        steps_done += record["steps"]
        balancer.end_epoch()
        scheduler.step()
        record.update(metrics_module.evaluate(model, xte, yte, train_means, seed=1000 + epoch))
        record["method_stats"] = {k: v for k, v in balancer.stats().items()}
        record["skipped_steps"] = balancer.skipped
        append_line(metrics_path, json.dumps(record))
        save_atomically(
            {
                "version": CHECKPOINT_VERSION,
                "epoch": epoch + 1,
                "steps": steps_done,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "balancer": balancer.state_dict(),
                "loader_rng": loader_generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "pretrain_accuracy": pretrain_accuracy,
            },
            checkpoint_path,
        )
        if progress and hasattr(epochs, "set_postfix"):
            epochs.set_postfix(acc=f"{record['accuracy']:.3f}", mu=f"{record['shuffle_utilization'][dominant]:.2f}")

    final = metrics_module.evaluate(model, xte, yte, train_means, seed=999_999)
    sweep = metrics_module.noise_sweep(
        model, xte, yte, config.noise_variances, draws=config.noise_draws, seed=config.seed
    )
    summary = {
        "config": json.loads(config.to_json()),
        "dominant": dominant,
        "modalities": modalities,
        "final": final,
        "noise_variances": list(config.noise_variances),
        "noise": sweep,
        "pretrain_train_accuracy": pretrain_accuracy,
        "epochs": read_metrics(metrics_path),
    }
    write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    from modfuse.train.plots import plot_run

    plot_run(summary, run_dir)
    return summary


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records, skipping a last line cut short by a kill; any other bad line is a RunError."""
    out = []
    if not path.exists():
        return out
    try:
        lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"{path} cannot be read ({err})") from None
    for k, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if k == len(lines) - 1:
                break  # the line a kill cut short
            raise RunError(f"{path}, line {number}: not JSON; the file is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int) or record["epoch"] < 1:
            raise RunError(f'{path}, line {number}: a record without a positive integer "epoch"; the file is damaged')
        out.append(record)
    return out


def _truncate_metrics(path: Path, epochs: int) -> None:
    """Keep the metrics of the first `epochs` epochs (those the checkpoint covers)."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["epoch"] <= epochs]
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
