"""Batch iterators for training and evaluation, the same for one process or many (DDP).

A loader yields on-device float batches ``x`` (``[N, C, H, W]`` static, ``[N, T, C, H, W]`` events)
and int64 labels ``y``. Evaluation gives rank r of K the samples r, r+K, r+2K, ... so every test
sample is seen exactly once.

Training is defined by global batches, whatever the number of processes K:

- the epoch's order is a permutation of the N sample indices drawn from (seed, epoch), not padded;
- global batch b is ``order[b*G:(b+1)*G]`` with G = K x the per-rank batch size;
- rank r takes the contiguous slice ``[r*m//K, (r+1)*m//K)`` of a global batch of m samples (G/K
  samples each, except in the last, short batch, where slice sizes differ by at most one);
- a last batch with fewer samples than processes (m < K) is dropped, so no rank is ever empty;
- each sample's augmentation draws depend only on (seed, epoch, sample index) (``SampleRandom``).

So the union over the ranks of step b's (index, augmented input) is the single-process batch b of
the same global batch size, and a run can resume at any global step on any number of processes.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from .draws import SampleRandom

__all__ = ["BatchLoader", "FolderLoader", "EventFrames", "epoch_order"]


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of an epoch: a permutation drawn from ``seed + epoch``."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))


class BatchLoader:
    """Splits sample indices into this rank's batches and turns each into tensors with ``fetch``.

    ``batch_size`` is per rank (the global batch is ``batch_size * world_size``);
    ``fetch(indices, draws)`` gets a ``SampleRandom`` for training and None for evaluation."""

    def __init__(self, num_samples: int, batch_size: int, fetch: Callable, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device="cpu"):
        self.num_samples, self.batch_size, self.fetch = num_samples, batch_size, fetch
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.device = torch.device(device)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0):
        """Select the epoch's order; iteration begins at (global) step ``start`` (for a resumed run)."""
        self.epoch, self.start = epoch, start

    def global_size(self, step: int) -> int:
        """The number of samples in global training batch ``step`` (over all ranks)."""
        g = self.batch_size * self.world_size
        return min(g, self.num_samples - step * g)

    def __len__(self):
        if not self.train:
            return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)
        g = self.batch_size * self.world_size
        steps = math.ceil(self.num_samples / g)
        return steps - 1 if steps and self.global_size(steps - 1) < self.world_size else steps

    def batches(self):
        """``(step, this rank's sample indices)`` from ``start`` to the end of the epoch."""
        if not self.train:
            idx = torch.arange(self.rank, self.num_samples, self.world_size)
            for b in range(self.start, len(self)):
                yield b, idx[b * self.batch_size:(b + 1) * self.batch_size]
            return
        order, g, k = epoch_order(self.num_samples, self.seed, self.epoch), self.batch_size * self.world_size, self.world_size
        for b in range(self.start, len(self)):
            m = self.global_size(b)
            yield b, order[b * g + self.rank * m // k:b * g + (self.rank + 1) * m // k]

    def __iter__(self):
        for b, idx in self.batches():
            yield self.fetch(idx, SampleRandom(self.seed, self.epoch, idx) if self.train else None)


class SeededSamples(torch.utils.data.Dataset):
    """A dataset whose random transforms (torchvision's, drawing from torch's global generator) are
    seeded per sample by (seed, epoch, index), whichever rank or worker loads the sample."""

    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1)[0]))
            return self.dataset[i]


class FolderLoader(BatchLoader):
    """ImageNet: the same index batches, loaded and augmented per sample by DataLoader workers."""

    def __init__(self, dataset, batch_size, *, workers: int = 4, **kw):
        super().__init__(len(dataset), batch_size, None, **kw)
        self.dataset, self.workers = dataset, workers

    def __iter__(self):
        batches = [idx.tolist() for _, idx in self.batches()]
        dataset = SeededSamples(self.dataset, self.seed, self.epoch) if self.train else self.dataset
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class EventFrames:
    """``fetch`` for cached event frames ``[N, T, 2, H, W]`` (memory-mapped counts, or the cell sums of
    a reduced cache of a ``sensor_size`` sensor): index on the CPU, move the batch to the device,
    resize, scale and (training only) flip and roll there, as the dataset's spec says."""

    def __init__(self, frames, labels, dataset: str, device, sensor_size=None, size=None):
        from .events import SPECS

        self.frames, self.labels, self.device = frames, torch.as_tensor(labels, dtype=torch.int64), device
        self.spec = SPECS[dataset]
        self.sensor_size = sensor_size or self.spec.sensor_size
        self.size = size or self.spec.size

    def __len__(self):
        return len(self.labels)

    def __call__(self, idx: torch.Tensor, generator=None):
        from .events import batch_transform

        x = torch.from_numpy(np.asarray(self.frames[idx.numpy()])).to(self.device)
        train = generator is not None
        x = batch_transform(x, size=self.size, norm="max", flip=train and self.spec.flip,
                            roll=self.spec.roll if train else 0, generator=generator, sensor_size=self.sensor_size)
        return x, self.labels[idx].to(self.device)
