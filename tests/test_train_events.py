"""The event-data branch of the engine on a tiny CIFAR10-DVS root written byte by byte."""
import json

import pytest
import torch

from tetsnn.engine.config import load_config, resolve
from tetsnn.engine.data import build_data
from tetsnn.data.events import batch_transform, load_frames
from tetsnn.engine.train import main

from test_events_datasets import make_cifar_root


@pytest.fixture(scope="module")
def dvs_root(tmp_path_factory):
    return make_cifar_root(tmp_path_factory.mktemp("cifar10dvs"))


def test_event_batches(dvs_root, tmp_path):
    cfg = resolve({**load_config("cifar10dvs_vggsnn"), "data_dir": str(dvs_root), "cache_dir": str(tmp_path),
                   "T": 3, "batch_size": 8})
    data = build_data(cfg)
    assert (data.info["train_used"], data.info["test_used"], data.num_classes) == (90, 10, 10)
    x, y = next(iter(data.test))
    assert x.shape == (8, 3, 2, 48, 48) and x.dtype == torch.float32 and y.dtype == torch.int64
    # evaluation batches are the cached frames, pooled and scaled, without augmentation
    frames, labels = load_frames("cifar10-dvs", dvs_root, train=False, T=3, cache_dir=str(tmp_path))
    assert torch.equal(x, batch_transform(torch.from_numpy(frames[:8].astype("int64")), size=48, norm="max"))
    assert torch.equal(y, torch.from_numpy(labels[:8]))
    data.train.set_epoch(1)
    a = [b for b in data.train]
    data.train.set_epoch(1, start=2)
    b = [b for b in data.train]
    assert torch.equal(a[2][0], b[0][0]) and torch.equal(a[-1][1], b[-1][1])   # resumable augmentation


def test_train_vggsnn_on_events(dvs_root, tmp_path):
    out = tmp_path / "run"
    args = ["--config", "cifar10dvs_vggsnn", "--data-dir", str(dvs_root), "--cache-dir", str(tmp_path / "c"),
            "--T", "1", "--epochs", "1", "--batch-size", "4", "--limit-train", "4", "--limit-test", "4", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "metrics.jsonl").read_text())
    assert m["epoch"] == 1 and 0 <= m["test_acc"] <= 1
