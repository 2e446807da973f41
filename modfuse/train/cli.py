"""`modfuse-train`: train one run, or `modfuse-train compare` for the whole comparison table.

    modfuse-train --method calibrated --out runs/calibrated            # one run (UCI mfeat pix + zer)
    modfuse-train --method utilization --option target=0.75 --out runs/u75
    modfuse-train --resume --out runs/calibrated                       # continue a killed run
    modfuse-train compare --out runs/compare                           # every method, 3 seeds, table + plots

Options come from the defaults, then a --config file (JSON or TOML, Config field names), then the command line.
"""
from __future__ import annotations

import argparse
import sys

from modfuse.train.config import METHODS, Config, ConfigError, parse_option, read_config_file
from modfuse.train.data import DataError
from modfuse.train.loop import RunError, run
from modfuse.train.models import FUSIONS


def _add_run_options(p: argparse.ArgumentParser) -> None:
    # Every default is None so that only what is given overrides the config file.
    g = p.add_argument_group("data")
    g.add_argument("--data", help="mfeat (default), basicmotions, or a .npz/.safetensors file or .npy directory")
    g.add_argument("--views", help="comma-separated modalities, e.g. pix,zer (mfeat views: fou fac kar pix zer mor)")
    g.add_argument("--data-dir", help="directory of the data files (default: the installed wheel's copy)")
    g.add_argument("--test-fraction", type=float)
    g.add_argument("--split-seed", type=int)
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS)
    g.add_argument("--unimodal", action=argparse.BooleanOptionalAction, default=None,
                   help="add each modality's own loss (default: only for calibrated, mmpareto, mimo)")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. alpha=0.1 or target=0.75 (repeatable)")
    g.add_argument("--dominant", help="the modality the noise sweep and table follow (default: the first view)")
    g = p.add_argument_group("model and training")
    g.add_argument("--fusion", choices=FUSIONS)
    g.add_argument("--hidden", type=int)
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--freeze-encoders", action=argparse.BooleanOptionalAction, default=None,
                   help="pretrain each encoder on its own modality, freeze them, train only the fusion head")
    g.add_argument("--pretrain-epochs", type=int)
    g.add_argument("--noise-variances", help="comma-separated variances of the noise sweep")
    g.add_argument("--noise-draws", type=int)
    g.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--config", help="JSON or TOML file of options (command-line flags override it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_config(args: argparse.Namespace) -> Config:
    values = read_config_file(args.config) if args.config else {}
    for name in ("data", "data_dir", "test_fraction", "split_seed", "method", "unimodal", "dominant", "fusion",
                 "hidden", "epochs", "batch_size", "lr", "weight_decay", "seed", "freeze_encoders",
                 "pretrain_epochs", "noise_draws", "device"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.views is not None:
        values["views"] = [v.strip() for v in args.views.split(",") if v.strip()]
    if args.noise_variances is not None:
        try:
            values["noise_variances"] = [float(v) for v in args.noise_variances.split(",")]
        except ValueError:
            raise ConfigError(f"--noise-variances must be comma-separated numbers, got {args.noise_variances!r}") \
                from None
    options = dict(values.get("options", {}))
    options.update(parse_option(o) for o in args.option)
    values["options"] = options
    if values.get("method") == "i2m2" and "fusion" not in values:
        values["fusion"] = "i2m2"
    return Config.from_dict(values, args.config or "options").validate()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    comparing = bool(argv) and argv[0] == "compare"
    if comparing:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="modfuse-train compare" if comparing else "modfuse-train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/compare" if comparing else None, required=not comparing,
                        help="run directory" + (" (default runs/compare)" if comparing else ""))
    _add_run_options(parser)
    if comparing:
        parser.add_argument("--seeds", type=int, default=3)
        parser.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: one per core)")
        parser.add_argument("--only", help="comma-separated row names (slugs) to run, e.g. none-fused-only,greedy")
    args = parser.parse_args(argv)
    try:
        if args.resume and not comparing:
            summary = run(None, args.out, resume=True, progress=not args.quiet)
        else:
            config = build_config(args)
            if comparing:
                from modfuse.train.compare import compare
                if args.seeds < 1:
                    raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
                only = [o.strip() for o in args.only.split(",")] if args.only else None
                report = compare(config, args.out, seeds=args.seeds, jobs=args.jobs, resume=args.resume,
                                 overwrite=args.overwrite, only=only, progress=not args.quiet)
                print(report["table"])
                print(f"\n{args.out}: compare.json, compare.md, utilization.png, noise.png "
                      f"({report['wall_seconds']:.0f} s)")
                return 0
            summary = run(config, args.out, resume=False, overwrite=args.overwrite, progress=not args.quiet)
    except (ConfigError, DataError, RunError) as err:
        print(f"modfuse-train: error: {err}", file=sys.stderr)
        return 2
    final, dominant = summary["final"], summary["dominant"]
    print(f"accuracy {final['accuracy']:.4f}; shuffle utilization "
          + ", ".join(f"{m} {v:.3f}" for m, v in final["shuffle_utilization"].items())
          + "; branch accuracy " + ", ".join(f"{m} {v:.3f}" for m, v in final["branch_accuracy"].items()))
    print(f"noise on {dominant}: " + ", ".join(f"σ²={v:g}: {a:.3f}" for v, a in
                                               zip(summary["noise_variances"], summary["noise"][dominant])))
    print(f"{args.out}: metrics.jsonl, summary.json, checkpoint.pt, utilization.png, noise.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
