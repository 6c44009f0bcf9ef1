"""ANN-to-SNN transfer (--init-from, --freeze) and time-step schedules (--T-schedule)."""
import json

import pytest
import torch

import tetsnn
import tetsnn.engine.train as train_mod
from tetsnn.engine.checkpoint import CheckpointError, load_checkpoint
from tetsnn.engine.train import main
from tetsnn.engine.config import T_at_epoch, parse_T_schedule
from tetsnn.engine.transfer import freeze, load_ann_weights

from conftest import QUICK


def test_parse_T_schedule():
    stages = parse_T_schedule("2:5,4:5,6")
    assert stages == [(2, 5), (4, 5), (6, None)]
    assert [T_at_epoch(stages, e) for e in range(1, 13)] == [2] * 5 + [4] * 5 + [6] * 2
    assert [T_at_epoch(parse_T_schedule("1:1,3:2"), e) for e in (1, 2, 3, 4)] == [1, 3, 3, 3]
    for bad in ("2:5,x", "2,4:5", "0:3", "2:0", "2:5:1", ""):
        with pytest.raises(ValueError, match="bad T schedule"):
            parse_T_schedule(bad)


def test_load_ann_weights_reports_and_refuses_shape_mismatch(tmp_path):
    torch.manual_seed(0)
    ann = tetsnn.create_model("digits_snn", neuron="relu")
    state = ann.state_dict()
    assert set(state) == set(tetsnn.create_model("digits_snn").state_dict())   # same keys as the SNN
    state["extra.weight"] = torch.zeros(3)
    dropped = state.pop("fc2.module.bias")
    torch.save({"model": state}, tmp_path / "ann.pt")
    snn = tetsnn.create_model("digits_snn")
    bias_before = snn.fc2.module.bias.detach().clone()
    rep = load_ann_weights(snn, tmp_path / "ann.pt")
    assert rep["missing"] == ["fc2.module.bias"] and rep["unexpected"] == ["extra.weight"]
    assert torch.equal(snn.fc1.module[1].weight, state["fc1.module.1.weight"])
    assert torch.equal(snn.fc2.module.bias, bias_before) and not torch.equal(bias_before, dropped)
    torch.save(tetsnn.create_model("digits_snn", num_classes=5, neuron="relu").state_dict(), tmp_path / "c5.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch for fc2.module.weight: checkpoint \(5, 128\) vs model \(10, 128\)"):
        load_ann_weights(tetsnn.create_model("digits_snn"), tmp_path / "c5.pt")


def test_freeze_patterns():
    m = tetsnn.create_model("digits_snn")
    names = freeze(m, "features.0.*, fc2.*")
    assert names == sorted(n for n, _ in m.named_parameters() if n.startswith(("features.0.", "fc2.")))
    assert all(p.requires_grad == (n not in names) for n, p in m.named_parameters())
    with pytest.raises(ValueError, match="freeze pattern 'conv9.*' matches no parameter"):
        freeze(m, "conv9.*")


@pytest.mark.slow
def test_init_from_and_freeze_in_a_run(tmp_path, capsys):
    ann_run = tmp_path / "ann"
    assert main(QUICK + ["--epochs", "1", "--T", "1", "--model-kw", "{neuron: relu}", "--out", str(ann_run)]) == 0
    ann = load_checkpoint(ann_run / "last.pt")["model"]
    capsys.readouterr()
    out = tmp_path / "snn"
    assert main(QUICK + ["--epochs", "1", "--init-from", str(ann_run / "last.pt"), "--freeze", "features.0.*",
                         "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "missing keys (left as initialised): none" in text and "unexpected keys (not used): none" in text
    assert "4 parameter tensors frozen" in text            # conv and BatchNorm weight + bias of the first Layer
    snn = load_checkpoint(out / "last.pt")["model"]
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.equal(snn[f"features.0.fwd.module.{k}"], ann[f"features.0.fwd.module.{k}"]), k
    assert not torch.equal(snn["fc2.module.weight"], ann["fc2.module.weight"])   # trained on
    assert main(QUICK + ["--epochs", "1", "--freeze", "nothing.*", "--out", str(tmp_path / "x")]) == 2
    assert "matches no parameter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_T_schedule_switches_at_the_right_epochs(tmp_path, monkeypatch, capsys):
    seen = []
    build = train_mod.build_criterion

    def recording(cfg):
        crit = build(cfg)

        def criterion(out, y):
            if torch.is_grad_enabled():
                seen.append(out.shape[1])
            return crit(out, y)
        return criterion
    monkeypatch.setattr(train_mod, "build_criterion", recording)
    out = tmp_path / "run"
    assert main(QUICK + ["--epochs", "4", "--T-schedule", "1:1,2:2,3", "--out", str(out)]) == 0
    assert seen == [1] * 4 + [2] * 8 + [3] * 4                # 4 training steps per epoch
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["T"] for m in metrics] == [1, 2, 2, 3]
    assert load_checkpoint(out / "last.pt")["config"]["T"] == 3
    capsys.readouterr()
    assert main(QUICK + ["--T", "2", "--T-schedule", "1:1,2", "--out", str(tmp_path / "y")]) == 2
    assert "not both" in capsys.readouterr().err
