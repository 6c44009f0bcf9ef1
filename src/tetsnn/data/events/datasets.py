"""Event-camera datasets read from their original recordings, framed once and cached.

``EventFolder`` reads any ``<class>/<recording>`` folder with one of the readers; CIFAR10-DVS,
N-MNIST and N-Caltech101 are definitions on top of it (their layout, reader, sensor and split).
DVS128 Gesture, whose samples are label windows of long recordings rather than files, shares the
cache, the framing and the batch path. ``load_frames`` gives a split's cached frames (what the
training command reads, resizing and augmenting whole batches on its device); the dataset classes
are map-style datasets that return one resized, scaled sample at a time through the same
``batch_transform``. ``SPECS`` holds each dataset's facts (sensor, reader, default T and input size,
training augmentation), so the batch loader needs only a lookup.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cache import Recording, ensure_cache, open_split
from .formats import READERS, read_aedat2, read_aedat31, read_atis_bin, read_gesture_labels, read_npy  # noqa: F401
from .frames import batch_transform, can_reduce, cell_sums, to_frames

__all__ = ["EventSpec", "SPECS", "EventFolder", "CIFAR10DVS", "NMNIST", "NCaltech101", "DVSGesture", "load_frames",
           "build_cache", "class_folders", "folder_recordings", "cifar10dvs_recordings", "nmnist_recordings",
           "ncaltech101_root", "gesture_recordings", "CIFAR10_CLASSES", "GESTURE_CLASSES", "SENSOR_SIZE"]

SENSOR_SIZE = (128, 128)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GESTURE_CLASSES = ("hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
                   "right_arm_counter_clockwise", "left_arm_clockwise", "left_arm_counter_clockwise",
                   "arm_roll", "air_drums", "air_guitar", "other_gestures")
DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class EventSpec:
    """A dataset's facts: sensor ``(H, W)`` and reader (None: the user's, for ``event-folder``),
    default T and model input side, training augmentation of tetsnn's presets, and whether its
    cache is stored reduced to the input size (cell sums) when that is below the sensor."""
    sensor_size: tuple | None
    reader: str | None
    T: int = 10
    size: int = 48
    flip: bool = False
    roll: int = 5
    reduce: bool = False


SPECS = {
    "cifar10-dvs": EventSpec(SENSOR_SIZE, "aedat2", T=10, flip=True),
    "dvs-gesture": EventSpec(SENSOR_SIZE, "aedat31", T=16),
    "n-mnist": EventSpec((34, 34), "atis", T=10, size=34, roll=0),
    "n-caltech101": EventSpec((180, 240), "atis", T=10, flip=True, reduce=True),
    "event-folder": EventSpec(None, None, T=10, reduce=True),
}
DEFAULT_T = {name: spec.T for name, spec in SPECS.items()}


def _counts(events: np.ndarray, T: int, split_by: str, path, sensor_size) -> np.ndarray:
    """``to_frames`` as uint16, with errors that name the file."""
    try:
        frames = to_frames(events, T, sensor_size, split_by)
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


# --- folders of recordings: <class>/<recording> ---------------------------------------------------

def natural_key(name: str) -> tuple:
    """Sort key that compares runs of digits as numbers: ``image_0002`` before ``image_0010``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)), name


def _visible(folder: Path):
    """A folder's entries, without hidden ones (``.DS_Store``, ``.ipynb_checkpoints``, ...)."""
    return [entry for entry in folder.iterdir() if not entry.name.startswith(".")]


def class_folders(root) -> list[str]:
    """The class folders under ``root`` (every visible subfolder), sorted case-sensitively."""
    root = Path(root)
    _check_root(root)
    classes = sorted(entry.name for entry in _visible(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class folders (expected <class>/<recording>)")
    return classes


def _split_names(n: int, split: str) -> list[str]:
    """The split of each of a class's ``n`` recordings, in order: "tet" trains on the first
    floor(0.9 n + 0.5), "tebn" tests on the first floor(0.1 n + 0.5) (integer forms of
    floor(x + 0.5)); "train" / "test" put them all in that split."""
    if split in ("train", "test"):
        return [split] * n
    if split == "tebn":
        return ["test"] * ((n + 5) // 10) + ["train"] * (n - (n + 5) // 10)
    return ["train"] * ((9 * n + 5) // 10) + ["test"] * (n - (9 * n + 5) // 10)


def folder_recordings(root, suffix: str, split: str = "tet", classes=None, pattern: str | None = None,
                      named: str | None = None, base=None, title: str = "", expected: str = ""):
    """List ``root/<class>/<recording>``, labelled by class folder, with their split.

    Classes are ``classes`` (each folder must exist) or every visible subfolder, sorted
    case-sensitively; a class's recordings are its files whose names end with ``suffix`` (and
    fully match the regular expression ``pattern`` if given, ``{cls}`` standing for the class), in
    natural order; a class without any is an error (``named`` describes the names expected).
    ``split``: "tet" puts the first floor(0.9 n + 0.5) of each class in train and the rest in
    test, "tebn" the first floor(0.1 n + 0.5) in test, "train" / "test" all of them in one split.
    Returns ``(recordings, classes, ignored)``: paths are relative to ``base``
    (default ``root``); ``ignored`` lists the visible entries that are not recordings.
    """
    if split not in ("tet", "tebn", "train", "test"):
        raise ValueError(f"split must be 'tet' or 'tebn', got {split!r}")
    root = Path(root)
    base = root if base is None else Path(base)
    _check_root(root)
    entries = _visible(root)
    if classes is None:
        classes = class_folders(root)
    else:
        missing = [name for name in classes if not (root / name).is_dir()]
        if missing:
            raise ValueError(f"{root}: not {title} root: missing class folder(s) {', '.join(missing)} ({expected})")
    ignored = [entry for entry in entries if entry.name not in classes]
    recordings = []
    for label, name in enumerate(classes):
        regex = re.compile(pattern.format(cls=re.escape(name))) if pattern else None
        files = []
        for entry in _visible(root / name):
            if entry.name.endswith(suffix) and (regex is None or regex.fullmatch(entry.name)) and entry.is_file():
                files.append(entry.name)
            else:
                ignored.append(entry)
        if not files:
            raise ValueError(f"{root / name}: no recordings named {(named or '*' + suffix).format(cls=name)}")
        files.sort(key=natural_key)
        for file, where in zip(files, _split_names(len(files), split)):
            recordings.append(Recording((root / name / file).relative_to(base).as_posix(), where, label))
    ignored = sorted(entry.relative_to(base).as_posix() + ("/" if entry.is_dir() else "") for entry in ignored)
    return recordings, list(classes), ignored


# --- the datasets' layouts ------------------------------------------------------------------------

def cifar10dvs_recordings(root, split: str = "tet"):
    """CIFAR10-DVS: ``<class>/cifar10_<class>_<index>.aedat`` for the 10 CIFAR-10 classes, in
    CIFAR-10 label order; per class in numeric index order, split by ``"tet"`` or ``"tebn"``."""
    if split not in ("tet", "tebn"):
        raise ValueError(f"split must be 'tet' or 'tebn', got {split!r}")
    return folder_recordings(root, ".aedat", split, CIFAR10_CLASSES, pattern=r"cifar10_{cls}_\d+\.aedat",
                             named="cifar10_{cls}_<index>.aedat", title="a CIFAR10-DVS",
                             expected="expected <class>/cifar10_<class>_<index>.aedat for the 10 CIFAR-10 classes")


def nmnist_recordings(root):
    """N-MNIST: ``Train/<digit>/*.bin`` and ``Test/<digit>/*.bin``, label = the digit."""
    root = Path(root)
    _check_root(root)
    expected = "expected Train/<digit>/*.bin and Test/<digit>/*.bin for the digits 0-9"
    missing = [name for name in ("Train", "Test") if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"{root}: not an N-MNIST root: missing {' and '.join(missing)} ({expected})")
    recordings, ignored = [], sorted(e.name + ("/" if e.is_dir() else "") for e in _visible(root)
                                     if e.name not in ("Train", "Test"))
    for folder, split in (("Train", "train"), ("Test", "test")):
        found, _, extra = folder_recordings(root / folder, ".bin", split, DIGITS, base=root,
                                            title="an N-MNIST split", expected=expected)
        recordings += found
        ignored += extra
    return recordings, list(DIGITS), ignored


def ncaltech101_root(root) -> Path:
    """The class root of N-Caltech101: ``root/Caltech101`` if it exists (so the archive's
    ``Caltech101_annotations`` beside it is never read), else ``root``."""
    root = Path(root)
    return root / "Caltech101" if (root / "Caltech101").is_dir() else root


def _listing(dataset: str, root: Path, split: str, reader: str | None):
    """``(recordings, classes, ignored)`` of a file-per-sample dataset."""
    if dataset == "cifar10-dvs":
        return cifar10dvs_recordings(root, split)
    if dataset == "n-mnist":
        return nmnist_recordings(root)
    if split not in ("tet", "tebn"):
        raise ValueError(f"split must be 'tet' or 'tebn', got {split!r}")
    return folder_recordings(root, READERS[reader][1], split)


def _reader(name: str):
    """The reader called ``name``, looked up in this module when called (so it can be replaced)."""
    attr = READERS[name][0].__name__
    return lambda path: globals()[attr](path)


def _file_framer(root: Path, read, T: int, split_by: str, sensor_size, reduce_to: int | None):
    """Frames of one file: counts at sensor resolution, or their cell sums for ``reduce_to``."""
    def frame(recording: Recording):
        path = root / recording.file
        frames = _counts(read(path), T, split_by, path, sensor_size)
        if reduce_to is not None:
            frames = cell_sums(frames, reduce_to)
        return frames[None], [{"label": recording.label}]
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
            frames.append(_counts(window, T, split_by, path, SENSOR_SIZE))
            samples.append({"label": label, "start": start, "end": end, "line": line})
        return np.stack(frames), samples
    return frame


# --- cache and public entry points ----------------------------------------------------------------

def _positive(name, value):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _sensor(dataset: str, sensor_size):
    """The ``(H, W)`` of a dataset: fixed by its spec, or the user's for ``event-folder``."""
    fixed = SPECS[dataset].sensor_size
    if fixed is not None:
        if sensor_size is not None and tuple(sensor_size) != fixed:
            raise ValueError(f"{dataset}: sensor_size is fixed at {fixed}, got {tuple(sensor_size)}")
        return fixed
    if sensor_size is None:
        raise ValueError(f"{dataset}: sensor_size (H, W) is required")
    try:
        H, W = sensor_size
        return _positive("sensor_size H", H), _positive("sensor_size W", W)
    except (TypeError, ValueError):
        raise ValueError(f"sensor_size must be two positive integers (H, W), got {sensor_size!r}") from None


def build_cache(dataset: str, root, T: int | None = None, split: str = "tet", cache_dir=None,
                on_error: str = "raise", split_by: str = "count", workers: int | None = None, *,
                size: int | None = None, reader: str | None = None, sensor_size=None):
    """Build (or find) the cache of ``dataset`` (a key of ``SPECS``) for both splits.

    Returns ``(directory, manifest)``. ``split`` applies to the datasets without an official split
    (CIFAR10-DVS, N-Caltech101, event-folder). ``reader`` and ``sensor_size`` (H, W) are for
    ``event-folder`` only. ``size`` (default: the dataset's) matters only for a dataset whose cache
    is stored reduced (N-Caltech101, event-folder): then, when below the sensor, the cache holds
    the cell sums of pooling to ``size`` x ``size`` (uint32) instead of the counts.
    """
    if dataset not in SPECS:
        raise ValueError(f"unknown event dataset {dataset!r}; expected one of {', '.join(SPECS)}")
    spec = SPECS[dataset]
    T = _positive("T", spec.T if T is None else T)
    size = _positive("size", spec.size if size is None else size)
    if split_by not in ("count", "time"):
        raise ValueError(f"split_by must be 'count' or 'time', got {split_by!r}")
    if spec.reader is not None and reader not in (None, spec.reader):
        raise ValueError(f"{dataset}: the reader is fixed ({spec.reader}), got {reader!r}")
    reader = spec.reader if reader is None else reader
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, got {reader!r}")
    sensor = _sensor(dataset, sensor_size)
    root = Path(root).expanduser()
    if dataset == "n-caltech101":
        root = ncaltech101_root(root)
    params = {"T": T, "split_by": split_by, "sensor_size": list(sensor)}
    if dataset == "dvs-gesture":
        return ensure_cache(dataset, root, gesture_recordings(root), _gesture_framer(root, T, split_by), params,
                            cache_dir, on_error, workers)
    recordings, classes, ignored = _listing(dataset, root, split, reader)
    if dataset != "n-mnist":
        params["split"] = split
    if dataset == "event-folder":
        params["reader"] = reader
    params["classes"] = classes
    reduce_to = size if spec.reduce and can_reduce(sensor, size) else None
    if reduce_to is not None:
        params["reduced_to"] = reduce_to
    framer = _file_framer(root, _reader(reader), T, split_by, sensor, reduce_to)
    return ensure_cache(dataset, root, recordings, framer, params, cache_dir, on_error, workers,
                        dtype="uint32" if reduce_to else "uint16", ignored=ignored)


def load_frames(dataset: str, root, train: bool, T: int | None = None, split: str = "tet", cache_dir=None,
                on_error: str = "raise", split_by: str = "count", workers: int | None = None, **kw):
    """Cached frames of one split: ``(memmap [N, T, 2, H, W], int64 labels [N])``: uint16 counts
    at sensor resolution, or uint32 cell sums ``[N, T, 2, size, size]`` for a reduced cache (pass
    the sensor size to ``batch_transform`` for those). Builds the cache on first use (see
    :func:`build_cache`, which also takes ``size``, ``reader`` and ``sensor_size``)."""
    directory, manifest = build_cache(dataset, root, T, split, cache_dir, on_error, split_by, workers, **kw)
    return open_split(directory, manifest["splits"]["train" if train else "test"])


class _EventDataset(torch.utils.data.Dataset):
    """Map-style dataset over a cache: items are ``(float32 [T, 2, size, size], int label)``."""
    name = ""
    classes: tuple = ()

    def __init__(self, root, train, T, size, norm, cache_dir, on_error, split_by, workers, **source):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if norm not in ("max", None):
            raise ValueError(f"norm must be 'max' or None, got {norm!r}")
        self.train, self.T, self.size, self.norm = bool(train), T, int(size), norm
        self.directory, manifest = build_cache(self.name, root, T, cache_dir=cache_dir, on_error=on_error,
                                               split_by=split_by, workers=workers, size=self.size, **source)
        self.sensor_size = tuple(manifest["params"]["sensor_size"])
        if "classes" in manifest["params"]:
            self.classes = tuple(manifest["params"]["classes"])
        self.info = manifest["splits"]["train" if train else "test"]
        self.labels = np.asarray(self.info["labels"], dtype=np.int64)
        self.skipped = manifest["skipped"]
        self.ignored = manifest.get("ignored", [])
        self._frames = None

    @property
    def frames(self) -> np.ndarray:
        """The split's cached frames, a read-only memmap ``[N, T, 2, H, W]`` (see ``load_frames``)."""
        if self._frames is None:  # opened lazily, so worker processes map the file themselves
            self._frames, _ = open_split(self.directory, self.info)
        return self._frames

    def __getstate__(self):
        return {**self.__dict__, "_frames": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        counts = torch.from_numpy(self.frames[index].astype(np.int64))
        x = batch_transform(counts[None], self.size, self.norm, sensor_size=self.sensor_size)[0]
        return x, int(self.labels[index])


class EventFolder(_EventDataset):
    """Any folder of recordings laid out as ``<class>/<recording>``.

    ``reader``: ``"aedat2"``, ``"aedat31"`` (``.aedat`` files), ``"atis"`` (``.bin``) or ``"npy"``
    (structured arrays with fields t, x, y, p, as tonic writes them); ``sensor_size`` is (H, W).
    Classes are the visible subfolders sorted case-sensitively; per class, in natural file order,
    ``split="tet"`` trains on the first floor(0.9 n + 0.5) recordings (``"tebn"``: tests on the
    first floor(0.1 n + 0.5)). Files with another suffix are ignored (listed in ``ignored``).
    """
    name = "event-folder"

    def __init__(self, root, train=True, reader="npy", sensor_size=None, T=10, size=48, norm="max",
                 split="tet", cache_dir=None, on_error="raise", split_by="count", workers=None):
        super().__init__(root, train, T, size, norm, cache_dir, on_error, split_by, workers, split=split,
                         reader=reader, sensor_size=sensor_size)


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
        super().__init__(root, train, T, size, norm, cache_dir, on_error, split_by, workers, split=split)


class NMNIST(_EventDataset):
    """N-MNIST from ``root/Train/<digit>/*.bin`` and ``root/Test/<digit>/*.bin`` (ATIS, 34 x 34).

    The default ``size=34`` keeps the sensor resolution (no pooling)."""
    name = "n-mnist"
    classes = DIGITS

    def __init__(self, root, train=True, T=10, size=34, norm="max", cache_dir=None, on_error="raise",
                 split_by="count", workers=None):
        super().__init__(root, train, T, size, norm, cache_dir, on_error, split_by, workers)


class NCaltech101(_EventDataset):
    """N-Caltech101 from one folder per class of ``image_NNNN.bin`` (ATIS, sensor 180 x 240).

    ``root`` may be the extracted archive (its ``Caltech101/`` folder is then the class root).
    Labels are the class folders sorted case-sensitively (``BACKGROUND_Google`` included); per
    class, in natural file order, the first floor(0.9 n + 0.5) recordings train. The cache holds
    the frames reduced to ``size`` (cell sums of the adaptive average pooling), which gives the
    same items as pooling the counts.
    """
    name = "n-caltech101"

    def __init__(self, root, train=True, T=10, size=48, norm="max", split="tet", cache_dir=None,
                 on_error="raise", split_by="count", workers=None):
        super().__init__(root, train, T, size, norm, cache_dir, on_error, split_by, workers, split=split)


class DVSGesture(_EventDataset):
    """DVS128 Gesture from the original ``DvsGesture`` folder (11 classes; users 1-23 train).

    One sample per labels-CSV row: the events with ``start <= t < end``.
    """
    name = "dvs-gesture"
    classes = GESTURE_CLASSES

    def __init__(self, root, train=True, T=16, size=48, norm="max", cache_dir=None, on_error="raise",
                 split_by="count", workers=None):
        super().__init__(root, train, T, size, norm, cache_dir, on_error, split_by, workers)
