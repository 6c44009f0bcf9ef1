"""Batch iterators for training and evaluation, the same for one process or many (DDP).

A loader yields on-device float batches ``x`` (``[N, C, H, W]`` static, ``[N, T, C, H, W]`` events)
and int64 labels ``y``. Training order comes from ``DistributedSampler`` (shuffled by seed and
epoch); evaluation gives rank r the samples r, r+K, r+2K, ... so every test sample is seen exactly
once. The training augmentation of batch b draws from a generator seeded by (seed, epoch, b, rank),
so a run resumed at any step sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import DATASETS, ConfigError
from ..distributed import main_process_first
from .static import DataError, StaticImages, imagenet_folders, load_cifar, load_digits

__all__ = ["BatchLoader", "FolderLoader", "EventFrames", "Data", "build_data", "batch_seed"]

# event datasets: input size after pooling and the training augmentation of tetsnn's presets
EVENTS = {"cifar10-dvs": dict(size=48, flip=True, roll=5), "dvs-gesture": dict(size=48, flip=False, roll=5)}


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1, np.uint64)[0] >> 1)


class BatchLoader:
    """Splits sample indices into this rank's batches and turns each into tensors with ``fetch``."""

    def __init__(self, num_samples: int, batch_size: int, fetch: Callable, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device="cpu"):
        self.num_samples, self.batch_size, self.fetch = num_samples, batch_size, fetch
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.device = torch.device(device)
        self.sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed) if train else None
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        """Select the epoch's order; iteration begins at batch ``start`` (for a resumed run)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> torch.Tensor:
        if self.sampler is None:
            return torch.arange(self.rank, self.num_samples, self.world_size)
        self.sampler.set_epoch(self.epoch)
        return torch.tensor(list(self.sampler), dtype=torch.int64)

    def __len__(self):
        return math.ceil(len(self.indices()) / self.batch_size)

    def batches(self):
        idx = self.indices()
        for b in range(self.start, math.ceil(len(idx) / self.batch_size)):
            yield b, idx[b * self.batch_size:(b + 1) * self.batch_size]

    def __iter__(self):
        for b, idx in self.batches():
            gen = None
            if self.train:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(batch_seed(self.seed, self.epoch, b, self.rank))
            yield self.fetch(idx, gen)


class FolderLoader(BatchLoader):
    """ImageNet: the same index batches, loaded and augmented per sample by DataLoader workers."""

    def __init__(self, dataset, batch_size, *, workers: int = 4, **kw):
        super().__init__(len(dataset), batch_size, None, **kw)
        self.dataset, self.workers = dataset, workers

    def __iter__(self):
        batches = [idx.tolist() for _, idx in self.batches()]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class EventFrames:
    """``fetch`` for event frames ``[N, T, 2, 128, 128]`` (uint16 counts, memory-mapped): index on the
    CPU, move the batch to the device, resize, scale and (training only) flip and roll there."""

    def __init__(self, frames, labels, dataset: str, device):
        self.frames, self.labels, self.device = frames, torch.as_tensor(labels, dtype=torch.int64), device
        self.spec = EVENTS[dataset]

    def __len__(self):
        return len(self.labels)

    def __call__(self, idx: torch.Tensor, generator=None):
        from .events import batch_transform

        x = torch.from_numpy(np.asarray(self.frames[idx.numpy()])).to(self.device)
        train = generator is not None
        x = batch_transform(x, size=self.spec["size"], norm="max", flip=train and self.spec["flip"],
                            roll=self.spec["roll"] if train else 0, generator=generator)
        return x, self.labels[idx].to(self.device)


class Data(NamedTuple):
    train: BatchLoader
    test: BatchLoader
    num_classes: int
    info: dict       # what the run records about its data (sizes, split)


def _limit(n, limit):
    return n if not limit else min(n, limit)


def _data_dir(cfg):
    if cfg["data_dir"] is not None:
        return os.path.expanduser(cfg["data_dir"])
    if cfg["dataset"] in ("cifar10", "cifar100"):
        return os.path.join("data", cfg["dataset"])
    raise DataError(f"{cfg['dataset']} needs --data-dir (the folder holding its files)")


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
        from .events import load_frames

        root = _data_dir(cfg)
        if not os.path.isdir(root):
            raise DataError(f"{name}: data directory not found: {root}")
        kw = dict(T=cfg["T"], split=cfg["split"], cache_dir=cfg["cache_dir"])
        fte, yte = load_frames(name, root, train=False, **kw)
        ftr, ytr = load_frames(name, root, train=True, **kw) if with_train else (None, [])
        info = dict(root=root, split=cfg["split"], train_size=len(ytr), test_size=len(yte))
        train = EventFrames(ftr, ytr, name, device) if with_train else None
        return train, EventFrames(fte, yte, name, device), info
    train = StaticImages(xtr, ytr, name, device) if with_train else None
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
        train_set, test_set = imagenet_folders(_data_dir(cfg), with_train=train)
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
