"""One training run's configuration: defaults, a JSON/TOML config file, command-line overrides, validation."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomllib
import torch

from modfuse.methods import get, names
from modfuse.train.metrics import NOISE_VARIANCES
from modfuse.train.models import FUSIONS

METHODS = tuple(names())  # every registered method (modfuse.methods.register)
# Methods whose objective includes each modality's own loss (so the comparison shows a fused+unimodal control):
# those that require unimodal= losses, and calibrated (it weighs them when given; the trainer always gives them).
UNIMODAL_METHODS = tuple(m for m in METHODS if m == "calibrated" or "unimodal" in get(m).requires)
DEFAULT_VIEWS = {
    "mfeat": ["kar", "mor"],
    "basicmotions": ["accelerometer", "gyroscope"],
    "watch": ["accelerometer", "gyroscope"],
}


class ConfigError(ValueError):
    """A configuration option is wrong; the message names it."""


@dataclass
class Config:
    data: str = "mfeat"  # "mfeat", "basicmotions", "watch", or a path to .npz / .safetensors / a .npy dir
    views: list[str] | None = None  # modalities to use (mfeat views, or array names); None: DEFAULT_VIEWS
    data_dir: str | None = None  # directory of the data files (default: the installed wheel's copy)
    test_fraction: float = 0.3
    split_seed: int = 0  # the train/test split is fixed by this seed, not by `seed`
    method: str = "none"
    unimodal: bool | None = None  # add each modality's loss; None: only for methods that need it
    options: dict = field(default_factory=dict)  # the method's options, e.g. {"alpha": 0.8}
    dominant: str | None = None  # the modality the noise sweep and the table follow; None: the first view
    fusion: str = "shared"  # "shared", "concat", "i2m2" (method i2m2 needs "i2m2")
    hidden: int = 64
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    freeze_encoders: bool = False  # the utilization paper's protocol: pretrain encoders, freeze, train fusion
    pretrain_epochs: int = 30
    noise_variances: list[float] = field(default_factory=lambda: list(NOISE_VARIANCES))
    noise_draws: int = 3
    device: str = "cpu"
    window: int = 25  # --data watch: steps per segment (12.5 Hz, so 25 = 2 s)

    # -- derived -----------------------------------------------------------------------------------------
    def modalities(self) -> list[str]:
        return list(self.views) if self.views else list(DEFAULT_VIEWS.get(self.data, []))

    def uses_unimodal_losses(self) -> bool:
        return self.method in UNIMODAL_METHODS if self.unimodal is None else bool(self.unimodal)

    def validate(self) -> Config:
        """Check every field's type and range (a config file can hold anything); raise ConfigError naming it."""

        def bad(name: str, expected: str):
            value = getattr(self, name)
            flag = "option" if name == "options" else name.replace("_", "-")
            raise ConfigError(f"{name} (--{flag}) must be {expected}, got {value!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("data", "method", "fusion", "device"):
            if not isinstance(getattr(self, name), str):
                bad(name, "a string")
        for name in ("data_dir", "dominant"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                bad(name, "a string")
        if self.views is not None and (
            not isinstance(self.views, list) or not all(isinstance(v, str) for v in self.views)
        ):
            bad("views", "a list of modality names")
        if self.unimodal is not None and not isinstance(self.unimodal, bool):
            bad("unimodal", "true, false or null (a JSON boolean, not a string)")
        if not isinstance(self.freeze_encoders, bool):
            bad("freeze_encoders", "true or false (a JSON boolean, not a string)")
        if self.method not in METHODS:
            bad("method", f"one of {', '.join(METHODS)}")
        if self.fusion not in FUSIONS:
            bad("fusion", f"one of {', '.join(FUSIONS)}")
        if (self.method == "i2m2") != (self.fusion == "i2m2"):
            raise ConfigError(
                "--method i2m2 and --fusion i2m2 go together (the I2M2 product needs a classifier per "
                f"modality), got method {self.method!r} with fusion {self.fusion!r}"
            )
        if self.views is not None and len(self.views) < 2:
            raise ConfigError(f"--views must name at least two modalities, got {self.views}")
        if self.dominant is not None and self.views and self.dominant not in self.views:
            raise ConfigError(f"--dominant {self.dominant!r} is not one of --views {self.views}")
        for name in ("hidden", "epochs", "batch_size", "noise_draws"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "a positive integer")
        if self.batch_size < 2:
            bad("batch_size", "at least 2")
        if not is_int(self.pretrain_epochs) or self.pretrain_epochs < (1 if self.freeze_encoders else 0):
            bad("pretrain_epochs", "a positive integer")
        for name in ("seed", "split_seed"):
            if not is_int(getattr(self, name)) or not 0 <= getattr(self, name) < 2**63:
                bad(name, "a non-negative integer")
        if not is_int(self.window) or self.window < 8:
            bad("window", "an integer of at least 8 (steps)")
        if not is_real(self.test_fraction) or not 0 < self.test_fraction < 1:
            bad("test_fraction", "a number strictly between 0 and 1")
        if not is_real(self.lr) or not self.lr > 0:
            bad("lr", "a positive number")
        if not is_real(self.weight_decay) or not self.weight_decay >= 0:
            bad("weight_decay", "a number >= 0")
        if (
            not isinstance(self.noise_variances, list)
            or not self.noise_variances
            or not all(is_real(v) and v >= 0 for v in self.noise_variances)
        ):
            bad("noise_variances", "a non-empty list of numbers >= 0")
        if not isinstance(self.options, dict) or not all(isinstance(k, str) for k in self.options):
            bad("options", "a mapping of method option name -> value")
        self.check_device()
        return self

    def check_device(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device (--device) must be cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: this torch has no CUDA device")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ConfigError(f"--device {self.device}: there are {torch.cuda.device_count()} CUDA devices")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> Config:
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a JSON/TOML object of options, got a {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


def read_config_file(path: str | Path) -> dict:
    """A JSON or TOML file of Config fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be parsed ({err})") from None


def parse_option(text: str) -> tuple[str, object]:
    """`key=value` with a JSON value (numbers, true/false, strings, objects); a bare word stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--option expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value
