"""DVS128 Gesture through the training command: a byte-built DvsGesture root, one tiny epoch."""
import json

import pytest

from tetsnn.cli import main as tetsnn_main

from test_events_datasets import make_gesture_root


@pytest.mark.slow
def test_train_dvsgesture_preset_on_a_byte_built_root(tmp_path):
    root = make_gesture_root(tmp_path / "DvsGesture")
    out = tmp_path / "run"
    args = ["train", "--config", "dvsgesture_vggsnn", "--data-dir", str(root), "--cache-dir", str(tmp_path / "cache"),
            "--T", "2", "--epochs", "1", "--batch-size", "2", "--limit-train", "4", "--limit-test", "2",
            "--workers", "0", "--device", "cpu", "--out", str(out)]
    assert tetsnn_main(args) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["epoch"] == 1 and 0 <= metrics["test_acc"] <= 1
    data = json.loads((out / "data.json").read_text())
    assert (data["train_size"], data["test_size"]) == (4, 2)
    caches = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]   # not the cache's lock
    assert len(caches) == 1 and caches[0].name.startswith("dvs-gesture-")
    manifest = json.loads((caches[0] / "manifest.json").read_text())
    assert manifest["params"]["T"] == 2 and manifest["splits"]["train"]["shape"] == [4, 2, 2, 128, 128]
