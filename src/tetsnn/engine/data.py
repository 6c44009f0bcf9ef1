"""The data of a run: ``build_data(cfg, device, rank, world_size)`` gives the training and test batch
iterators of a config's dataset (see ``tetsnn.data.loader`` for how batches are drawn)."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ..data.loader import BatchLoader, EventFrames, FolderLoader
from ..data.static import DataError, StaticImages, imagenet_folders, load_cifar, load_digits
from .config import DATASETS, ConfigError
from .distributed import main_process_first

__all__ = ["Data", "build_data", "default_data_dir", "event_cache_args"]


class Data(NamedTuple):
    train: BatchLoader
    test: BatchLoader
    num_classes: int
    info: dict       # what the run records about its data (sizes, split)


def _limit(n, limit):
    return n if not limit else min(n, limit)


def default_data_dir(dataset: str):
    """Where a dataset lives when no data_dir is given (CIFAR: ``data/<name>``), or None."""
    return os.path.join("data", dataset) if dataset in ("cifar10", "cifar100") else None


def _data_dir(cfg):
    if cfg["data_dir"] is not None:
        return os.path.expanduser(cfg["data_dir"])
    if default_data_dir(cfg["dataset"]):
        return default_data_dir(cfg["dataset"])
    raise DataError(f"{cfg['dataset']} needs --data-dir (the folder holding its files)")


def event_cache_args(cfg: dict) -> dict:
    """The ``build_cache`` / ``load_frames`` arguments of an event dataset's config: ``tetsnn
    preprocess`` and ``tetsnn train`` with the same keys build and read the same cache."""
    root = _data_dir(cfg)
    if not os.path.isdir(root):
        raise DataError(f"{cfg['dataset']}: data directory not found: {root}")
    kw = dict(dataset=cfg["dataset"], root=root, T=cfg["T"], split=cfg["split"], cache_dir=cfg["cache_dir"],
              on_error=cfg["on_error"], split_by=cfg["split_by"], size=cfg["size"])
    if cfg["dataset"] == "event-folder":   # a user's folder: its reader and sensor come from the config
        kw.update(reader=cfg["reader"], sensor_size=tuple(cfg["sensor_size"]))
    return kw


def _splits(cfg, device, with_train=True):
    """(train fetch or None, test fetch, info) for the config's dataset."""
    name = cfg["dataset"]
    kind = DATASETS[name]["kind"]
    if name == "digits":
        xtr, ytr, xte, yte, info = load_digits()
    elif kind == "static":  # CIFAR10/100
        root = _data_dir(cfg)
        xte, yte = load_cifar(name, root, train=False, download=cfg["download"])
        xtr, ytr = load_cifar(name, root, train=True, download=False) if with_train else ([], [])
        info = dict(root=root, train_size=len(ytr), test_size=len(yte))
    elif kind == "events":
        from ..data.events import load_frames

        kw = event_cache_args(cfg)
        try:   # a bad recording (or a cache built skipping some) is one line naming the file
            fte, yte = load_frames(train=False, **kw)
            ftr, ytr = load_frames(train=True, **kw) if with_train else (None, [])
        except DataError:
            raise
        except ValueError as e:
            raise DataError(str(e)) from None
        info = dict(root=kw["root"], split=cfg["split"], train_size=len(ytr), test_size=len(yte))
        sensor, size = kw.get("sensor_size"), cfg["size"]
        train = EventFrames(ftr, ytr, name, device, sensor, size) if with_train else None
        return train, EventFrames(fte, yte, name, device, sensor, size), info
    recipe = dict(randaugment=cfg.get("randaugment"), random_erasing=cfg.get("random_erasing", 0.0))
    train = StaticImages(xtr, ytr, name, device, **recipe) if with_train else None
    return train, StaticImages(xte, yte, name, device), info


def build_data(cfg: dict, device="cpu", rank: int = 0, world_size: int = 1, train: bool = True) -> Data:
    """Training and test loaders for ``cfg`` (its dataset, data_dir, T, batch_size, seed, limits).

    ``batch_size`` is global: each of the ``world_size`` ranks gets ``batch_size // world_size``.
    With ``train=False`` only the test set is loaded (``Data.train`` is None)."""
    if cfg["batch_size"] % world_size:
        raise ConfigError(f"bad value for batch_size: {cfg['batch_size']} (not divisible by the {world_size} processes)")
    bs = cfg["batch_size"] // world_size
    common = dict(seed=cfg["seed"], rank=rank, world_size=world_size, device=device)
    if DATASETS[cfg["dataset"]]["kind"] == "folder":
        train_set, test_set = imagenet_folders(_data_dir(cfg), with_train=train, randaugment=cfg.get("randaugment"),
                                               random_erasing=cfg.get("random_erasing", 0.0))
        if train and cfg["limit_train"]:
            train_set = torch.utils.data.Subset(train_set, range(_limit(len(train_set), cfg["limit_train"])))
        if cfg["limit_test"]:
            test_set = torch.utils.data.Subset(test_set, range(_limit(len(test_set), cfg["limit_test"])))
        info = dict(root=_data_dir(cfg), train_used=len(train_set or []), test_used=len(test_set))
        train_loader = FolderLoader(train_set, bs, workers=cfg["workers"], train=True, **common) if train else None
        test = FolderLoader(test_set, bs, workers=cfg["workers"], train=False, **common)
        return Data(train_loader, test, cfg["num_classes"], info)
    with main_process_first():     # one rank downloads or builds the cache, the others reuse it
        train_fetch, test_fetch, info = _splits(cfg, device, with_train=train)
    n_test = _limit(len(test_fetch), cfg["limit_test"])
    n_train = _limit(len(train_fetch), cfg["limit_train"]) if train else 0
    info.update(train_used=n_train, test_used=n_test)
    train_loader = BatchLoader(n_train, bs, train_fetch, train=True, **common) if train else None
    test = BatchLoader(n_test, bs, test_fetch, train=False, **common)
    return Data(train_loader, test, cfg["num_classes"], info)
