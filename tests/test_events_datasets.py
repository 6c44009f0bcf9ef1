"""CIFAR10-DVS and DVS128 Gesture datasets, the frame cache and ``tetsnn preprocess``,
on tiny roots written byte by byte."""
import json
import pickle
import warnings

import numpy as np
import pytest
import torch

import tetsnn.data
from tetsnn.data.events import CIFAR10DVS, DVSGesture, batch_transform, load_frames
from tetsnn.data.events import datasets as events_datasets
from tetsnn.engine.preprocess_cli import main as preprocess_main
from test_events_files import aedat2_bytes, aedat31_bytes, aedat31_packet, polarity_data

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_events(label, index):
    """The events of cifar10_<class>_<index>: (x, y, p, t), with repeated pixels."""
    rng = np.random.default_rng(100 * label + index)
    n = 6 + index
    xs, ys, ps = rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n)
    xs[1], ys[1], ps[1] = xs[0], ys[0], ps[0]
    return [(int(x), int(y), int(p), 1000 + 10 * k) for k, (x, y, p) in enumerate(zip(xs, ys, ps))]


def make_cifar_root(root, indices=range(1, 11)):
    """10 classes x 10 files, indices 1..10 (so numeric and text order differ)."""
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in indices:
            (root / name / f"cifar10_{name}_{i}.aedat").write_bytes(aedat2_bytes(cifar_events(label, i)))
        (root / name / "notes.txt").write_text("not a recording")
    return root


def counts(events, T):
    """Expected [T, 2, 128, 128] counts, one event at a time (split by count)."""
    out = np.zeros((T, 2, 128, 128), dtype=np.int64)
    n = len(events)
    for i, (x, y, p, _) in enumerate(events):
        out[max(j for j in range(T) if j * n // T <= i), p, y, x] += 1
    return out


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return make_cifar_root(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def count_reads(monkeypatch):
    """Count the recordings decoded by CIFAR10-DVS builds."""
    calls = []
    real = events_datasets.read_aedat2

    def counting(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(events_datasets, "read_aedat2", counting)
    return calls


def sample_files(dataset):
    return [s["file"] for s in json.loads((dataset.directory / "manifest.json").read_text())
            ["splits"]["train" if dataset.train else "test"]["samples"]]


# --- CIFAR10-DVS ----------------------------------------------------------------------------------

def test_cifar10dvs_tet_split_labels_and_items(cifar_root, tmp_path):
    train = CIFAR10DVS(cifar_root, train=True, T=3, cache_dir=tmp_path, size=128, norm=None)
    test = CIFAR10DVS(cifar_root, train=False, T=3, cache_dir=tmp_path)
    assert (len(train), len(test)) == (90, 10)
    assert sample_files(test) == [f"{c}/cifar10_{c}_10.aedat" for c in CLASSES]   # numeric order: 10 is last
    assert sample_files(train)[:9] == [f"airplane/cifar10_airplane_{i}.aedat" for i in range(1, 10)]
    assert train.labels.tolist() == [c for c in range(10) for _ in range(9)]
    assert test.labels.tolist() == list(range(10))
    x, y = train[12]                       # class 1, index 4: raw counts at size 128 without norm
    assert (x.dtype, x.shape, y) == (torch.float32, (3, 2, 128, 128), 1)
    raw = counts(cifar_events(1, 4), 3)
    np.testing.assert_array_equal(x.numpy(), raw)
    assert raw.max() >= 2                   # a repeated pixel counts twice
    x, y = test[3]                         # default size 48, max-scaled
    expected = batch_transform(torch.from_numpy(counts(cifar_events(3, 10), 3))[None], 48, "max")[0]
    torch.testing.assert_close(x, expected)
    assert y == 3 and x.shape == (3, 2, 48, 48)
    assert tetsnn.data.CIFAR10DVS is CIFAR10DVS and tetsnn.data.DVSGesture is DVSGesture


def test_cifar10dvs_tebn_split(cifar_root, tmp_path):
    test = CIFAR10DVS(cifar_root, train=False, T=2, split="tebn", cache_dir=tmp_path)
    train = CIFAR10DVS(cifar_root, train=True, T=2, split="tebn", cache_dir=tmp_path)
    assert (len(train), len(test)) == (90, 10)
    assert sample_files(test) == [f"{c}/cifar10_{c}_1.aedat" for c in CLASSES]


def test_load_frames_contract(cifar_root, tmp_path):
    frames, labels = load_frames("cifar10-dvs", cifar_root, train=True, T=4, cache_dir=tmp_path)
    assert isinstance(frames, np.memmap) and frames.dtype == np.uint16 and frames.shape == (90, 4, 2, 128, 128)
    assert labels.dtype == np.int64 and labels.shape == (90,)
    np.testing.assert_array_equal(frames[9 * 7 + 2], counts(cifar_events(7, 3), 4))
    with pytest.raises(ValueError, match="unknown event dataset"):
        load_frames("cifar100-dvs", cifar_root, train=True, T=4, cache_dir=tmp_path)


def test_cache_is_reused_and_rebuilt_when_a_parameter_or_file_changes(tmp_path, count_reads):
    root = make_cifar_root(tmp_path / "root")
    cache = tmp_path / "cache"
    first = CIFAR10DVS(root, T=2, cache_dir=cache)
    assert len(count_reads) == 100                               # both splits in one build
    again = CIFAR10DVS(root, train=False, T=2, cache_dir=cache)
    assert len(count_reads) == 100 and again.directory == first.directory
    for changed in (dict(T=3), dict(T=2, split="tebn"), dict(T=2, split_by="time")):
        assert CIFAR10DVS(root, cache_dir=cache, **changed).directory != first.directory
    assert len(count_reads) == 400
    (root / "cat" / "cifar10_cat_5.aedat").write_bytes(aedat2_bytes(cifar_events(3, 5)[:-1]))
    rebuilt = CIFAR10DVS(root, T=2, cache_dir=cache)
    assert len(count_reads) == 500 and rebuilt.directory != first.directory
    assert json.loads((rebuilt.directory / "manifest.json").read_text())["params"]["T"] == 2


def test_interrupted_build_leaves_no_cache_that_looks_complete(tmp_path, monkeypatch, cifar_root):
    real = events_datasets.read_aedat2
    calls, armed = [], [True]

    def interrupted(path):  # Ctrl-C at the 40th file of the first build
        calls.append(path)
        if len(calls) == 40 and armed and armed.pop():
            raise KeyboardInterrupt
        return real(path)
    monkeypatch.setattr(events_datasets, "read_aedat2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        CIFAR10DVS(cifar_root, T=2, cache_dir=tmp_path)
    # nothing final, no temporary left (only the cache's lock file)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    calls.clear()
    done = CIFAR10DVS(cifar_root, T=2, cache_dir=tmp_path)
    assert len(calls) == 100
    # A cache whose manifest or data went missing (a killed process, a full disk) is rebuilt.
    (done.directory / "test.u16").write_bytes(b"")
    assert len(CIFAR10DVS(cifar_root, train=False, T=2, cache_dir=tmp_path)) == 10
    assert len(calls) == 200
    (done.directory / "manifest.json").unlink()
    assert len(CIFAR10DVS(cifar_root, train=False, T=2, cache_dir=tmp_path)) == 10
    assert len(calls) == 300


@pytest.mark.parametrize("content, message", [
    (aedat2_bytes(cifar_events(3, 4))[:-5], "not a multiple of the 8-byte record"),
    (aedat2_bytes([]), "empty recording"),
    (b"#!AER-DAT1.0\r\n", "version '1.0'"),
])
def test_bad_recording_raises_and_caches_nothing_or_is_skipped(tmp_path, content, message):
    root = make_cifar_root(tmp_path / "root")
    (root / "cat" / "cifar10_cat_4.aedat").write_bytes(content)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=message) as info:
        CIFAR10DVS(root, T=2, cache_dir=cache)
    assert "cifar10_cat_4.aedat" in str(info.value)
    assert not cache.exists() or [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        train = CIFAR10DVS(root, T=2, cache_dir=cache, on_error="skip")
    assert len(train) == 89 and [s["file"] for s in train.skipped] == ["cat/cifar10_cat_4.aedat"]
    assert "cat/cifar10_cat_4.aedat" not in sample_files(train)
    assert train.labels.tolist().count(3) == 8
    with pytest.raises(ValueError, match="on_error='skip'"):   # a partial cache is not used silently
        CIFAR10DVS(root, T=2, cache_dir=cache)


def test_pixel_over_uint16_is_an_error(tmp_path):
    root = make_cifar_root(tmp_path / "root", indices=[1])
    (root / "dog" / "cifar10_dog_1.aedat").write_bytes(aedat2_bytes([(5, 5, 1, k) for k in range(65536)]))
    with pytest.raises(ValueError, match="cifar10_dog_1.aedat: a pixel holds 65536 events"):
        CIFAR10DVS(root, T=1, cache_dir=tmp_path / "cache")


def test_bad_cifar_roots(tmp_path):
    root = make_cifar_root(tmp_path / "root", indices=[1])
    for path in (root / "frog").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match="frog: no recordings named cifar10_frog_<index>.aedat"):
        CIFAR10DVS(root, cache_dir=tmp_path / "cache")
    (root / "frog").rmdir()
    (root / "ship").rename(root / "ships")
    with pytest.raises(ValueError, match="missing class folder\\(s\\) frog, ship"):
        CIFAR10DVS(root, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="dataset root not found"):
        CIFAR10DVS(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="split must be"):
        CIFAR10DVS(root, split="random", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_dataset_pickles_without_its_frames(cifar_root, tmp_path):
    test = CIFAR10DVS(cifar_root, train=False, T=2, cache_dir=tmp_path)
    first = test[0][0]
    blob = pickle.dumps(test)
    assert len(blob) < 20_000                                    # the memmap is reopened, not copied
    torch.testing.assert_close(pickle.loads(blob)[0][0], first)


# --- DVS128 Gesture -------------------------------------------------------------------------------

def gesture_events(seed, n=300, t_end=1000):
    rng = np.random.default_rng(seed)
    return [(int(x), int(y), int(p), int(t)) for x, y, p, t in
            zip(rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n), np.sort(rng.integers(0, t_end, n)))]


def gesture_file(events, overflow=0):
    """Two polarity packets with a non-polarity packet between them."""
    packed = [(polarity_data(x, y, p), t) for x, y, p, t in events]
    half = len(packed) // 2
    return aedat31_bytes([aedat31_packet(packed[:half], overflow=overflow),
                          aedat31_packet([bytes(8)] * 3, kind=0),
                          aedat31_packet(packed[half:], overflow=overflow)])


RECORDINGS = {  # name -> (split, labels rows (class 1..11, start, end))
    "user01_fluorescent": ("train", [(1, 0, 300), (2, 300, 600), (11, 250, 900)]),   # overlapping rows
    "user02_lab": ("train", [(5, 100, 400)]),
    "user24_led": ("test", [(3, 0, 500), (4, 500, 1000)]),
}


def make_gesture_root(root):
    root.mkdir(parents=True)
    for seed, (name, (split, rows)) in enumerate(RECORDINGS.items()):
        (root / f"{name}.aedat").write_bytes(gesture_file(gesture_events(seed)))
        csv = "class,startTime_usec,endTime_usec\n" + "".join(f"{c},{s},{e}\n" for c, s, e in rows)
        (root / f"{name}_labels.csv").write_text(csv)
    for split in ("train", "test"):
        names = [f"{n}.aedat" for n, (s, _) in RECORDINGS.items() if s == split]
        (root / f"trials_to_{split}.txt").write_text("\n".join(names) + "\n\n")
    return root


def test_gesture_samples_windows_and_labels(tmp_path):
    root = make_gesture_root(tmp_path / "DvsGesture")
    train = DVSGesture(root, train=True, T=2, size=128, norm=None, cache_dir=tmp_path / "cache")
    test = DVSGesture(root, train=False, T=2, cache_dir=tmp_path / "cache")
    assert (len(train), len(test)) == (4, 2)
    assert train.labels.tolist() == [0, 1, 10, 4] and test.labels.tolist() == [2, 3]
    events = gesture_events(0)
    for i, (_, start, end) in enumerate(RECORDINGS["user01_fluorescent"][1]):
        x, y = train[i]
        window = [e for e in events if start <= e[3] < end]
        np.testing.assert_array_equal(x.numpy(), counts(window, 2))
    frames, labels = load_frames("dvs-gesture", root, train=False, T=2, cache_dir=tmp_path / "cache")
    assert frames.shape == (2, 2, 2, 128, 128) and labels.tolist() == [2, 3]
    assert test[1][0].shape == (2, 2, 48, 48)


def test_gesture_cache_follows_the_trial_lists(tmp_path):
    root = make_gesture_root(tmp_path / "DvsGesture")
    assert len(DVSGesture(root, train=False, T=1, cache_dir=tmp_path / "cache")) == 2
    (root / "trials_to_train.txt").write_text("user01_fluorescent.aedat\n")
    (root / "trials_to_test.txt").write_text("user24_led.aedat\nuser02_lab.aedat\n")
    test = DVSGesture(root, train=False, T=1, cache_dir=tmp_path / "cache")
    assert len(test) == 3 and test.labels.tolist() == [2, 3, 4]


def test_gesture_uses_the_overflow_field(tmp_path):
    root = make_gesture_root(tmp_path / "DvsGesture")
    events = gesture_events(0)
    (root / "user01_fluorescent.aedat").write_bytes(gesture_file(events, overflow=1))
    (root / "user01_fluorescent_labels.csv").write_text(f"class,startTime_usec,endTime_usec\n7,{2**31},{2**31 + 1000}\n")
    train = DVSGesture(root, T=1, size=128, norm=None, cache_dir=tmp_path / "cache")
    assert train.labels.tolist() == [6, 4] and train[0][0].sum() == len(events)


def test_gesture_bad_labels_row_names_file_and_line(tmp_path):
    root = make_gesture_root(tmp_path / "DvsGesture")
    (root / "user02_lab_labels.csv").write_text("class,startTime_usec,endTime_usec\n5,100,400\n5;100;400\n")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"user02_lab_labels\.csv, line 3: malformed row"):
        DVSGesture(root, cache_dir=cache)
    assert not cache.exists() or [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        train = DVSGesture(root, cache_dir=cache, on_error="skip")
    assert len(train) == 3 and train.skipped[0]["file"] == "user02_lab.aedat"
    assert "line 3" in train.skipped[0]["error"]


def test_gesture_window_without_events_is_an_error(tmp_path):
    root = make_gesture_root(tmp_path / "DvsGesture")
    (root / "user24_led_labels.csv").write_text("class,startTime_usec,endTime_usec\n3,0,500\n4,5000,6000\n")
    with pytest.raises(ValueError, match=r"user24_led_labels\.csv, line 3: no events"):
        DVSGesture(root, cache_dir=tmp_path / "cache")


def test_bad_gesture_roots(tmp_path):
    root = make_gesture_root(tmp_path / "DvsGesture")
    (root / "user02_lab.aedat").unlink()
    with pytest.raises(ValueError, match="user02_lab.aedat: recording named in the trial lists not found"):
        DVSGesture(root, cache_dir=tmp_path / "cache")
    (root / "trials_to_train.txt").write_text("user01_fluorescent.aedat\nuser02_lab.csv\n")
    with pytest.raises(ValueError, match=r"trials_to_train\.txt, line 2: expected a recording name"):
        DVSGesture(root, cache_dir=tmp_path / "cache")
    (root / "trials_to_test.txt").unlink()
    with pytest.raises(ValueError, match="not a DvsGesture root: missing trials_to_test.txt"):
        DVSGesture(root, cache_dir=tmp_path / "cache")


# --- tetsnn preprocess ----------------------------------------------------------------------------

def test_preprocess_command(cifar_root, tmp_path, capsys):
    assert preprocess_main(["--dataset", "cifar10-dvs", "--data-dir", str(cifar_root), "--cache-dir", str(tmp_path),
                            "--T", "4"]) == 0
    assert "90 train / 10 test samples, T=4" in capsys.readouterr().out
    frames, _ = load_frames("cifar10-dvs", cifar_root, train=False, T=4, cache_dir=tmp_path)
    assert frames.shape[1] == 4
    assert preprocess_main(["--dataset", "dvs-gesture", "--data-dir", str(cifar_root), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tetsnn preprocess: error:") and "trials_to_train.txt" in err and "\n" not in err
