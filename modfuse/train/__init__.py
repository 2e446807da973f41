"""The reference trainer: balanced multimodal training on real data (see cli.py for the command line).

    from modfuse.train import Config, run, compare
    summary = run(Config(method="calibrated"), "runs/calibrated")

The names are imported on first use, so that `modfuse-train` can say which extra is missing (numpy, matplotlib,
tqdm: `pip install 'modfuse[train]'`) instead of failing on import.
"""

import importlib

_WHERE = {
    "Config": "config",
    "ConfigError": "config",
    "DataError": "data",
    "Dataset": "data",
    "load": "data",
    "RunError": "rundir",
    "run": "loop",
    "compare": "compare",
}
__all__ = ["Config", "ConfigError", "DataError", "Dataset", "RunError", "compare", "load", "run"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'modfuse.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"modfuse.train.{_WHERE[name]}"), name)
