"""Per-sample random draws that depend only on (seed, epoch, sample index, draw number).

Training augmentation must not depend on how a batch is split over processes: the sample with
dataset index ``i`` in epoch ``e`` is augmented the same way whether one process or eight train on
it. A ``torch.Generator`` per batch cannot give that (its draws depend on the sample's position in
the batch), so ``SampleRandom`` computes each value with a counter-based hash instead:

    u32(i, d) = h(h(i xor k0(d)) + k1(d))      k0, k1: two 32-bit words of SeedSequence([seed, epoch, d])

where ``d`` counts the draws made for the batch (0 for the first ``rand``/``randint`` call, ...)
and ``h`` is a 32-bit integer mixer (xor-shift / multiply, "lowbias32"). A uniform in [0, 1) is
``(u32 >> 8) / 2**24``; an integer in ``[low, high)`` is ``low + (u32 * (high - low)) >> 32``.
Everything is vectorised over the batch on its device, in int64 with no overflow: products are
split into 16-bit halves.

``rand(source, n, device)`` and ``randint(source, low, high, n, device)`` accept either a
``SampleRandom`` (per-sample draws) or a plain ``torch.Generator`` (draws in batch order), so the
augmentation functions take either.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["SampleRandom", "rand", "randint"]

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class SampleRandom:
    """Draws for the samples ``indices`` (dataset indices) of one epoch; each call to ``rand`` or
    ``randint`` is the next draw ``d`` and gives one value per sample."""

    def __init__(self, seed: int, epoch: int, indices: torch.Tensor):
        self.seed, self.epoch = int(seed), int(epoch)
        self.indices = torch.as_tensor(indices, dtype=torch.int64) & M32
        self.draw = 0

    def __len__(self):
        return len(self.indices)

    def bits(self, device) -> torch.Tensor:
        """The next draw: one uniform 32-bit integer (in int64) per sample."""
        k0, k1 = (int(k) for k in np.random.SeedSequence([self.seed, self.epoch, self.draw]).generate_state(2))
        self.draw += 1
        i = self.indices.to(device)
        return _mix((_mix(i ^ k0) + k1) & M32)

    def rand(self, device) -> torch.Tensor:
        return (self.bits(device) >> 8).to(torch.float32) / float(1 << 24)

    def randint(self, low: int, high: int, device) -> torch.Tensor:
        return low + ((self.bits(device) * (high - low)) >> 32)


def rand(source, n: int, device) -> torch.Tensor:
    """``n`` uniforms in [0, 1): per sample from a ``SampleRandom``, or from a ``torch.Generator``."""
    if isinstance(source, SampleRandom):
        assert len(source) == n, (len(source), n)
        return source.rand(device)
    return torch.rand(n, generator=source, device=device)


def randint(source, low: int, high: int, n: int, device) -> torch.Tensor:
    """``n`` integers in ``[low, high)``, like ``rand``."""
    if isinstance(source, SampleRandom):
        assert len(source) == n, (len(source), n)
        return source.randint(low, high, device)
    return torch.randint(low, high, (n,), generator=source, device=device)
