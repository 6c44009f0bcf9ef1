from __future__ import annotations

import contextlib
import importlib
import os
import random

import numpy as np
import torch

__all__ = ["seed_all", "atomic_path", "optional_module"]


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
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class optional_module:
    """A package that only some features need (``nir`` for export, say), imported on first use, so
    ``import tetsnn`` works without it; using it when it is missing raises an ImportError that
    names the package and ``purpose``."""

    def __init__(self, name: str, purpose: str):
        self._name, self._purpose, self._module = name, purpose, None

    def __getattr__(self, attr):
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ImportError:
                raise ImportError(f"{self._purpose} needs the {self._name!r} package "
                                  f"(pip install {self._name})") from None
        return getattr(self._module, attr)
