"""The reference trainer: balanced multimodal training on real data (see cli.py for the command line).

    from modfuse.train import Config, run, compare
    summary = run(Config(method="calibrated"), "runs/calibrated")
"""
from modfuse.train.compare import compare
from modfuse.train.config import Config, ConfigError
from modfuse.train.data import DataError, Dataset, load
from modfuse.train.loop import RunError, run

__all__ = ["Config", "ConfigError", "DataError", "Dataset", "RunError", "compare", "load", "run"]
