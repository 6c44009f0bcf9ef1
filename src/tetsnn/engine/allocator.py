"""The CPU allocator of training processes: a fixed glibc mmap threshold.

glibc serves a large ``malloc`` with ``mmap`` and gives it back to the system on ``free``, but after
each such free it raises its threshold to that block's size (up to 32 MiB on 64-bit systems). From
then on, blocks of that size come from the heap, and freed tensors stay in the process's resident
memory until the heap's top is free. For a training step, whose activations are freed in the
reverse order of their allocation during backward, that makes the peak resident memory depend on
the order of frees and exceed the live tensors by a third.

:func:`fix_mmap_threshold` sets the threshold once, through ``mallopt(M_MMAP_THRESHOLD, ...)``,
which also switches the dynamic adjustment off. ``tetsnn train`` calls it first thing (every
torchrun worker runs that entry too), unless the environment sets ``MALLOC_MMAP_THRESHOLD_``, the
variable glibc reads for the same setting: a value set there is the user's choice and is kept.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["ENV", "M_MMAP_THRESHOLD", "DEFAULT_THRESHOLD", "fix_mmap_threshold"]

ENV = "MALLOC_MMAP_THRESHOLD_"   # glibc's own variable for the same setting
M_MMAP_THRESHOLD = -3            # mallopt's parameter number (malloc.h)
DEFAULT_THRESHOLD = 128 * 1024   # glibc's starting value, now kept fixed


def fix_mmap_threshold(threshold: int = DEFAULT_THRESHOLD, environ=None):
    """Fix glibc's mmap threshold at ``threshold`` bytes; returns the value set, or None where
    nothing was set: not Linux with glibc, or ``MALLOC_MMAP_THRESHOLD_`` in ``environ`` (default
    ``os.environ``), which glibc has already applied at the process's start."""
    environ = os.environ if environ is None else environ
    if ENV in environ or not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):   # another C library (musl has no mallopt tuning)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return threshold if mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1 else None


def apply_allocator_config(cfg: dict):
    """The run's ``mmap_threshold`` key: 0 leaves glibc's default; a number of bytes fixes the
    threshold there (:func:`fix_mmap_threshold`, so ``MALLOC_MMAP_THRESHOLD_`` still wins). Returns
    the value set, or None."""
    threshold = cfg.get("mmap_threshold") or 0
    return fix_mmap_threshold(threshold) if threshold > 0 else None
