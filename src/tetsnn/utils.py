from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch

__all__ = ["seed_all", "atomic_path", "remove_stale_temps"]


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (every device) for a reproducible run."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name next to ``path`` to write to; on success it is renamed to ``path``,
    on failure removed, so ``path`` is never left half-written. The extension is kept (for writers
    that choose a format by it)."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"     # the name remove_stale_temps recognises
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TEMP_NAME = re.compile(r".\.tmp\d+(\.[^.]*)?$")


def remove_stale_temps(folder) -> list:
    """Remove the temporary files ``atomic_path`` left in ``folder`` when a process was killed
    mid-write (``NAME.tmpPID.EXT``). Only call it when no other process writes there. Returns the
    names removed."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    stale = sorted(n for n in os.listdir(folder) if _TEMP_NAME.search(n) and os.path.isfile(os.path.join(folder, n)))
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale
