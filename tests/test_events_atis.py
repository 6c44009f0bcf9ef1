"""The ATIS .bin reader, .npy recordings, N-MNIST, N-Caltech101, EventFolder and caches stored as
cell sums, on roots written byte by byte."""
import json
import struct

import numpy as np
import pytest
import torch

import tetsnn.data
from tetsnn.engine.config import ConfigError, load_config, resolve
from tetsnn.engine.data import build_data
from tetsnn.data.events import (EVENT_DTYPE, EventFolder, NCaltech101, NMNIST, batch_transform, cell_sums,
                                load_frames, read_atis_bin, read_npy)
from tetsnn.data.events.frames import can_reduce, pool_cells
from tetsnn.data.loader import EventFrames
from tetsnn.engine.preprocess_cli import main as preprocess_main
from tetsnn.engine.train import main as train_main

MARKER = None   # an overflow marker in an event list


def atis_record(x, y, p, t):
    """One 5-byte ATIS record, packed bit by bit: x, y, then p in bit 7 above a 23-bit timestamp."""
    assert 0 <= t < 2**23
    return struct.pack(">BBBBB", x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF)


def atis_bytes(events):
    """events: (x, y, p, t) tuples or MARKER (a record with y = 240 and arbitrary other bytes)."""
    return b"".join(atis_record(17, 240, 1, 12345) if e is MARKER else atis_record(*e) for e in events)


def decode_per_record(data):
    """The datasets' own rule, one record at a time: a y of 240 adds 2**13 to every later time."""
    out, offset = [], 0
    for i in range(0, len(data), 5):
        x, y, b2, b3, b4 = data[i:i + 5]
        if y == 240:
            offset += 2**13
            continue
        out.append((((b2 & 0x7F) << 16 | b3 << 8 | b4) + offset, x, y, b2 >> 7))
    return out


def as_tuples(events):
    return [tuple(int(v) for v in e) for e in events[["t", "x", "y", "p"]]]


def reference_counts(events, T, sensor):
    """[T, 2, H, W] counts of (x, y, p, t) events, split by count, one event at a time."""
    out = np.zeros((T, 2, *sensor), dtype=np.int64)
    n = len(events)
    for i, (x, y, p, _) in enumerate(events):
        out[max(j for j in range(T) if j * n // T <= i), p, y, x] += 1
    return out


# --- the ATIS reader ------------------------------------------------------------------------------

def test_atis_fields_and_overflow_markers(tmp_path):
    events = [(0, 0, 1, 5), (33, 20, 0, 2**23 - 1), MARKER, (239, 179, 1, 3), MARKER, MARKER, (7, 8, 0, 0)]
    path = tmp_path / "r.bin"
    path.write_bytes(atis_bytes(events))
    out = read_atis_bin(path)
    assert out.dtype == EVENT_DTYPE
    assert as_tuples(out) == [(5, 0, 0, 1), (2**23 - 1, 33, 20, 0), (3 + 2**13, 239, 179, 1), (3 * 2**13, 7, 8, 0)]


def test_atis_matches_per_record_decoder_on_random_bytes(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (400, 5), dtype=np.uint8)
    data[rng.random(400) < 0.05, 1] = 240                              # about 20 markers
    path = tmp_path / "random.bin"
    path.write_bytes(data.tobytes())
    assert as_tuples(read_atis_bin(path)) == decode_per_record(data.tobytes())


@pytest.mark.parametrize("data, message", [
    (atis_bytes([(1, 2, 1, 3), (4, 5, 0, 6)])[:-2], "8 bytes is not a multiple of the 5-byte ATIS record"),
    (b"", "empty recording"),
    (atis_bytes([MARKER, MARKER]), "empty recording"),
])
def test_atis_bad_input_names_the_file(tmp_path, data, message):
    path = tmp_path / "image_0001.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as info:
        read_atis_bin(path)
    assert "image_0001.bin" in str(info.value)


def test_npy_reader_takes_tonic_layout_and_refuses_what_does_not_fit(tmp_path):
    tonic = np.zeros(3, dtype=[("x", "<i8"), ("y", "<i8"), ("t", "<i8"), ("p", "?")])   # tonic's field order
    tonic["x"], tonic["y"], tonic["t"], tonic["p"] = [1, 2, 3], [4, 5, 6], [10, 20, 2**40], [True, False, True]
    np.save(tmp_path / "a.npy", tonic)
    assert as_tuples(read_npy(tmp_path / "a.npy")) == [(10, 1, 4, 1), (20, 2, 5, 0), (2**40, 3, 6, 1)]
    bad = tonic.copy()
    bad["x"][1] = 2**16                                                # would wrap around in int16
    np.save(tmp_path / "wide.npy", bad)
    np.save(tmp_path / "plain.npy", np.zeros((3, 4)))
    np.save(tmp_path / "empty.npy", tonic[:0])
    for name, message in [("wide", r"field 'x' spans \[1, 65536\]"), ("plain", "fields t, x, y, p"),
                          ("empty", "empty recording")]:
        with pytest.raises(ValueError, match=message) as info:
            read_npy(tmp_path / f"{name}.npy")
        assert f"{name}.npy" in str(info.value)


# --- cell sums: the reduced cache gives the same model input --------------------------------------

@pytest.mark.parametrize("sensor, size", [((180, 240), 48), ((35, 37), 6), ((34, 34), 17), ((20, 30), 7)])
def test_cell_sums_give_the_pooled_batches_exactly(sensor, size):
    rng = np.random.default_rng(sum(sensor) + size)
    counts = rng.poisson(0.7, (3, 4, 2, *sensor)).astype(np.uint16)
    counts[0, 1, 0, :4, :9] = 65535                                     # the largest counts a cache holds
    counts[1, 2] = 0                                                    # an empty frame stays 0
    assert can_reduce(sensor, size)
    sums = cell_sums(counts, size)
    assert sums.dtype == np.uint32 and sums.shape == (3, 4, 2, size, size)
    (r0, r1), (c0, c1) = pool_cells(sensor[0], size), pool_cells(sensor[1], size)
    assert sums[0, 1, 0, 1, 2] == counts[0, 1, 0, r0[1]:r1[1], c0[2]:c1[2]].sum()   # a plain cell sum
    full, reduced = torch.from_numpy(counts.astype(np.int64)), torch.from_numpy(sums.astype(np.int64))
    for norm in ("max", None):
        assert torch.equal(batch_transform(full, size, norm), batch_transform(reduced, size, norm, sensor_size=sensor))
    a, b = (torch.Generator().manual_seed(5) for _ in range(2))
    assert torch.equal(batch_transform(full, size, flip=True, roll=2, generator=a),
                       batch_transform(reduced, size, flip=True, roll=2, generator=b, sensor_size=sensor))


def test_when_a_cache_may_be_reduced():
    assert pool_cells(180, 48)[0][:3].tolist() == [0, 3, 7] and pool_cells(180, 48)[1][:3].tolist() == [4, 8, 12]
    assert not can_reduce((34, 34), 34) and not can_reduce((34, 34), 48)   # not below the sensor
    assert not can_reduce((180, 240), 1)                                   # torch pools to 1 x 1 as a mean
    assert not can_reduce((180, 240), 12) and can_reduce((180, 240), 16)   # cells over 256 pixels could be inexact


# --- N-MNIST --------------------------------------------------------------------------------------

def nmnist_events(split, digit, index, n=40):
    rng = np.random.default_rng([int(split == "Test"), digit, index])
    xs, ys, ps = rng.integers(0, 34, n), rng.integers(0, 34, n), rng.integers(0, 2, n)
    xs[1], ys[1], ps[1] = xs[0], ys[0], ps[0]                           # a repeated pixel
    return [(int(x), int(y), int(p), 1000 + 7 * k) for k, (x, y, p) in enumerate(zip(xs, ys, ps))]


def make_nmnist_root(root, files=2):
    for split in ("Train", "Test"):
        for digit in range(10):
            folder = root / split / str(digit)
            folder.mkdir(parents=True)
            for i in range(1, files + 1):
                (folder / f"{i:05d}.bin").write_bytes(atis_bytes(nmnist_events(split, digit, i)))
    (root / "Train" / "4" / "readme.txt").write_text("not a recording")
    (root / "Test" / "7" / ".DS_Store").write_bytes(b"hidden")
    return root


@pytest.fixture(scope="module")
def nmnist_root(tmp_path_factory):
    return make_nmnist_root(tmp_path_factory.mktemp("nmnist"))


def test_nmnist_items_labels_and_ignored_files(nmnist_root, tmp_path):
    train = NMNIST(nmnist_root, train=True, T=3, norm=None, cache_dir=tmp_path)
    test = NMNIST(nmnist_root, train=False, T=3, cache_dir=tmp_path)
    assert (len(train), len(test)) == (20, 20) and train.labels.tolist() == [d for d in range(10) for _ in range(2)]
    x, y = train[9]                                                     # digit 4, file 00002: raw counts at 34 x 34
    assert (x.shape, y) == ((3, 2, 34, 34), 4)
    np.testing.assert_array_equal(x.numpy(), reference_counts(nmnist_events("Train", 4, 2), 3, (34, 34)))
    assert x.max() >= 2
    x, _ = test[15]
    expected = batch_transform(torch.from_numpy(reference_counts(nmnist_events("Test", 7, 2), 3, (34, 34)))[None], 34)
    assert torch.equal(x, expected[0])
    manifest = json.loads((train.directory / "manifest.json").read_text())
    assert manifest["ignored"] == ["Train/4/readme.txt"] and train.ignored == ["Train/4/readme.txt"]
    assert manifest["splits"]["train"]["samples"][2]["file"] == "Train/1/00001.bin"
    assert manifest["splits"]["train"]["dtype"] == "uint16" and tetsnn.data.NMNIST is NMNIST


def test_bad_nmnist_roots(tmp_path):
    root = make_nmnist_root(tmp_path / "root", files=1)
    (root / "Test" / "3" / "00001.bin").unlink()
    with pytest.raises(ValueError, match=r"Test[/\\]3: no recordings named \*\.bin"):
        NMNIST(root, cache_dir=tmp_path / "cache")
    (root / "Test" / "3").rmdir()
    with pytest.raises(ValueError, match=r"Test: not an N-MNIST split root: missing class folder\(s\) 3 "):
        NMNIST(root, cache_dir=tmp_path / "cache")
    (root / "Train").rename(root / "train")
    with pytest.raises(ValueError, match="not an N-MNIST root: missing Train"):
        NMNIST(root, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --- N-Caltech101 ---------------------------------------------------------------------------------

CALTECH_CLASSES = {"accordion": 11, "BACKGROUND_Google": 3, "Faces_easy": 2, "water lilly": 6, "ü-class": 1}


def caltech_events(name, index, n=300):
    """Events over the whole 180 x 240 field, many on few pixels (large counts in uneven cells)."""
    rng = np.random.default_rng([len(name), ord(name[0]), index])
    xs = np.concatenate([rng.integers(0, 240, n), rng.integers(0, 8, n)])
    ys = np.concatenate([rng.integers(0, 180, n), rng.integers(170, 180, n)])
    ps = rng.integers(0, 2, 2 * n)
    return [(int(x), int(y), int(p), 50 * k) for k, (x, y, p) in enumerate(zip(xs, ys, ps))]


def make_caltech_root(root):
    for name, n in CALTECH_CLASSES.items():
        folder = root / "Caltech101" / name
        folder.mkdir(parents=True)
        for i in range(1, n + 1):
            events = caltech_events(name, i)
            (folder / f"image_{i:04d}.bin").write_bytes(atis_bytes(events[:5] + [MARKER] + events[5:]))
    (root / "Caltech101" / "accordion" / "image_0003.txt").write_text("stray")
    (root / "Caltech101_annotations" / "accordion").mkdir(parents=True)   # never read
    (root / "Caltech101_annotations" / "accordion" / "annotation_0001.mat").write_bytes(b"\x00" * 7)
    return root


@pytest.fixture(scope="module")
def caltech_root(tmp_path_factory):
    return make_caltech_root(tmp_path_factory.mktemp("ncaltech"))


def test_ncaltech101_split_labels_and_reduced_items(caltech_root, tmp_path):
    train = NCaltech101(caltech_root, train=True, T=2, cache_dir=tmp_path)
    test = NCaltech101(caltech_root, train=False, T=2, cache_dir=tmp_path)
    assert train.classes == ("BACKGROUND_Google", "Faces_easy", "accordion", "water lilly", "ü-class")
    assert (len(train), len(test)) == (21, 2)             # n = 3, 2, 11, 6, 1: train floor(0.9 n + 0.5)
    manifest = json.loads((train.directory / "manifest.json").read_text())
    files = [s["file"] for s in manifest["splits"]["test"]["samples"]]
    assert files == ["accordion/image_0011.bin", "water lilly/image_0006.bin"]          # natural order: 11 is last
    assert train.labels.tolist() == [0] * 3 + [1] * 2 + [2] * 10 + [3] * 5 + [4] and test.labels.tolist() == [2, 3]
    assert manifest["ignored"] == ["accordion/image_0003.txt"] and manifest["params"]["reduced_to"] == 48
    info = manifest["splits"]["train"]
    assert info["dtype"] == "uint32" and info["shape"] == [21, 2, 2, 48, 48]
    assert (train.directory / "train.u32").stat().st_size == 21 * 2 * 2 * 48 * 48 * 4
    # items equal the definition: the counts at sensor resolution, pooled, then max-scaled
    for dataset, index, (name, i) in ((train, 7, ("accordion", 3)), (test, 1, ("water lilly", 6))):
        x, _ = dataset[index]
        counts = reference_counts(caltech_events(name, i), 2, (180, 240))
        assert counts.max() >= 3
        assert torch.equal(x, batch_transform(torch.from_numpy(counts)[None], 48, "max")[0])


def test_ncaltech101_training_batches_equal_the_unreduced_path(caltech_root, tmp_path):
    frames, labels = load_frames("n-caltech101", caltech_root, train=True, T=2, cache_dir=tmp_path)
    assert frames.shape == (21, 2, 2, 48, 48) and frames.dtype == np.uint32
    directory = next(p for p in tmp_path.iterdir() if p.name.startswith("n-caltech101-"))
    samples = json.loads((directory / "manifest.json").read_text())["splits"]["train"]["samples"]
    counts = np.stack([reference_counts(caltech_events(s["file"].split("/")[0], int(s["file"][-8:-4])), 2, (180, 240))
                       for s in samples])
    fetch = EventFrames(frames, labels, "n-caltech101", "cpu")
    idx = torch.tensor([3, 0, 20, 7, 9, 16])
    x, y = fetch(idx, torch.Generator().manual_seed(11))
    expected = batch_transform(torch.from_numpy(counts[idx.numpy()]), 48, "max", flip=True, roll=5,
                               generator=torch.Generator().manual_seed(11))
    assert torch.equal(x, expected) and torch.equal(y, torch.from_numpy(labels[idx.numpy()]))


def test_ncaltech101_bad_recordings(tmp_path):
    root = make_caltech_root(tmp_path / "root")
    folder = root / "Caltech101" / "Faces_easy"
    cache = tmp_path / "cache"
    for data, message in [(atis_bytes([(240, 3, 1, 5)]), r"field 'x' spans \[240, 240\], outside \[0, 239\]"),
                          (atis_bytes([MARKER]), "empty recording"),
                          (atis_bytes([(1, 2, 1, 3)])[:-1], "not a multiple of the 5-byte"),
                          (b"", "empty recording")]:
        (folder / "image_0002.bin").write_bytes(data)
        with pytest.raises(ValueError, match=message) as info:
            NCaltech101(root, T=2, cache_dir=cache)
        assert "image_0002.bin" in str(info.value)
        assert not cache.exists() or [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        train = NCaltech101(root, T=2, cache_dir=cache, on_error="skip")
    assert len(train) == 20 and train.skipped[0]["file"] == "Faces_easy/image_0002.bin"
    for path in folder.iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="Faces_easy: no recordings named \\*\\.bin"):
        NCaltech101(root, T=2, cache_dir=cache)


def test_reduced_cache_key_follows_size_and_source_files(caltech_root, tmp_path, nmnist_root):
    a = NCaltech101(caltech_root, T=2, cache_dir=tmp_path)
    b = NCaltech101(caltech_root, T=2, size=32, cache_dir=tmp_path)
    assert a.directory != b.directory and b[0][0].shape == (2, 2, 32, 32)
    assert NCaltech101(caltech_root / "Caltech101", T=2, cache_dir=tmp_path).directory == a.directory
    # an unreduced cache does not depend on the size
    same = NMNIST(nmnist_root, T=2, cache_dir=tmp_path).directory
    assert NMNIST(nmnist_root, T=2, size=20, cache_dir=tmp_path).directory == same


# --- any folder of recordings, the config and the command line ------------------------------------

def make_npy_folder(root):
    rng = np.random.default_rng(9)
    for c, name in enumerate(["Zebra", "apple", "10", "9"]):          # case-sensitive text order: 10, 9, Zebra, apple
        (root / name).mkdir(parents=True)
        for i in range(c + 1):
            ev = np.zeros(50, dtype=[("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "<i1")])
            ev["x"], ev["y"] = rng.integers(0, 60, 50), rng.integers(0, 40, 50)
            ev["t"], ev["p"] = np.arange(50), rng.integers(0, 2, 50)
            np.save(root / name / f"rec{i}.npy", ev)
    (root / "notes.md").write_text("about the data")
    return root


def test_event_folder_npy_classes_split_and_items(tmp_path):
    root = make_npy_folder(tmp_path / "mine")
    train = EventFolder(root, train=True, reader="npy", sensor_size=(40, 60), T=2, size=16, cache_dir=tmp_path / "c")
    test = EventFolder(root, train=False, reader="npy", sensor_size=(40, 60), T=2, size=16, cache_dir=tmp_path / "c")
    assert train.classes == ("10", "9", "Zebra", "apple") and train.ignored == ["notes.md"]
    # per class n = 3, 4, 1, 2 recordings: train floor(0.9 n + 0.5) = 3, 4, 1, 2 ... test the rest
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 3, 3] and len(test) == 0
    ev = np.load(root / "10" / "rec1.npy")
    counts = reference_counts(list(zip(ev["x"], ev["y"], ev["p"], ev["t"])), 2, (40, 60))
    assert torch.equal(train[1][0], batch_transform(torch.from_numpy(counts)[None], 16)[0])
    with pytest.raises(ValueError, match=r"field 'y' spans \[0, 3\d\], outside \[0, 29\]"):
        EventFolder(root, reader="npy", sensor_size=(30, 60), cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="reader must be one of"):
        EventFolder(root, reader="hdf5", sensor_size=(30, 60), cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="no class folders"):
        EventFolder(root / "10", reader="npy", sensor_size=(30, 60), cache_dir=tmp_path / "c")


def test_event_folder_from_a_config(nmnist_root, tmp_path):
    cfg = resolve({"dataset": "event-folder", "model": "vggsnn", "data_dir": str(nmnist_root / "Train"),
                   "reader": "atis", "sensor_size": [34, 34], "cache_dir": str(tmp_path), "T": 2, "batch_size": 4})
    assert cfg["num_classes"] == 10
    data = build_data(cfg)
    assert (data.info["train_used"], data.info["test_used"]) == (20, 0)
    x, y = next(iter(data.train))
    assert x.shape == (4, 2, 2, 48, 48)
    with pytest.raises(ConfigError, match="event-folder needs reader, sensor_size"):
        resolve({"dataset": "event-folder", "data_dir": str(nmnist_root)})
    with pytest.raises(ConfigError, match="bad value for sensor_size"):
        resolve({"dataset": "event-folder", "data_dir": str(nmnist_root / "Train"), "reader": "atis",
                 "sensor_size": [34]})


@pytest.mark.slow
def test_presets_and_preprocess_command(nmnist_root, caltech_root, tmp_path, capsys):
    assert resolve(load_config("ncaltech101_vggsnn"))["num_classes"] == 101
    cfg = resolve(load_config("nmnist"))
    assert (cfg["model"], cfg["T"], cfg["num_classes"], cfg["epochs"]) == ("digits_snn", 10, 10, 30)
    out = tmp_path / "run"
    assert train_main(["--config", "nmnist", "--data-dir", str(nmnist_root), "--cache-dir", str(tmp_path / "c"),
                       "--T", "2", "--epochs", "1", "--batch-size", "4", "--limit-train", "4", "--limit-test", "4",
                       "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    capsys.readouterr()
    assert preprocess_main(["--dataset", "n-caltech101", "--data-dir", str(caltech_root), "--cache-dir", str(tmp_path),
                            "--T", "2"]) == 0
    printed = capsys.readouterr().out
    assert "21 train / 2 test samples, T=2" in printed and "ignored 1 entries" in printed
    assert preprocess_main(["--dataset", "n-mnist", "--data-dir", str(caltech_root), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tetsnn preprocess: error:") and "missing Train and Test" in err and "\n" not in err
    mine = make_npy_folder(tmp_path / "mine")
    assert preprocess_main(["--dataset", "event-folder", "--data-dir", str(mine), "--cache-dir", str(tmp_path),
                            "--T", "2", "--size", "16", "--reader", "npy", "--sensor-size", "40,60"]) == 0
    assert "10 train / 0 test samples" in capsys.readouterr().out
    frames, _ = load_frames("event-folder", mine, train=True, T=2, cache_dir=tmp_path, size=16, reader="npy",
                            sensor_size=(40, 60))
    assert frames.shape == (10, 2, 2, 16, 16) and frames.dtype == np.uint32


def test_event_folder_aedat2_matches_cifar10dvs(tmp_path):
    from test_events_datasets import make_cifar_root

    root = make_cifar_root(tmp_path / "cifar", indices=[1, 2, 3])
    folder = EventFolder(root, train=True, reader="aedat2", sensor_size=(128, 128), T=2, cache_dir=tmp_path / "c")
    cifar = tetsnn.data.CIFAR10DVS(root, train=True, T=2, cache_dir=tmp_path / "c")
    assert folder.labels.tolist() == cifar.labels.tolist() and len(folder) == 30
    assert folder.frames.dtype == np.uint32 and cifar.frames.dtype == np.uint16     # reduced / not reduced
    assert all(torch.equal(folder[i][0], cifar[i][0]) for i in range(len(folder)))
    assert len(folder.ignored) == 10 and folder.ignored[0] == "airplane/notes.txt"
    with pytest.raises(ValueError, match=r"sensor_size is fixed at \(128, 128\)"):
        tetsnn.data.events.build_cache("cifar10-dvs", root, 2, cache_dir=tmp_path / "c", sensor_size=(64, 64))
