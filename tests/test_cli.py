"""One command line: one-line errors with exit code 2 for bad data, config or checkpoint in every
subcommand, one spelling and value syntax per setting, help with allowed values, --version,
did-you-mean, run directories that work from any directory, a stop hint that works, and the notes
and checks that keep short runs and spike-fed layers honest."""
import inspect
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tetsnn
from tetsnn import cli
from tetsnn.engine.checkpoint import load_checkpoint, save_checkpoint
from tetsnn.engine.config import DEFAULTS, HELP, ConfigError, build_parser, load_config, resolve
from tetsnn.engine.evaluate import main as evaluate_main
from tetsnn.engine.export_cli import main as export_main
from tetsnn.engine.preprocess_cli import main as preprocess_main
from tetsnn.engine.profile_cli import main as profile_main
from tetsnn.engine.train import main as train_main
from tetsnn.engine.train import resolve_run_config, short_run_note

from conftest import CHILD_ENV

SRC = Path(__file__).resolve().parents[1] / "src"
README = Path(__file__).resolve().parents[1] / "README.md"
EVENTS = np.dtype([("t", "<i8"), ("x", "<i2"), ("y", "<i2"), ("p", "u1")])


def one_line_error(capsys, prefix):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(prefix), err
    return err


def make_folder(root, per_class=10, sensor=(16, 16)):
    """Two class folders of small .npy recordings on a ``sensor`` (H, W)."""
    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            ev = np.zeros(200, dtype=EVENTS)
            ev["t"] = np.arange(200)
            ev["x"], ev["y"] = rng.integers(0, sensor[1], 200), rng.integers(0, sensor[0], 200)
            ev["p"] = rng.integers(0, 2, 200)
            np.save(root / c / f"r{i}.npy", ev)
    return root


def folder_flags(root, cache):
    return ["--config", "nmnist", "--dataset", "event-folder", "--data-dir", str(root), "--cache-dir", str(cache),
            "--reader", "npy", "--sensor-size", "16,16", "--size", "16", "--model-kw", "{in_channels: 2, size: 16}",
            "--T", "2"]


def run_flags(out):
    return ["--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out", str(out)]


# --- bad data ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "outside"])
def test_bad_recording_is_one_line_in_train_and_preprocess(tmp_path, capsys, damage):
    root = make_folder(tmp_path / "rec")
    bad = root / "b" / "r2.npy"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:150])
    else:
        ev = np.load(bad)
        ev["x"][7] = 40                                   # outside the 16-wide sensor
        np.save(bad, ev)
    flags = folder_flags(root, tmp_path / "cache")
    assert train_main(flags + run_flags(tmp_path / "run")) == 2
    assert "r2.npy" in one_line_error(capsys, "tetsnn train: error:")
    assert not (tmp_path / "run" / "last.pt").exists()
    assert preprocess_main(flags) == 2                   # preprocess takes the same flags
    assert "r2.npy" in one_line_error(capsys, "tetsnn preprocess: error:")


@pytest.mark.slow
def test_folder_with_a_bad_file_trains_with_on_error_skip(tmp_path, capsys):
    """preprocess --on-error skip builds the cache; train with the same keys reads that very cache
    (flag or YAML key), and without on_error: skip it refuses it in one line."""
    root = make_folder(tmp_path / "rec")
    (root / "a" / "r1.npy").write_bytes(b"\x93NUMPY junk")
    cache = tmp_path / "cache"
    flags = folder_flags(root, cache)
    assert preprocess_main(flags + ["--on-error", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "skipped a/r1.npy" in printed and "17 train / 2 test samples" in printed
    built = sorted(p.name for p in cache.iterdir())
    assert train_main(flags + run_flags(tmp_path / "refused")) == 2
    err = one_line_error(capsys, "tetsnn train: error:")
    assert "on_error" in err and "skip" in err
    assert train_main(flags + run_flags(tmp_path / "run") + ["--on-error", "skip"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == built     # the same cache, not a new one
    config = tmp_path / "skip.yaml"
    config.write_text(yaml.safe_dump({**load_config("nmnist"), "on_error": "skip", "sensor_size": "16,16"}))
    assert train_main(["--config", str(config)] + flags[2:] + run_flags(tmp_path / "yaml")) == 0
    assert sorted(p.name for p in cache.iterdir()) == built


def test_split_by_and_size_are_config_keys(tmp_path):
    root = make_folder(tmp_path / "rec")
    cfg = resolve_run_config(folder_flags(root, tmp_path / "c") + ["--split-by", "time", "--size", "8"])
    assert (cfg["split_by"], cfg["size"], cfg["sensor_size"]) == ("time", 8, [16, 16])
    data = tetsnn.build_data(cfg, train=False)
    x, _ = next(iter(data.test))
    assert x.shape[-2:] == (8, 8)
    with pytest.raises(ConfigError, match="split_by"):
        resolve({"split_by": "space"})
    with pytest.raises(ConfigError, match="on_error"):
        resolve({"on_error": "ignore"})
    with pytest.raises(ConfigError, match="size"):
        resolve({"size": 0})


def test_sensor_size_has_one_syntax_in_flags_and_yaml(tmp_path, capsys):
    root = make_folder(tmp_path / "rec")
    base = {"dataset": "event-folder", "data_dir": str(root), "reader": "npy"}
    for value in ("16,16", "[16, 16]", [16, 16], " 16, 16 "):
        assert resolve({**base, "sensor_size": value})["sensor_size"] == [16, 16]
    path = tmp_path / "c.yaml"
    path.write_text("sensor_size: 64,64\n")
    assert load_config(path)["sensor_size"] == "64,64" and resolve({**base, **load_config(path)})["sensor_size"] == [64, 64]
    with pytest.raises(ConfigError, match="bad value for sensor_size"):
        resolve({**base, "sensor_size": "64"})
    assert train_main(["--dataset", "event-folder", "--data-dir", str(root), "--reader", "npy",
                       "--sensor-size", "64x64", "--out", str(tmp_path / "r")]) == 2
    assert "sensor_size" in one_line_error(capsys, "tetsnn train: error:")


def test_preprocess_old_spellings_name_the_new_ones(tmp_path, capsys):
    for argv, words in [(["--dataset", "n-mnist", "--root", "x"], "--root is now --data-dir"),
                        (["--dataset", "n-mnist", "--data-dir", "x", "--cache", "c"], "--cache is now --cache-dir"),
                        (["n-mnist", "--data-dir", "x"], "--dataset n-mnist"),
                        (["--dataset", "digits"], "preprocess builds event caches")]:
        assert preprocess_main(argv) == 2
        assert words in one_line_error(capsys, "tetsnn preprocess: error:")


# --- help, version, did you mean -----------------------------------------------------------------

def test_train_help_describes_every_flag_and_lists_allowed_values():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest in DEFAULTS}
    assert set(flags) == set(DEFAULTS) == set(HELP)
    for key, action in flags.items():
        assert action.help.split("(default")[0].strip(), key        # a description, not only the default
    for key, values in [("dataset", "digits, cifar10"), ("loss", "tet, sdt"), ("amp", "bf16, fp16, none"),
                        ("reader", "aedat2, aedat31, atis, npy"), ("optimizer", "adam, sgd"),
                        ("split_by", "count, time"), ("on_error", "raise, skip"), ("model", "digits_snn")]:
        assert values in flags[key].help, key
    text = parser.format_help()
    assert "BatchNorm" in flags["limit_train"].help and "--sensor-size H,W" in text


def test_version_and_did_you_mean(tmp_path, capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tetsnn {tetsnn.__version__}"
    assert cli.main(["trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err
    assert train_main(["--on-eror", "skip", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean '--on-error'?" in one_line_error(capsys, "tetsnn train: error:")
    path = tmp_path / "c.yaml"
    path.write_text("epocs: 3\n")
    assert train_main(["--config", str(path), "--out", str(tmp_path / "r")]) == 2
    err = one_line_error(capsys, "tetsnn train: error:")
    assert "c.yaml" in err and "'epocs'" in err and "did you mean 'epochs'?" in err
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        resolve({"batchsize": 3})
    res = subprocess.run([sys.executable, "-m", "tetsnn", "--version"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(SRC)})
    assert res.returncode == 0 and res.stdout.strip() == f"tetsnn {tetsnn.__version__}"


# --- run directories ------------------------------------------------------------------------------

def test_run_directory_works_from_any_directory(tmp_path, monkeypatch, capsys):
    """Relative paths are saved absolute: test and profile from another directory find the data and
    the cache (no rebuild there); --cache-dir moves the cache."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_folder(start / "rec")
    monkeypatch.chdir(start)
    assert train_main(folder_flags("rec", "cache") + run_flags("run")) == 0
    saved = yaml.safe_load((start / "run" / "config.yaml").read_text())
    for key in ("data_dir", "cache_dir", "out"):
        assert saved[key] == str(start / {"data_dir": "rec", "cache_dir": "cache", "out": "run"}[key]), key
    assert load_checkpoint(start / "run" / "last.pt")["config"]["data_dir"] == str(start / "rec")
    built = sorted(p.name for p in (start / "cache").iterdir())
    capsys.readouterr()
    monkeypatch.chdir(elsewhere)
    ckpt = str(start / "run" / "last.pt")
    assert evaluate_main(["--checkpoint", ckpt, "--json"]) == 0
    assert sorted(p.name for p in (start / "cache").iterdir()) == built and not list(elsewhere.iterdir())
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", ckpt, "--cache-dir", "moved", "--json"]) == 0
    assert len([p for p in (elsewhere / "moved").iterdir() if not p.name.startswith(".")]) == 1   # and its lock
    assert profile_main(["--checkpoint", ckpt, "--cache-dir", str(elsewhere / "moved"), "--batches", "1"]) == 0


def test_bad_checkpoint_is_one_line_exit_2_in_every_command(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for name, main, extra in [("test", evaluate_main, []), ("profile", profile_main, []),
                              ("export", export_main, ["--out", str(tmp_path / "m.nir")]),
                              ("train", train_main, [])]:
        argv = (["--resume", str(tmp_path)] if name == "train" else ["--checkpoint", str(tmp_path / "bad.pt")]) + extra
        if name == "train":
            (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
        assert main(argv) == 2, name
        assert "pt" in one_line_error(capsys, f"tetsnn {name}: error:")


def test_old_checkpoint_without_the_new_keys_still_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--limit-train", "16", "--limit-test", "16", "--epochs", "1", "--device", "cpu",
                       "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    for key in ("size", "split_by", "on_error"):            # a run written before these keys existed
        del ckpt["config"][key]
    save_checkpoint(ckpt, out / "old.pt")
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(out / "old.pt"), "--json"]) == 0
    assert export_main(["--checkpoint", str(out / "old.pt"), "--out", str(tmp_path / "m.nir")]) == 0
    assert tetsnn.load_checkpoint(out / "old.pt")["epoch"] == 1


# --- the stop hint ---------------------------------------------------------------------------------

def _cli(args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "tetsnn"] + args, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CHILD_ENV, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_stop_before_the_first_step_prints_a_command_that_works(tmp_path):
    """SIGINT before the first step; the printed command, run from another directory, finishes the
    run with the weights of an uninterrupted one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ["train", "--limit-train", "32", "--limit-test", "16", "--epochs", "1", "--batch-size", "16",
            "--device", "cpu"]
    proc = _cli(args + ["--out", "early"], tmp_path / "a", {"TETSNN_TEST_PAUSE": "start:120"})
    for line in proc.stderr:
        if line.startswith("tetsnn-pause start"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    hint = re.search(r"continue with: tetsnn (.*)$", out, re.M)
    assert hint and "before the first step" in out, out
    resumed = _cli(hint.group(1).split(), tmp_path / "b")
    whole = _cli(args + ["--out", str(tmp_path / "whole")], tmp_path)   # beside it, one thread each
    out2, err2 = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err2
    assert "final test accuracy" in out2
    assert whole.communicate(timeout=300)[0] and whole.returncode == 0
    a = load_checkpoint(tmp_path / "a" / "early" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- short runs, spike-fed layers, the README's layer row, damaged .npy headers -------------------

def test_short_run_batchnorm_note(tmp_path, capsys):
    model = tetsnn.create_model("digits_snn", T=2)
    assert short_run_note(model) is not None                 # no batch seen yet: all initial values
    model.train()
    for _ in range(3):
        model(torch.rand(4, 1, 8, 8))
    assert "3 training batches" in short_run_note(model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.fill_(200)
    assert short_run_note(model) is None
    assert train_main(["--limit-train", "32", "--limit-test", "16", "--epochs", "1", "--batch-size", "16",
                       "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm running statistics have seen only 2 training batches" in out


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_spike_fed_layer_rejects_non_binary_input(kind):
    from tetsnn.compact import SpikeConv2d, SpikeLinear

    torch.manual_seed(0)
    if kind == "conv":
        layer = tetsnn.Layer(2, 4, spikes=True)
        x = (torch.rand(3, 2, 2, 6, 6) < 0.3).float()         # [N, T, C, H, W]
        assert isinstance(layer.fwd.module[0], SpikeConv2d)
    else:
        layer = SpikeLinear(6, 3)
        x = (torch.rand(5, 6) < 0.3).float()
    layer(x).sum().backward()                                   # 0/1 spikes: fine
    bad = x.clone()
    bad.view(-1)[4] = 0.5
    with pytest.raises(ValueError, match=r"spikes=True\) got the value 0.5") as info:
        layer(bad)
    assert "\n" not in str(info.value)
    with torch.no_grad():
        layer(bad)                                              # no gradient kept: a plain layer, nothing saved


def test_readme_layer_row_uses_the_real_arguments():
    text = "\n".join(p.read_text() for p in [README, *sorted((README.parent / "docs").glob("*.md"))])
    params = inspect.signature(tetsnn.Layer).parameters
    rows = re.findall(r"`(?:tetsnn\.)?Layer\(([^`]*)\)`", text)
    assert rows
    for row in rows:
        for arg in (a.strip() for a in row.split(",")):
            name = arg.split("=")[0].strip()
            assert name in params or name == "...", name


def test_read_npy_damaged_header_names_the_file(tmp_path):
    from tetsnn.data.events.formats import read_npy

    path = tmp_path / "rec.npy"
    np.save(path, np.zeros(4, dtype=EVENTS))
    data = path.read_bytes()
    damaged = data.replace(b"'shape': (4,)", b"'shape': (4,,", 1)
    assert damaged != data
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        read_npy(path)
    assert "\n" not in str(info.value)
