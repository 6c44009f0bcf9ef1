"""Batch iterators for training and evaluation, the same for one process or many (DDP).

A loader yields on-device float batches ``x`` (``[N, C, H, W]`` static, ``[N, T, C, H, W]`` events)
and int64 labels ``y``. Training order comes from ``DistributedSampler`` (shuffled by seed and
epoch); evaluation gives rank r the samples r, r+K, r+2K, ... so every test sample is seen exactly
once. The training augmentation of batch b draws from a generator seeded by (seed, epoch, b, rank),
so a run resumed at any step sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["BatchLoader", "FolderLoader", "EventFrames", "batch_seed"]


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
    """``fetch`` for cached event frames ``[N, T, 2, H, W]`` (memory-mapped counts, or the cell sums of
    a reduced cache of a ``sensor_size`` sensor): index on the CPU, move the batch to the device,
    resize, scale and (training only) flip and roll there, as the dataset's spec says."""

    def __init__(self, frames, labels, dataset: str, device, sensor_size=None):
        from .events import SPECS

        self.frames, self.labels, self.device = frames, torch.as_tensor(labels, dtype=torch.int64), device
        self.spec = SPECS[dataset]
        self.sensor_size = sensor_size or self.spec.sensor_size

    def __len__(self):
        return len(self.labels)

    def __call__(self, idx: torch.Tensor, generator=None):
        from .events import batch_transform

        x = torch.from_numpy(np.asarray(self.frames[idx.numpy()])).to(self.device)
        train = generator is not None
        x = batch_transform(x, size=self.spec.size, norm="max", flip=train and self.spec.flip,
                            roll=self.spec.roll if train else 0, generator=generator, sensor_size=self.sensor_size)
        return x, self.labels[idx].to(self.device)
