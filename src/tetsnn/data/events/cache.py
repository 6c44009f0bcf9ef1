"""The frame cache: event counts at sensor resolution (uint16), or their per-cell sums when stored
reduced (uint32), one memory-mappable file per split.

A cache lives in ``<cache_dir>/<dataset>-<key>/``, where ``key`` hashes every framing parameter,
the root, each recording's split, the name, size and modification time of every source file and
the names of the ignored files, so any change builds a new cache. It holds ``train.u16`` and
``test.u16`` (raw C-order data, ``.u32`` for uint32; dtype and shape in the manifest) and
``manifest.json`` (parameters, source files, per-sample origin and label, skipped and ignored files).

It is built in ``.<dataset>-<key>.tmp-<pid>/`` next to it and renamed into place (os.replace)
only when complete, so a directory at the final name is always a finished cache. A build holds the
lock ``.<dataset>-<key>.lock`` (``fcntl.flock``): a second build of the same cache waits for it and
then uses its result, and a build removes the temporary folders whose cache lock is free (their
builder is gone), never one of a live build. A build removes its own temporary folder on any error
and on SIGTERM / SIGINT, which stop it between recordings (``Interrupted``). I/O failures are
``FileWriteError``s naming the path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...utils import FileWriteError, FolderLock, Interrupted, make_folder, pause_point, stop_on_signals, write_error

__all__ = ["Recording", "default_cache_dir", "ensure_cache", "open_split"]

CACHE_VERSION = 1
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Recording:
    """One source recording: its path under the root, its split, and every file it depends on."""
    file: str
    split: str
    label: int | None = None                   # known from the folder (CIFAR10-DVS) or None
    sources: tuple = field(default_factory=tuple)  # extra files it reads, relative to the root


def default_cache_dir() -> Path:
    """``$TETSNN_CACHE`` (when set and not empty), else ``~/.cache/tetsnn``."""
    return Path(os.environ.get("TETSNN_CACHE") or Path.home() / ".cache" / "tetsnn")


def _fingerprint(root: Path, recordings) -> list:
    """``[name, size, mtime_ns]`` of every source file (``None`` for a missing one)."""
    names = sorted({name for r in recordings for name in (r.file, *r.sources)})
    out = []
    for name in names:
        try:
            st = (root / name).stat()
            out.append([name, st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([name, None, None])
    return out


def _cache_key(dataset: str, root: Path, params: dict, recordings, sources: list, ignored: list) -> str:
    splits = [[r.file, r.split] for r in recordings]
    blob = json.dumps([CACHE_VERSION, dataset, str(root), params, splits, sources] + ([ignored] if ignored else []),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_complete(directory: Path, manifest: dict) -> bool:
    for info in manifest.get("splits", {}).values():
        expected = int(np.prod(info["shape"])) * np.dtype(info["dtype"]).itemsize
        path = directory / info["file"]
        if not path.is_file() or path.stat().st_size != expected:
            return False
    return set(manifest.get("splits", {})) == set(SPLITS)


def _read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if _is_complete(directory, manifest) else None


def _ordered_map(fn, items, workers: int):
    """``map(fn, items)`` on a thread pool, in order, with at most ``2 * workers`` in flight."""
    pool = ThreadPoolExecutor(workers)
    pending = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _build(directory: Path, dataset: str, recordings, frame_fn, on_error: str, workers: int, dtype,
           should_stop=lambda: False) -> dict:
    """Frame every recording into ``directory``; return the manifest (not yet written). Raises
    Interrupted after the recording during which ``should_stop()`` turned true."""
    def attempt(recording):
        try:
            return frame_fn(recording), None
        except ValueError as error:
            return None, error

    dtype = np.dtype(dtype)
    suffix = f"u{8 * dtype.itemsize}"
    outputs = {s: open(directory / f"{s}.{suffix}", "wb") for s in SPLITS}
    splits = {s: {"file": f"{s}.{suffix}", "dtype": dtype.name, "shape": None, "labels": [], "samples": []}
              for s in SPLITS}
    skipped, sample_shape = [], None
    results = _ordered_map(attempt, recordings, workers)
    try:
        for done, (recording, (result, error)) in enumerate(tqdm(
                zip(recordings, results), total=len(recordings), desc=f"{dataset}: framing", unit="file",
                disable=None)):
            if done:
                pause_point("cache", done)
            if should_stop():
                raise Interrupted(f"stopped by signal while building the frame cache in {directory.parent}; "
                                  f"its temporary folder was removed")
            if error is not None:
                if on_error == "raise":
                    raise error
                skipped.append({"file": recording.file, "error": str(error)})
                continue
            frames, samples = result
            sample_shape = list(frames.shape[1:])
            outputs[recording.split].write(np.ascontiguousarray(frames, dtype=dtype).data)
            splits[recording.split]["labels"] += [s["label"] for s in samples]
            splits[recording.split]["samples"] += [{"file": recording.file, **s} for s in samples]
    finally:
        results.close()  # stops the pool now, also when an error propagates
        for f in outputs.values():
            f.close()
    if sample_shape is None:
        raise ValueError(f"{dataset}: no recording could be read ({len(skipped)} skipped)")
    for info in splits.values():
        info["shape"] = [len(info["labels"])] + sample_shape
    return {"splits": splits, "skipped": skipped}


def ensure_cache(dataset: str, root, recordings, frame_fn, params: dict, cache_dir=None,
                 on_error: str = "raise", workers: int | None = None, dtype="uint16",
                 ignored=()) -> tuple[Path, dict]:
    """Return ``(directory, manifest)`` of the cache for these recordings, building it if needed.

    ``frame_fn(recording) -> (frames [k, T, 2, H, W] of ``dtype``, [k sample dicts with a "label"])``
    raises ValueError (naming the file) for bad input; ``on_error="skip"`` leaves such recordings
    out and lists them in the manifest. Recordings are framed in parallel on a thread pool and
    written in their listed order. ``ignored`` names the files under the root that are not
    recordings (listed in the manifest).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = Path(root).resolve()
    sources = _fingerprint(root, recordings)
    ignored = sorted(ignored)
    key = _cache_key(dataset, root, params, recordings, sources, ignored)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = base / f"{dataset}-{key}"
    manifest = _read_manifest(directory)
    if manifest is None:
        make_folder(base)
        with stop_on_signals() as should_stop, _cache_lock(directory, should_stop):
            manifest = _read_manifest(directory)      # another process may have built it meanwhile
            _remove_orphans(base, held=directory.name)
            if manifest is None:
                manifest = _build_atomically(directory, dataset, root, recordings, frame_fn, params, sources,
                                             on_error, workers, dtype, ignored, should_stop)
    if manifest["skipped"] and on_error == "raise":
        first = manifest["skipped"][0]
        raise ValueError(f"the cache {directory} was built with on_error='skip' and left out "
                         f"{len(manifest['skipped'])} file(s), e.g. {first['error']}; "
                         f"pass on_error='skip' to use it")
    return directory, manifest


def _lock_path(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.lock"


class _cache_lock:
    """Hold the build lock of the cache ``directory``, waiting (and checking ``should_stop``) while
    another live process builds it."""

    def __init__(self, directory: Path, should_stop):
        self.lock, self.should_stop = FolderLock(_lock_path(directory)), should_stop
        self.directory = directory

    def __enter__(self):
        said = False
        while not self.lock.try_acquire():
            if self.should_stop():
                raise Interrupted(f"stopped by signal while waiting for the frame cache {self.directory}")
            if not said:
                print(f"waiting for the build of {self.directory} by {self.lock.holder()}", flush=True)
                said = True
            time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.lock.release()


_TEMP_FOLDER = re.compile(r"^\.(.+)\.tmp-\d+$")


def _remove_orphans(base: Path, held: str) -> list:
    """Remove the temporary build folders in ``base`` whose cache lock is free (their builder is
    gone; a live build holds its lock), and those of the cache ``held``, whose lock the caller
    holds. Returns the names removed."""
    removed = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return removed
    for name in names:
        match = _TEMP_FOLDER.match(name)
        if not match or not (base / name).is_dir():
            continue
        if match.group(1) == held:
            shutil.rmtree(base / name, ignore_errors=True)
            removed.append(name)
            continue
        lock = FolderLock(base / f".{match.group(1)}.lock")
        try:
            if not lock.try_acquire():
                continue           # a live build of that cache
        except FileWriteError:
            continue
        try:
            shutil.rmtree(base / name, ignore_errors=True)
            removed.append(name)
        finally:
            lock.release()
    return removed


def _build_atomically(directory, dataset, root, recordings, frame_fn, params, sources, on_error, workers,
                      dtype, ignored, should_stop=lambda: False):
    """Build into ``.<name>.tmp-<pid>`` and rename it into place; the caller holds the cache lock."""
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    try:
        if directory.exists():  # not a cache this code wrote: replace it
            shutil.rmtree(directory)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise write_error(directory.parent, e, "build the frame cache in") from None
    try:
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        built = _build(tmp, dataset, recordings, frame_fn, on_error, max(1, int(workers)), dtype, should_stop)
        manifest = {"version": CACHE_VERSION, "dataset": dataset, "root": str(root), "params": params,
                    "sources": sources, **built, "ignored": ignored}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        os.replace(tmp, directory)
    except OSError as e:
        if isinstance(e, FileWriteError):
            raise
        source = getattr(e, "filename", None)
        if source and not os.fspath(source).startswith(os.fspath(tmp)):
            raise write_error(source, e, "read") from None     # a source recording
        raise write_error(directory, e, "write the frame cache") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if manifest["skipped"]:
        names = ", ".join(s["file"] for s in manifest["skipped"][:5])
        warnings.warn(f"{dataset}: skipped {len(manifest['skipped'])} unreadable file(s): {names}"
                      f"{' ...' if len(manifest['skipped']) > 5 else ''} (listed in {directory}/manifest.json)",
                      stacklevel=3)
    return manifest


def open_split(directory: Path, info: dict):
    """``(frames, labels)`` of a split (``manifest["splits"][name]``): a read-only memmap
    ``[N, T, 2, H, W]`` (uint16 counts, or uint32 cell sums) and int64 labels ``[N]``."""
    shape = tuple(info["shape"])
    labels = np.asarray(info["labels"], dtype=np.int64)
    if shape[0] == 0:  # mmap cannot map an empty file
        return np.zeros(shape, dtype=info["dtype"]), labels
    return np.memmap(directory / info["file"], dtype=info["dtype"], mode="r", shape=shape), labels
