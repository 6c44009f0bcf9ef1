"""Runs that survive interruptions, in one process: the training data as global batches (the same
union of samples and augmentations for any number of ranks), checkpoint_every, --resume auto,
unreadable checkpoints and failed writes."""
import errno
import json
import os

import pytest
import torch

import tetsnn.engine.checkpoint as ckpt_mod
from tetsnn.engine.checkpoint import load_checkpoint
from tetsnn.engine.config import resolve
from tetsnn.data import BatchLoader
from tetsnn.engine.data import build_data
from tetsnn.data.draws import SampleRandom
from tetsnn.engine.evaluate import main as evaluate_main
from tetsnn.engine.train import main

from conftest import QUICK
from test_train import _criterion_with, read_metrics


def _lowbias32(x):
    """The 32-bit mixer with Python integers (the slow, obvious reference)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_sample_random_matches_reference_and_ignores_batch_position():
    import numpy as np

    idx = torch.tensor([0, 1, 7, 123456, 2**31 + 5, 99])
    r = SampleRandom(3, 2, idx)
    bits = [r.bits("cpu") for _ in range(3)]
    for d in range(3):
        k0, k1 = (int(k) for k in np.random.SeedSequence([3, 2, d]).generate_state(2))
        ref = [_lowbias32((_lowbias32(i ^ k0) + k1) & 0xFFFFFFFF) for i in idx.tolist()]
        assert bits[d].tolist() == ref
    # a sample's draws do not depend on the batch it is in, nor on its position there
    other = SampleRandom(3, 2, idx.flip(0))
    assert torch.equal(other.randint(-5, 6, "cpu"), SampleRandom(3, 2, idx).randint(-5, 6, "cpu").flip(0))
    # uniform enough: every value of randint(0, 9) about equally often, rand in [0, 1) with mean 1/2
    many = SampleRandom(0, 1, torch.arange(90000))
    counts = torch.bincount(many.randint(0, 9, "cpu"), minlength=9)
    assert counts.min() > 9400 and counts.max() < 10600
    u = many.rand("cpu")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def _batches(data):
    """Each step's (indices, inputs, labels) of a loader, for the loader's current epoch."""
    idx = [i for _, i in data.train.batches()]
    return [(i, x, y) for i, (x, y) in zip(idx, data.train)]


@pytest.mark.parametrize("epoch", [1, 2])
def test_union_of_rank_batches_is_the_single_process_batch(epoch):
    """100 samples, global batch 12: 8 full batches and a last one of 4, split 2/2 on 2 ranks and
    1/1/2 on 3. Step by step, the ranks' samples and augmented inputs together are the single-process
    batch, and the epoch covers every sample once (no padding)."""
    cfg = resolve({"limit_train": 100, "limit_test": 10, "batch_size": 12})
    runs = {}
    for k in (1, 2, 3):
        ranks = [build_data(cfg, "cpu", rank=r, world_size=k) for r in range(k)]
        for d in ranks:
            d.train.set_epoch(epoch)
        runs[k] = [_batches(d) for d in ranks]
    single = runs[1][0]
    assert len(single) == 9 and sorted(torch.cat([i for i, _, _ in single]).tolist()) == list(range(100))
    for k in (2, 3):
        assert all(len(r) == 9 for r in runs[k])
        for step, (i1, x1, y1) in enumerate(single):
            parts = [r[step] for r in runs[k]]
            assert all(len(i) >= 1 for i, _, _ in parts)                       # no rank is empty
            i = torch.cat([p[0] for p in parts])
            assert torch.equal(i, i1)                                          # contiguous slices
            assert torch.equal(torch.cat([p[1] for p in parts]), x1) and torch.equal(torch.cat([p[2] for p in parts]), y1)
    # the augmentation does something, and differs from epoch to epoch
    plain = build_data(cfg).train.fetch(single[0][0], None)[0]
    assert not torch.equal(plain, single[0][1])
    # a resumed epoch starts at the exact global step
    d = build_data(cfg, "cpu", rank=1, world_size=2)
    d.train.set_epoch(epoch, start=5)
    tail = _batches(d)
    assert len(tail) == 4 and torch.equal(tail[0][1], runs[2][1][5][1])


def test_last_batch_smaller_than_the_process_count_is_dropped():
    fetch = lambda idx, draws: idx
    # 25 samples, global batch 12: the last batch holds 1 sample, fewer than 3 ranks
    three = [BatchLoader(25, 4, fetch, train=True, rank=r, world_size=3) for r in range(3)]
    assert [len(ld) for ld in three] == [2, 2, 2]
    assert sorted(torch.cat([i for ld in three for i in ld]).tolist()) == sorted(
        torch.cat(list(BatchLoader(25, 12, fetch, train=True)))[:24].tolist())
    assert len(BatchLoader(25, 12, fetch, train=True)) == 3      # one process keeps it
    assert len(BatchLoader(26, 6, fetch, train=True, world_size=2)) == 3  # 2 samples for 2 ranks: kept


@pytest.mark.slow
def test_checkpoint_every_and_a_hard_kill_resume_bit_identical(tmp_path, monkeypatch):
    """last.pt every 3 steps (4 steps per epoch): after a crash at step 8 the run continues from
    step 6 (epoch 2, step 2), drops the stale temporary file and metrics row a killed process
    left, and ends with the weights and metrics of an uninterrupted run."""
    args = QUICK + ["--epochs", "2", "--seed", "7"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0

    def crash_at_8(k, loss):
        if k == 8:
            raise RuntimeError("simulated crash")
        return loss
    _criterion_with(monkeypatch, crash_at_8)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args + ["--out", str(out), "--checkpoint-every", "3"])
    monkeypatch.undo()
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["run_steps"]) == (1, 2, 6)
    (out / "last.tmp99999.pt").write_bytes(b"half a checkpoint")
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "stale": True}) + "\n")

    assert main(args + ["--out", str(out), "--resume", "auto", "--checkpoint-every", "0"]) == 0
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(out / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(read_metrics(out)) == strip(read_metrics(tmp_path / "full"))
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_resume_auto_on_empty_and_finished_run_directories(tmp_path, capsys):
    assert main(QUICK + ["--resume", "auto"]) == 2
    assert "--resume auto needs --out" in capsys.readouterr().err
    out = tmp_path / "run"
    out.mkdir()                                           # empty: a new run starts there
    args = QUICK + ["--epochs", "1", "--out", str(out), "--resume", "auto"]
    assert main(args) == 0
    assert "training digits_snn" in capsys.readouterr().out
    before = (out / "last.pt").read_bytes()
    assert main(args) == 0                                # finished: its summary, nothing written
    text = capsys.readouterr().out
    assert "holds a finished run (1 epochs)" in text and "final test accuracy" in text
    assert (out / "last.pt").read_bytes() == before
    assert main(args + ["--lr", "0.5"]) == 2              # contradicts the saved config
    assert "--lr 0.5 contradicts" in capsys.readouterr().err


class Foreign:
    """An object a checkpoint written by something else may hold (loading it would run code)."""


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights_only" not in err
    return err


def test_unreadable_checkpoints_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(QUICK + ["--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    good = (out / "last.pt").read_bytes()
    cases = {"truncated.pt": good[: len(good) // 2], "text.pt": b"not a checkpoint\n"}
    torch.save({"model": Foreign()}, tmp_path / "foreign.pt")
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    expect = {"truncated.pt": "not a PyTorch checkpoint file", "text.pt": "not a PyTorch checkpoint file",
              "foreign.pt": "not a tetsnn checkpoint: it holds Python objects"}
    for name, what in expect.items():
        path = tmp_path / name
        assert evaluate_main(["--checkpoint", str(path)]) == 2
        assert f"cannot load checkpoint {path}: {what}" in _one_line_error(capsys)
    (out / "last.pt").write_bytes(cases["truncated.pt"])
    assert main(["--resume", str(out)]) == 2
    assert f"cannot load checkpoint {out / 'last.pt'}: not a PyTorch checkpoint file" in _one_line_error(capsys)


@pytest.mark.slow
def test_failed_write_keeps_the_previous_checkpoints(tmp_path, monkeypatch, capsys):
    """A disk that fills up half-way through a checkpoint: the run stops with an error naming the
    file; last.pt and best.pt keep the previous epoch's bytes and no temporary file is left."""
    out = tmp_path / "run"
    assert main(QUICK + ["--epochs", "1", "--out", str(out)]) == 0
    before = {n: (out / n).read_bytes() for n in ("last.pt", "best.pt", "metrics.jsonl")}

    def disk_full(state, f):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    capsys.readouterr()
    assert main(["--resume", str(out), "--epochs", "2"]) == 1
    err = _one_line_error(capsys)
    assert f"cannot write checkpoint {out / 'last.pt'}: no space left on the device" in err
    assert {n: (out / n).read_bytes() for n in before} == before
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_resume_with_memory_min_continues_bit_identically(tmp_path):
    """``memory`` may change on resume: a run whose second epoch runs with ``--memory min`` ends with the
    weights (and BatchNorm statistics) of a run that trained both epochs in the default mode."""
    args = ["--limit-train", "128", "--limit-test", "64", "--batch-size", "64", "--epochs", "2", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "run"
    assert main(args[:-4] + ["--epochs", "1", "--seed", "3", "--out", str(out)]) == 0
    assert main(["--resume", str(out), "--epochs", "2", "--memory", "min"]) == 0
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(out / "last.pt")
    assert b["config"]["memory"] == "min" and a["config"]["memory"] == "default"
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
