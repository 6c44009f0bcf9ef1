"""Checkpoints: plain dicts of tensors and Python values, written atomically and read with
``torch.load(weights_only=True)``, so loading a checkpoint can never run code.

A training checkpoint holds ``model`` (the state_dict), ``optimizer``, ``scheduler``, ``scaler``,
``epoch``, ``step`` (optimizer steps done inside that epoch), ``partial`` (that epoch's running
sums), ``history`` (one metrics dict per finished epoch), ``rng`` and ``config``.
"""
from __future__ import annotations

import os
import pickle
import random
import warnings
import zipfile

import numpy as np
import torch
from torch import nn

from ..models import create_model
from ..utils import atomic_path, os_error_text
from .config import ConfigError, resolve
from .distributed import pause_point

__all__ = ["save_checkpoint", "load_checkpoint", "build_model", "load_trained_model", "load_state_dict", "rng_state", "set_rng_state", "CheckpointError",
           "CheckpointWriteError"]


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint file (one-line message naming it)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint (or another run file) that could not be written; the previous file is kept."""


def save_checkpoint(state: dict, path) -> None:
    """Write ``state`` to ``path`` through a temporary file in the same folder and a rename. A failed
    write (disk full, file size limit) raises CheckpointError naming ``path`` and leaves the file
    that was there before, and no temporary file."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:      # through Python's file: a failed write keeps its errno
                torch.save(state, f)
            pause_point("save", f"{os.path.basename(os.fspath(path))}/{state.get('epoch')}")
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(f"cannot write checkpoint {os.fspath(path)}: {_write_reason(e)}") from None


def _write_reason(e: BaseException) -> str:
    """Plain words for a failed write; PyTorch's zip writer reports one as "unexpected pos", with the
    I/O error (file too large, disk full) as its context."""
    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    return os_error_text(cause if cause is not None else e)


def _load(path, map_location="cpu"):
    """``torch.load(weights_only=True)``; anything that is not a checkpoint is a one-line
    CheckpointError naming the file and what it is not."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # PyTorch's messages here suggest unsafe workarounds: say what the file is instead
        if not zipfile.is_zipfile(path):
            what = "not a PyTorch checkpoint file (truncated, empty, or another format)"
        elif isinstance(e, pickle.UnpicklingError):
            what = ("not a tetsnn checkpoint: it holds Python objects, not only tensors, numbers and "
                    "strings, and tetsnn never runs code from a checkpoint")
        else:
            what = "not a PyTorch checkpoint file (a damaged or foreign zip archive)"
        raise CheckpointError(f"cannot load checkpoint {path}: {what}") from None


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear error names a missing or bad file."""
    ckpt = _load(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a tetsnn checkpoint (expected a dict with 'model' and 'config')")
    return ckpt


def load_state_dict(path, map_location="cpu") -> dict:
    """The model weights in ``path``: a tetsnn checkpoint's "model", or a bare state_dict file."""
    ckpt = _load(path, map_location)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no model weights (expected a tetsnn checkpoint or a state_dict)")
    return state


def rng_state() -> dict:
    """Every RNG state as tensors, ints and lists (loadable with weights_only=True)."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(rng: dict) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"].cpu())      # RNG states are CPU byte tensors, wherever loaded
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def build_model(cfg: dict) -> nn.Module:
    """The model a config describes (its weights are freshly initialised)."""
    try:
        kw = dict(cfg["model_kw"])
        if cfg.get("memory", "default") != "default":   # models built before the key know no memory argument
            kw["memory"] = cfg["memory"]
        return create_model(cfg["model"], num_classes=cfg["num_classes"], T=cfg["T"], **kw)
    except (TypeError, ValueError) as e:   # e.g. a misspelt neuron argument in model_kw
        raise ConfigError(f"bad model_kw {cfg['model_kw']!r} for model {cfg['model']!r}: {e}") from None


def load_trained_model(checkpoint, overrides: dict = None, device="cpu"):
    """``(config, model, checkpoint dict)`` of a ``tetsnn train`` checkpoint, the model in eval mode on
    ``device``. ``overrides`` replace config keys (None values are ignored), e.g. ``data_dir``."""
    ckpt = load_checkpoint(checkpoint)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = resolve({**ckpt["config"], **given, "download": False})
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: weights do not fit model {cfg['model']!r}: "
                              f"{str(e).splitlines()[0]}") from None
    return cfg, model.to(device).eval(), ckpt
