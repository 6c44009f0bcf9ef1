"""CIFAR10-DVS and DVS128 Gesture, read from their original recordings, framed once and cached.

``load_frames`` gives the cached counts (what the training command reads, resizing and augmenting
whole batches on its device); ``CIFAR10DVS`` / ``DVSGesture`` are map-style datasets that return
one resized, scaled sample at a time through the same ``batch_transform``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .cache import Recording, ensure_cache, open_split
from .formats import read_aedat2, read_aedat31, read_gesture_labels
from .frames import batch_transform, to_frames

__all__ = ["CIFAR10DVS", "DVSGesture", "load_frames", "build_cache", "cifar10dvs_recordings",
           "gesture_recordings", "CIFAR10_CLASSES", "GESTURE_CLASSES", "SENSOR_SIZE"]

SENSOR_SIZE = (128, 128)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GESTURE_CLASSES = ("hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
                   "right_arm_counter_clockwise", "left_arm_clockwise", "left_arm_counter_clockwise",
                   "arm_roll", "air_drums", "air_guitar", "other_gestures")
DEFAULT_T = {"cifar10-dvs": 10, "dvs-gesture": 16}


def _counts(events: np.ndarray, T: int, split_by: str, path) -> np.ndarray:
    """``to_frames`` as uint16, with errors that name the file."""
    try:
        frames = to_frames(events, T, SENSOR_SIZE, split_by)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    peak = int(frames.max())
    if peak > np.iinfo(np.uint16).max:
        raise ValueError(f"{path}: a pixel holds {peak} events in one frame, over the cache's uint16 "
                         f"limit of 65,535 (use a larger T)")
    return frames.astype(np.uint16)


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise ValueError(f"{root}: dataset root not found (not a directory)")


# --- CIFAR10-DVS: <class>/cifar10_<class>_<index>.aedat, AEDAT 2.0 ---------------------------------

def cifar10dvs_recordings(root, split: str = "tet") -> list[Recording]:
    """List the recordings, labelled by class folder, with their split.

    Per class, files sorted by numeric index: ``"tet"`` puts the first ``floor(0.9 n + 0.5)`` in
    train and the rest in test; ``"tebn"`` puts the first ``floor(0.1 n + 0.5)`` in test.
    """
    if split not in ("tet", "tebn"):
        raise ValueError(f"split must be 'tet' or 'tebn', got {split!r}")
    root = Path(root)
    _check_root(root)
    missing = [name for name in CIFAR10_CLASSES if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"{root}: not a CIFAR10-DVS root: missing class folder(s) {', '.join(missing)} "
                         f"(expected <class>/cifar10_<class>_<index>.aedat for the 10 CIFAR-10 classes)")
    recordings = []
    for label, name in enumerate(CIFAR10_CLASSES):
        pattern = re.compile(rf"cifar10_{name}_(\d+)\.aedat")
        files = sorted((int(m.group(1)), f.name) for f in (root / name).iterdir() if (m := pattern.fullmatch(f.name)))
        if not files:
            raise ValueError(f"{root / name}: no recordings named cifar10_{name}_<index>.aedat")
        n = len(files)
        n_test = (n + 5) // 10 if split == "tebn" else n - (9 * n + 5) // 10  # exact floor(x + 0.5)
        for i, (_, file) in enumerate(files):
            in_test = i < n_test if split == "tebn" else i >= n - n_test
            recordings.append(Recording(f"{name}/{file}", "test" if in_test else "train", label))
    return recordings


def _cifar10dvs_framer(root: Path, T: int, split_by: str):
    def frame(recording: Recording):
        path = root / recording.file
        return _counts(read_aedat2(path), T, split_by, path)[None], [{"label": recording.label}]
    return frame


# --- DVS128 Gesture: userNN_<lighting>.aedat + _labels.csv, AEDAT 3.1 ------------------------------

def _labels_file(name: str) -> str:
    return name[:-len(".aedat")] + "_labels.csv"


def gesture_recordings(root) -> list[Recording]:
    """List the recordings named in ``trials_to_train.txt`` and ``trials_to_test.txt``."""
    root = Path(root)
    _check_root(root)
    lists = {"train": root / "trials_to_train.txt", "test": root / "trials_to_test.txt"}
    missing = [path.name for path in lists.values() if not path.is_file()]
    if missing:
        raise ValueError(f"{root}: not a DvsGesture root: missing {', '.join(missing)} (expected "
                         f"userNN_<lighting>.aedat, its _labels.csv, trials_to_train.txt, trials_to_test.txt)")
    recordings = []
    for split, path in lists.items():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            name = line.strip()
            if not name:
                continue
            if not name.endswith(".aedat") or "/" in name or "\\" in name:
                raise ValueError(f"{path}, line {number}: expected a recording name such as "
                                 f"user01_fluorescent.aedat, got {name!r}")
            recordings.append(Recording(name, split, None, (_labels_file(name),)))
    if not recordings:
        raise ValueError(f"{root}: trials_to_train.txt and trials_to_test.txt list no recordings")
    return recordings


def _gesture_framer(root: Path, T: int, split_by: str):
    def frame(recording: Recording):
        path, labels_path = root / recording.file, root / recording.sources[0]
        if not path.is_file():
            raise ValueError(f"{path}: recording named in the trial lists not found")
        rows = read_gesture_labels(labels_path)
        events = read_aedat31(path)
        t = events["t"]
        frames, samples = [], []
        for label, start, end, line in rows.tolist():
            window = events[(t >= start) & (t < end)]
            if len(window) == 0:
                raise ValueError(f"{labels_path}, line {line}: no events of {path.name} in [{start}, {end})")
            frames.append(_counts(window, T, split_by, path))
            samples.append({"label": label, "start": start, "end": end, "line": line})
        return np.stack(frames), samples
    return frame


# --- cache and public entry points ----------------------------------------------------------------

def build_cache(dataset: str, root, T: int | None = None, split: str = "tet", cache_dir=None,
                on_error: str = "raise", split_by: str = "count", workers: int | None = None):
    """Build (or find) the cache of ``dataset`` ("cifar10-dvs" or "dvs-gesture") for both splits.

    Returns ``(directory, manifest)``. ``split`` only applies to CIFAR10-DVS.
    """
    if dataset not in DEFAULT_T:
        raise ValueError(f"unknown event dataset {dataset!r}; expected one of {', '.join(DEFAULT_T)}")
    T = DEFAULT_T[dataset] if T is None else T
    if isinstance(T, bool) or int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if split_by not in ("count", "time"):
        raise ValueError(f"split_by must be 'count' or 'time', got {split_by!r}")
    root = Path(root).expanduser()
    params = {"T": int(T), "split_by": split_by, "sensor_size": list(SENSOR_SIZE)}
    if dataset == "cifar10-dvs":
        recordings = cifar10dvs_recordings(root, split)
        framer = _cifar10dvs_framer(root, int(T), split_by)
        params["split"] = split
    else:
        recordings = gesture_recordings(root)
        framer = _gesture_framer(root, int(T), split_by)
    return ensure_cache(dataset, root, recordings, framer, params, cache_dir, on_error, workers)


def load_frames(dataset: str, root, train: bool, T: int, split: str = "tet", cache_dir=None,
                on_error: str = "raise", split_by: str = "count", workers: int | None = None):
    """Cached event counts of one split: ``(uint16 memmap [N, T, 2, 128, 128], int64 labels [N])``.

    Builds the cache on first use (see :func:`build_cache`).
    """
    directory, manifest = build_cache(dataset, root, T, split, cache_dir, on_error, split_by, workers)
    return open_split(directory, manifest["splits"]["train" if train else "test"])


class _EventDataset(torch.utils.data.Dataset):
    """Map-style dataset over a cache: items are ``(float32 [T, 2, size, size], int label)``."""
    name = ""
    classes: tuple = ()

    def __init__(self, root, train, T, split, size, norm, cache_dir, on_error, split_by, workers):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if norm not in ("max", None):
            raise ValueError(f"norm must be 'max' or None, got {norm!r}")
        self.train, self.T, self.size, self.norm = bool(train), T, int(size), norm
        self.directory, manifest = build_cache(self.name, root, T, split, cache_dir, on_error, split_by, workers)
        self.info = manifest["splits"]["train" if train else "test"]
        self.labels = np.asarray(self.info["labels"], dtype=np.int64)
        self.skipped = manifest["skipped"]
        self._frames = None

    @property
    def frames(self) -> np.ndarray:
        """The split's cached counts, a read-only uint16 memmap ``[N, T, 2, 128, 128]``."""
        if self._frames is None:  # opened lazily, so worker processes map the file themselves
            self._frames, _ = open_split(self.directory, self.info)
        return self._frames

    def __getstate__(self):
        return {**self.__dict__, "_frames": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        counts = torch.from_numpy(self.frames[index].astype(np.float32))
        return batch_transform(counts[None], self.size, self.norm)[0], int(self.labels[index])


class CIFAR10DVS(_EventDataset):
    """CIFAR10-DVS from ``root/<class>/cifar10_<class>_<index>.aedat`` (10 classes, CIFAR-10 order).

    ``split="tet"``: per class the first 90% of indices train, the rest test; ``"tebn"``: the first
    10% test. ``size=128, norm=None`` gives the raw counts; ``norm="max"`` divides each frame by
    its own maximum.
    """
    name = "cifar10-dvs"
    classes = CIFAR10_CLASSES

    def __init__(self, root, train=True, T=10, split="tet", size=48, norm="max", cache_dir=None,
                 on_error="raise", split_by="count", workers=None):
        super().__init__(root, train, T, split, size, norm, cache_dir, on_error, split_by, workers)


class DVSGesture(_EventDataset):
    """DVS128 Gesture from the original ``DvsGesture`` folder (11 classes; users 1-23 train).

    One sample per labels-CSV row: the events with ``start <= t < end``.
    """
    name = "dvs-gesture"
    classes = GESTURE_CLASSES

    def __init__(self, root, train=True, T=16, size=48, norm="max", cache_dir=None, on_error="raise",
                 split_by="count", workers=None):
        super().__init__(root, train, T, "tet", size, norm, cache_dir, on_error, split_by, workers)
