"""One training run's configuration: defaults, a JSON/TOML config file, command-line overrides, validation."""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from modfuse.train.metrics import NOISE_VARIANCES
from modfuse.train.models import FUSIONS

METHODS = ("none", "calibrated", "ogm_ge", "greedy", "mmpareto", "utilization", "mimo", "i2m2")
# Methods whose objective includes each modality's own loss (so the comparison shows a fused+unimodal control).
UNIMODAL_METHODS = ("calibrated", "mmpareto", "mimo")
DEFAULT_VIEWS = {"mfeat": ["kar", "mor"], "basicmotions": ["accelerometer", "gyroscope"]}


class ConfigError(ValueError):
    """A configuration option is wrong; the message names it."""


@dataclass
class Config:
    data: str = "mfeat"                  # "mfeat", "basicmotions", or a path to .npz / .safetensors / a .npy dir
    views: list[str] | None = None       # modalities to use (mfeat views, or array names); None: DEFAULT_VIEWS
    data_dir: str | None = None          # directory of the data files (default: the installed wheel's copy)
    test_fraction: float = 0.3
    split_seed: int = 0                  # the train/test split is fixed by this seed, not by `seed`
    method: str = "none"
    unimodal: bool | None = None         # add each modality's loss; None: only for methods that need it
    options: dict = field(default_factory=dict)  # the method's options, e.g. {"alpha": 0.8}
    dominant: str | None = None          # the modality the noise sweep and the table follow; None: the first view
    fusion: str = "shared"               # "shared", "concat", "i2m2" (method i2m2 needs "i2m2")
    hidden: int = 64
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    freeze_encoders: bool = False        # the utilization paper's protocol: pretrain encoders, freeze, train fusion
    pretrain_epochs: int = 30
    noise_variances: list[float] = field(default_factory=lambda: list(NOISE_VARIANCES))
    noise_draws: int = 3
    device: str = "cpu"

    # -- derived -----------------------------------------------------------------------------------------
    def modalities(self) -> list[str]:
        return list(self.views) if self.views else list(DEFAULT_VIEWS.get(self.data, []))

    def uses_unimodal_losses(self) -> bool:
        return self.method in UNIMODAL_METHODS if self.unimodal is None else bool(self.unimodal)

    def validate(self) -> "Config":
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"--fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if (self.method == "i2m2") != (self.fusion == "i2m2"):
            raise ConfigError("--method i2m2 and --fusion i2m2 go together (the I2M2 product needs a classifier per "
                              f"modality), got method {self.method!r} with fusion {self.fusion!r}")
        if self.views is not None and len(self.views) < 2:
            raise ConfigError(f"--views must name at least two modalities, got {self.views}")
        if self.dominant is not None and self.views and self.dominant not in self.views:
            raise ConfigError(f"--dominant {self.dominant!r} is not one of --views {self.views}")
        for name in ("hidden", "epochs", "batch_size", "noise_draws"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2, got {self.batch_size}")
        if not isinstance(self.pretrain_epochs, int) or self.pretrain_epochs < (1 if self.freeze_encoders else 0):
            raise ConfigError(f"--pretrain-epochs must be a positive integer, got {self.pretrain_epochs!r}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.noise_variances or any(not v >= 0 for v in self.noise_variances):
            raise ConfigError(f"--noise-variances must be non-negative numbers, got {self.noise_variances}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a mapping of method option -> value, got {self.options!r}")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Config":
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
