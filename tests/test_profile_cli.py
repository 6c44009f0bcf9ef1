"""tetsnn profile and tetsnn export on a checkpoint written by a very short tetsnn train run."""
import json

import nir
import pytest
import torch

import tetsnn
from tetsnn.analysis import profile
from tetsnn.engine.checkpoint import load_checkpoint
from tetsnn.cli import main
from tetsnn.engine.config import resolve
from tetsnn.engine.data import build_data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "1", "--limit-train", "64", "--limit-test", "48", "--batch-size", "32",
                 "--out", str(out)]) == 0
    return out / "best.pt"


def test_profile_json_matches_the_library(checkpoint, capsys):
    assert main(["profile", "--checkpoint", str(checkpoint), "--batches", "1", "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ckpt = load_checkpoint(checkpoint)
    model = tetsnn.create_model("digits_snn", T=4)
    model.load_state_dict(ckpt["model"])
    x, _ = next(iter(build_data(resolve(ckpt["config"]), train=False).test))
    expected = profile(model, x)
    assert res["samples"] == 32 and res["T"] == 4
    for key in ("synops", "synops_per_sample", "macs_snn", "macs_ann", "energy_snn_pj", "energy_ann_pj"):
        assert res[key] == pytest.approx(expected[key]), key
    assert res["firing_rates"] == pytest.approx(expected["firing_rates"])
    assert res["firing_rates"]["features.0.act"] > 0


def test_profile_table_and_plot(checkpoint, tmp_path, capsys):
    png = tmp_path / "profile.png"
    assert main(["profile", "--checkpoint", str(checkpoint), "--batches", "2", "--device", "cpu",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "features.1.fwd.module.0" in out and "SOPs per sample" in out and "samples 48" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.png"]


def test_export_nir(checkpoint, tmp_path, capsys):
    out = tmp_path / "digits.nir"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "nir", "--out", str(out)]) == 0
    assert "14 nodes" in capsys.readouterr().out
    graph = nir.read(str(out))
    assert graph.nodes["input"].input_type["input"].tolist() == [1, 8, 8]
    assert sum(isinstance(n, nir.LIF) for n in graph.nodes.values()) == 4


def test_cli_errors(checkpoint, tmp_path, capsys):
    assert main(["profile", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a.nir"),
                 "--input-shape", "1,8"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", "x"]) == 2
    capsys.readouterr()
    soft = load_checkpoint(checkpoint)   # the same run with a soft-reset model: NIR cannot express it
    soft["config"]["model_kw"] = {"reset": "soft"}
    torch.save(soft, tmp_path / "soft.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "soft.pt"), "--out", str(tmp_path / "b.nir")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tetsnn export: error:") and "soft reset" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soft.pt"]
