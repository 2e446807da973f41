"""`modfuse-train`: train one run, or `modfuse-train compare` for the whole comparison table.

    modfuse-train --method calibrated --out runs/calibrated            # one run (UCI mfeat kar + mor)
    modfuse-train --method utilization --option target=0.75 --out runs/u75
    modfuse-train --resume --out runs/calibrated                       # continue a killed run
    modfuse-train compare --out runs/compare                           # every method, 3 seeds, table + plots
    modfuse-train compare --data watch --epochs 15 --out runs/compare-watch

Options come from the defaults, then a --config file (JSON or TOML, Config field names), then the command line.
Default views: mfeat kar + mor; basicmotions and watch accelerometer + gyroscope. Bad input is one line on
stderr and exit status 2; nothing is written before every option has been checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from modfuse.train.config import METHODS, UNIMODAL_METHODS
from modfuse.train.models import FUSIONS

# What the `train` extra installs (pyproject.toml); checked before anything imports them.
TRAIN_EXTRA = ("numpy", "matplotlib", "tqdm")
# Set per row by compare, so refused there (with the reason) rather than silently overridden.
COMPARE_SETS_PER_ROW = {
    "method": "--method",
    "unimodal": "--unimodal",
    "freeze_encoders": "--freeze-encoders",
    "option": "--option",
}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    # Every default is None so that only what is given overrides the config file.
    g = p.add_argument_group("data")
    g.add_argument("--data", help="mfeat (default), basicmotions, watch, or a .npz/.safetensors file or .npy directory")
    g.add_argument(
        "--views",
        help="comma-separated modalities (default: mfeat kar,mor; basicmotions and watch "
        "accelerometer,gyroscope). mfeat views: fou fac kar pix zer mor",
    )
    g.add_argument("--window", type=int, help="--data watch: steps per segment at 12.5 Hz (default 25 = 2 s)")
    g.add_argument("--data-dir", help="directory of the data files (default: the installed wheel's copy)")
    g.add_argument("--test-fraction", type=float)
    g.add_argument("--split-seed", type=int)
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS)
    g.add_argument(
        "--unimodal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"add each modality's own loss (default: only for {', '.join(UNIMODAL_METHODS)})",
    )
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, e.g. alpha=0.1 or target=0.75 (repeatable)",
    )
    g.add_argument("--dominant", help="the modality the noise sweep and table follow (default: the first view)")
    g = p.add_argument_group("model and training")
    g.add_argument("--fusion", choices=FUSIONS, help="default shared (compare: i2m2 and the frozen rows set their own)")
    g.add_argument("--hidden", type=int)
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--freeze-encoders",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pretrain each encoder on its own modality, freeze them, train only the fusion head",
    )
    g.add_argument("--pretrain-epochs", type=int)
    g.add_argument("--noise-variances", help="comma-separated variances of the noise sweep")
    g.add_argument("--noise-draws", type=int)
    g.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--config", help="JSON or TOML file of options (command-line flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


RUN_OPTIONS = (
    "data",
    "data_dir",
    "test_fraction",
    "split_seed",
    "method",
    "unimodal",
    "dominant",
    "fusion",
    "hidden",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "freeze_encoders",
    "pretrain_epochs",
    "noise_draws",
    "device",
    "window",
)


def given_options(args: argparse.Namespace) -> list[str]:
    """The run options given on the command line, as flags."""
    names = [n for n in RUN_OPTIONS + ("views", "noise_variances", "config") if getattr(args, n) is not None]
    names += ["option"] if args.option else []
    return ["--" + n.replace("_", "-") for n in names]


def missing_train_extra() -> list[str]:
    return [m for m in TRAIN_EXTRA if importlib.util.find_spec(m) is None]


def build_config(args: argparse.Namespace):
    from modfuse.train.config import ConfigError, parse_option, read_config_file

    values = read_config_file(args.config) if args.config else {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {args.config}: expected an object of options, got a {type(values).__name__}")
    for name in RUN_OPTIONS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.views is not None:
        values["views"] = [v.strip() for v in args.views.split(",") if v.strip()]
    if args.noise_variances is not None:
        try:
            values["noise_variances"] = [float(v) for v in args.noise_variances.split(",")]
        except ValueError:
            raise ConfigError(
                f"--noise-variances must be comma-separated numbers, got {args.noise_variances!r}"
            ) from None
    if not isinstance(values.get("options", {}), dict):
        raise ConfigError(
            f"{args.config}: options (--option) must be a mapping of method option name -> value, got "
            f"{values['options']!r}"
        )
    options = dict(values.get("options", {}))
    options.update(parse_option(o) for o in args.option)
    values["options"] = options
    if values.get("method") == "i2m2" and "fusion" not in values:
        values["fusion"] = "i2m2"
    from modfuse.train.config import Config

    return Config.from_dict(values, args.config or "options").validate()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = missing_train_extra()
    if missing:
        print(
            f"modfuse-train: error: the trainer needs the `train` extra ({', '.join(missing)} missing): "
            "pip install 'modfuse[train]' (from a checkout: pip install -e '.[train]')",
            file=sys.stderr,
        )
        return 2
    from modfuse.train.config import ConfigError
    from modfuse.train.data import DataError
    from modfuse.train.rundir import RunError

    comparing = bool(argv) and argv[0] == "compare"
    if comparing:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="modfuse-train compare" if comparing else "modfuse-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        default="runs/compare" if comparing else None,
        required=not comparing,
        help="run directory" + (" (default runs/compare)" if comparing else ""),
    )
    _add_run_options(parser)
    if comparing:
        parser.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")
        parser.add_argument(
            "--jobs", type=int, default=None, help="runs in parallel, at least 1 (default: one per core)"
        )
        parser.add_argument("--only", help="comma-separated row names (slugs) to run, e.g. none-fused-only,greedy")
    args = parser.parse_args(argv)
    try:
        from modfuse.train.loop import run

        if args.resume and not comparing:
            given = given_options(args)
            if given:
                raise ConfigError(
                    f"--resume continues the run exactly as its config.json says, so {given[0]} "
                    "cannot be changed (the learning-rate schedule, data and method state depend on "
                    "it); start a new run with --out elsewhere instead"
                )
            summary = run(None, args.out, resume=True, progress=not args.quiet)
        else:
            if comparing:
                per_row = [flag for name, flag in COMPARE_SETS_PER_ROW.items() if getattr(args, name) not in (None, [])]
                if per_row:
                    raise ConfigError(
                        f"compare sets {per_row[0]} itself for each row of its table; use --only to "
                        "pick rows, or train one method with `modfuse-train --method ...`"
                    )
                if args.jobs is not None and args.jobs < 1:
                    raise ConfigError(f"--jobs must be at least 1 (runs at a time), got {args.jobs}")
                if args.seeds < 1:
                    raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
            config = build_config(args)
            if comparing:
                from modfuse.train.compare import compare

                only = [o.strip() for o in args.only.split(",")] if args.only else None
                report = compare(
                    config,
                    args.out,
                    seeds=args.seeds,
                    jobs=args.jobs,
                    resume=args.resume,
                    overwrite=args.overwrite,
                    only=only,
                    progress=not args.quiet,
                )
                print(report["table"])
                print(
                    f"\n{args.out}: compare.json, compare.md, utilization.png, noise.png, summary.png "
                    f"({report['wall_seconds']:.0f} s)"
                )
                return 0
            summary = run(config, args.out, resume=False, overwrite=args.overwrite, progress=not args.quiet)
    except (ConfigError, DataError, RunError) as err:
        print(f"modfuse-train: error: {err}", file=sys.stderr)
        return 2
    final, dominant = summary["final"], summary["dominant"]
    print(
        f"accuracy {final['accuracy']:.4f}; shuffle utilization "
        + ", ".join(f"{m} {v:.3f}" for m, v in final["shuffle_utilization"].items())
        + "; branch accuracy "
        + ", ".join(f"{m} {v:.3f}" for m, v in final["branch_accuracy"].items())
    )
    print(
        f"macro-F1 {final['macro_f1']:.4f}; accuracy with a modality missing (input zeroed) "
        + ", ".join(f"{m} {v:.3f}" for m, v in final["missing_accuracy"].items())
        + "; Shapley "
        + ", ".join(f"{m} {v:.3f}" for m, v in final["shapley"].items())
        + f"; imbalance {final['imbalance']:.3f}"
    )
    print(
        f"noise on {dominant}: "
        + ", ".join(f"σ²={v:g}: {a:.3f}" for v, a in zip(summary["noise_variances"], summary["noise"][dominant]))
    )
    print(f"{args.out}: metrics.jsonl, summary.json, checkpoint.pt, utilization.png, noise.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
