"""The training engine end to end on the digits: run directory, resume exactness after a real
SIGTERM, a non-finite loss (DDP under torchrun: test_ddp.py)."""
import json
import math
import os
import signal
import sys

import pytest
import torch

import tetsnn.engine.train as train_mod
from tetsnn.engine.checkpoint import load_checkpoint
from tetsnn.engine.train import main

from conftest import QUICK, run_cli

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "world_size"}


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_run_shortened(tmp_path):
    """The no-argument default, on 3 epochs instead of 15, as a user runs it (a fresh process)."""
    res = run_cli("train", "--epochs", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "final test accuracy" in res.stdout and "best test accuracy" in res.stdout
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert set(m) == METRIC_KEYS
        assert 0 <= m["train_acc"] <= 1 and 0 <= m["test_acc"] <= 1 and m["seconds"] > 0 and m["world_size"] == 1
    assert metrics[-1]["test_acc"] >= 0.85           # 15 epochs reach >= 0.95; 3 epochs reach ~0.9
    assert f"final test accuracy: {100 * metrics[-1]['test_acc']:.2f}%" in res.stdout
    assert metrics[0]["lr"] == pytest.approx(1e-3) and metrics[1]["lr"] < metrics[0]["lr"]
    for name in ("config.yaml", "data.json", "curves.png", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())
    data = json.loads((run / "data.json").read_text())
    assert (data["train_size"], data["test_size"]) == (1437, 360) and data["split_seed"] == 0
    ckpt = load_checkpoint(run / "last.pt")   # weights_only=True
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config"):
        assert key in ckpt
    assert ckpt["epoch"] == 3 and ckpt["config"]["dataset"] == "digits" and isinstance(ckpt["config"], dict)
    best = load_checkpoint(run / "best.pt")
    assert best["history"][-1]["test_acc"] == max(m["test_acc"] for m in metrics)
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


def sigterm_at(step):
    """An ``on_call`` for :func:`_criterion_with` that sends this process SIGTERM at training step ``step``."""
    def on_call(k, loss):
        if k == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    return on_call


def _criterion_with(monkeypatch, on_call):
    """Wrap the training criterion: ``on_call(k, loss)`` sees the k-th training call (1-based)."""
    build = train_mod.build_criterion
    calls = {"n": 0}

    def wrapped_build(cfg):
        crit = build(cfg)

        def criterion(out, y):
            loss = crit(out, y)
            if torch.is_grad_enabled():      # training steps only, not the test-set loss
                calls["n"] += 1
                loss = on_call(calls["n"], loss)
            return loss
        return criterion
    monkeypatch.setattr(train_mod, "build_criterion", wrapped_build)


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(tmp_path, monkeypatch):
    args = QUICK + ["--epochs", "2", "--seed", "7"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0

    _criterion_with(monkeypatch, sigterm_at(6))   # 4 steps per epoch: step 6 is the middle of epoch 2
    part = tmp_path / "part"
    assert main(args + ["--out", str(part)]) == 0
    ckpt = load_checkpoint(part / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)          # stopped after finishing step 6
    assert len(read_metrics(part)) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    monkeypatch.undo()
    assert main(["--resume", str(part), "--lr", "0.5"]) == 2     # contradicts the saved config
    assert main(["--resume", str(part), "--seed", "7", "--lr", "1e-3", "--device", "cpu"]) == 0   # agreeing or location flags
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(part / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for s in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][s]["exp_avg"], b["optimizer"]["state"][s]["exp_avg"])
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(part))

    assert main(["--resume", str(part), "--epochs", "3"]) == 0   # --epochs may extend the run
    metrics = read_metrics(part)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    # the extension continues on the cosine of the longer run: lr(epoch 3) = lr0 (1 + cos(2 pi / 3)) / 2
    assert metrics[2]["lr"] == pytest.approx(1e-3 * (1 + math.cos(2 * math.pi / 3)) / 2, rel=1e-9)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _criterion_with(monkeypatch, lambda k, loss: loss * float("nan") if k == 6 else loss)
    out = tmp_path / "run"
    assert main(QUICK + ["--epochs", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "epoch 2, step 2" in err and "last.pt" in err
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["step"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len(read_metrics(out)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_runs(tmp_path, amp):
    out = tmp_path / amp
    # 2 steps of 32: float16 convolutions are slow on a CPU
    assert main(["--limit-train", "64", "--limit-test", "32", "--batch-size", "32", "--epochs", "1", "--amp", amp,
                 "--out", str(out)]) == 0
    m = read_metrics(out)[0]
    assert torch.isfinite(torch.tensor(m["train_loss"])) and 0 <= m["train_acc"] <= 1
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["config"]["amp"] == amp
    assert ("scale" in ckpt["scaler"]) == (amp == "fp16")   # only fp16 uses a gradient scaler
