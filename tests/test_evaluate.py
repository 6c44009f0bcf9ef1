"""Evaluation against a per-sample, per-step reference, and the ``tetsnn test`` command."""
import json

import pytest
import torch
from torch import nn

from tetsnn.data import BatchLoader
from tetsnn.engine.evaluate import evaluate

from tetsnn.cli import main as cli_main
from tetsnn.engine.train import main as train_main

from conftest import QUICK


class Passthrough(nn.Module):
    """A 'model' whose logits are its input, so the test controls them exactly."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x


def reference(logits, y):
    """Slow and obvious: per sample, per t, the argmax of the mean of the first t steps."""
    n, T, C = logits.shape
    per_step = []
    for t in range(1, T + 1):
        per_step.append(sum(int(logits[i, :t].mean(0).argmax() == y[i]) for i in range(n)) / n)
    top5 = sum(int(y[i] in logits[i].mean(0).topk(5).indices.tolist()) for i in range(n)) / n
    return per_step, top5


@pytest.mark.parametrize("world", [1, 3])
def test_evaluate_matches_reference(world):
    g = torch.Generator().manual_seed(0)
    n, T, C = 53, 6, 12
    logits = torch.randn(n, T, C, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    per_step, top5 = reference(logits, y)
    # the ranks' shares together count every sample exactly once
    totals = {"count": 0, "per_step": torch.zeros(T, dtype=torch.float64), "top5": 0.0, "loss": 0.0}
    for rank in range(world):
        loader = BatchLoader(n, 8, lambda idx, gen: (logits[idx], y[idx]), train=False, rank=rank, world_size=world)
        res = evaluate(Passthrough(), loader, criterion=lambda out, t: nn.functional.cross_entropy(out.mean(1), t))
        totals["count"] += res["count"]
        totals["per_step"] += torch.tensor(res["per_step_top1"], dtype=torch.float64) * res["count"]
        totals["top5"] += res["top5"] * res["count"]
        totals["loss"] += res["loss"] * res["count"]
    assert totals["count"] == n
    assert (totals["per_step"] / n).tolist() == pytest.approx(per_step, abs=1e-12)
    assert totals["top5"] / n == pytest.approx(top5, abs=1e-12)
    assert totals["loss"] / n == pytest.approx(nn.functional.cross_entropy(logits.mean(1), y).item(), rel=1e-5)


@pytest.mark.slow
def test_cli_test_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(QUICK + ["--epochs", "1", "--T", "3", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert cli_main(["test", "--checkpoint", str(out / "last.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"top1", "top5", "per_step_top1"}
    assert len(report["per_step_top1"]) == 3 and report["per_step_top1"][-1] == report["top1"]
    assert all(0 <= a <= 1 for a in report["per_step_top1"]) and report["top1"] <= report["top5"] <= 1
    assert report["top1"] == pytest.approx(metrics["test_acc"], abs=1e-12)   # the run's own evaluation
    assert cli_main(["test", "--checkpoint", str(out / "last.pt")]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "t=3" in text
    assert cli_main(["test", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "nope.pt" in err and len(err.strip().splitlines()) == 1
    ckpt = torch.load(out / "last.pt", weights_only=True)      # weights of another shape: one line too
    ckpt["config"]["num_classes"] = 5
    torch.save(ckpt, tmp_path / "other.pt")
    assert cli_main(["test", "--checkpoint", str(tmp_path / "other.pt")]) == 2
    err = capsys.readouterr().err
    assert "other.pt" in err and "do not fit" in err and len(err.strip().splitlines()) == 1
