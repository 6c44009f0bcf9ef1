"""The spiking transformers through the training engine, as the CNNs go through it (test_train.py,
test_resume.py, test_transfer.py, test_ddp.py): train then ``tetsnn test``, --T-schedule with the
attention neurons running at each epoch's T, a SIGTERM in the middle of an epoch resumed bit for bit,
and training under torchrun with 2 gloo processes. The models are the smallest the architectures allow,
on the 8x8 digits (``model_kw`` sets their size)."""
import json

import pytest
import torch

import tetsnn
import tetsnn.engine.train as train_mod
from tetsnn.engine.checkpoint import load_checkpoint
from tetsnn.engine.evaluate import main as evaluate_main
from tetsnn.engine.train import main

from test_ddp import Torchrun
from test_train import _criterion_with, read_metrics, sigterm_at

# model_kw of each model at its smallest: 8x8 grey digits, 16 channels, 2 heads
TINY = {
    "spikformer": "{img_size: 8, in_channels: 1, patch_size: 2, embed_dim: 16, heads: 2, depth: 1}",
    "qkformer": "{img_size: 8, in_channels: 1, layout: cifar, embed_dim: 16, heads: 2, depth: 3}",
    "spike_driven_transformer": "{img_size: 8, in_channels: 1, pooling: '0011', embed_dim: 16, heads: 2, depth: 1}",
}
# 3 optimizer steps per epoch; 65 test samples (under DDP: 2 evaluation batches on rank 0, 1 on rank 1)
DATA = ["--limit-train", "96", "--limit-test", "65", "--batch-size", "32", "--seed", "5"]


def args_of(name):
    return ["--model", name, "--model-kw", TINY[name]] + DATA


def strip(rows):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in rows]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


@pytest.mark.parametrize("name", list(TINY))
def test_train_then_test(tmp_path, monkeypatch, capsys, name):
    """A run of each transformer: its checkpoint loads into the model create_model builds, its weights
    moved, and ``tetsnn test`` reproduces the run's own evaluation (at any evaluation batch size)."""
    initial = {}
    build = train_mod.build_model

    def keep_initial(cfg):
        model = build(cfg)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model
    monkeypatch.setattr(train_mod, "build_model", keep_initial)
    out = tmp_path / "run"
    assert main(args_of(name) + ["--epochs", "1", "--T", "2", "--out", str(out)]) == 0
    assert f"training {name} on digits" in capsys.readouterr().out
    m = read_metrics(out)[0]
    assert torch.isfinite(torch.tensor(m["train_loss"])) and 0 <= m["train_acc"] <= 1
    ckpt = load_checkpoint(out / "last.pt")
    cfg = ckpt["config"]
    assert (cfg["model"], cfg["T"]) == (name, 2) and cfg["model_kw"]["embed_dim"] == 16
    fresh = tetsnn.create_model(name, 10, T=2, **cfg["model_kw"])
    fresh.load_state_dict(ckpt["model"], strict=True)
    moved = [k for k, p in fresh.named_parameters() if not torch.equal(p, initial[k])]
    assert len(moved) > len(initial) // 4 and "head.weight" in moved
    for batch in ([], ["--batch-size", "16"]):
        assert evaluate_main(["--checkpoint", str(out / "last.pt"), "--json", *batch]) == 0
        report = json.loads(capsys.readouterr().out)
        assert len(report["per_step_top1"]) == 2 and report["per_step_top1"][-1] == report["top1"]
        assert report["top1"] == pytest.approx(m["test_acc"], abs=1e-12)


def _record_T(monkeypatch, seen):
    """Every training forward of a built model appends (T of the logits, T each attention neuron ran at)."""
    build = train_mod.build_model

    def recording(cfg):
        model = build(cfg)
        neurons = [m for n, m in model.named_modules() if n.endswith("attn_act")]
        assert neurons, "no attention neuron found"
        steps = []
        for neuron in neurons:
            neuron.register_forward_hook(lambda mod, inp, out: steps.append((inp[0].shape[1], out.shape[1])))
        model.register_forward_pre_hook(lambda mod, inp: steps.clear())
        model.register_forward_hook(lambda mod, inp, out: seen.append((out.shape[1], sorted(set(steps))))
                                    if torch.is_grad_enabled() else None)
        return model
    monkeypatch.setattr(train_mod, "build_model", recording)


@pytest.mark.parametrize("name", ["spikformer", "qkformer"])
def test_T_schedule_and_sigterm_resume_are_bit_identical(tmp_path, monkeypatch, name):
    """--T-schedule 1:1,2 on 2 epochs: epoch 1 runs the model (its attention neurons included) at T=1,
    epoch 2 at T=2. A run stopped by SIGTERM in the middle of epoch 2 and resumed ends with the weights,
    optimizer state and metrics of the uninterrupted run."""
    args = args_of(name) + ["--epochs", "2", "--T-schedule", "1:1,2"]
    seen = []
    _record_T(monkeypatch, seen)
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    assert seen == [(1, [(1, 1)])] * 3 + [(2, [(2, 2)])] * 3          # 3 training steps per epoch
    assert [m["T"] for m in read_metrics(tmp_path / "full")] == [1, 2]

    _criterion_with(monkeypatch, sigterm_at(5))   # epoch 2, step 2
    part = tmp_path / "part"
    assert main(args + ["--out", str(part)]) == 0
    ckpt = load_checkpoint(part / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2) and len(read_metrics(part)) == 1
    monkeypatch.undo()

    seen.clear()
    _record_T(monkeypatch, seen)
    assert main(["--resume", str(part)]) == 0
    assert seen == [(2, [(2, 2)])]                                     # the last step of epoch 2, at T=2
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(part / "last.pt")
    assert_same_weights(a["model"], b["model"])
    for s in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][s]["exp_avg_sq"], b["optimizer"]["state"][s]["exp_avg_sq"])
    assert strip(read_metrics(tmp_path / "full")) == strip(read_metrics(part))


def torchrun(tmp_path, args, name):
    """A torchrun job of 2 processes (test_ddp's runner) that must succeed; its stdout."""
    job = Torchrun(tmp_path, args, name=name)
    assert job.finish() == 0, f"{name}: {job.stderr()[-3000:]}"
    return job.stdout()


@pytest.mark.slow   # three torchrun jobs of two processes each
def test_ddp_with_T_schedule_and_resume_across_runs(tmp_path, capsys):
    """Spikformer on 2 gloo processes with --T-schedule 1:1,2: a run of 2 epochs equals, bit for bit, a
    run of 1 epoch extended to 2 by a second torchrun job with --resume; the DDP evaluation (uneven
    shares of the 65 test samples) agrees with a one-process ``tetsnn test``."""
    args = args_of("spikformer") + ["--T-schedule", "1:1,2"]
    assert "2 process(es)" in torchrun(tmp_path, args + ["--epochs", "2", "--out", tmp_path / "ref"], "ref")
    rows = read_metrics(tmp_path / "ref")
    assert [(m["epoch"], m["T"], m["world_size"]) for m in rows] == [(1, 1, 2), (2, 2, 2)]

    run = tmp_path / "run"
    torchrun(tmp_path, args + ["--epochs", "1", "--out", run], "first")
    assert "resuming" in torchrun(tmp_path, ["--resume", run, "--epochs", "2"], "resumed")
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(run / "last.pt")
    assert (a["epoch"], b["epoch"], b["world_size"]) == (2, 2, 2)
    assert_same_weights(a["model"], b["model"])
    assert strip(read_metrics(run)) == strip(rows)
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]

    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(run / "last.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(rows[-1]["test_acc"], abs=1e-12)
