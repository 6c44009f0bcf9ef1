"""Run configuration: a plain dict built from defaults, a YAML preset or file, and command-line flags.

Every key can be set in YAML or as a flag (``--batch-size 128`` sets ``batch_size``). Values are
checked by ``validate``, which raises ``ConfigError`` with a one-line message naming the key.
The presets live in ``tetsnn/configs/*.yaml`` (the repository's ``configs/`` points there), so
``--config cifar10_resnet19`` works from any directory.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

__all__ = ["parse_T_schedule", "T_at_epoch", "ConfigError", "DEFAULTS", "DATASETS", "PRESET_DIR", "list_presets", "load_config",
           "resolve", "validate", "parse_train_args"]

PRESET_DIR = Path(__file__).parent.parent / "configs"

# Every key a run knows, with its default (the digits preset fills in the real values).
DEFAULTS = {
    "model": "digits_snn",
    "model_kw": {},           # extra keyword arguments for create_model (neuron, tau, ...)
    "num_classes": None,      # None: the dataset's class count
    "dataset": "digits",
    "data_dir": None,         # None: ~/.cache/tetsnn/<dataset> (unused by the digits)
    "download": False,
    "split": "tet",           # train/test split of datasets without an official one ("tet" or "tebn")
    "cache_dir": None,        # event-frame cache; None: the event loader's default
    "reader": None,           # event-folder: aedat2, aedat31, atis or npy
    "sensor_size": None,      # event-folder: [H, W] of the sensor
    "T": 4,
    "epochs": 15,
    "batch_size": 64,         # global: split evenly across the DDP ranks
    "lr": 1e-3,
    "optimizer": "adam",
    "momentum": 0.9,          # SGD only
    "weight_decay": 0.0,
    "lamb": 1e-3,
    "means": 1.0,
    "loss": "tet",
    "amp": "none",
    "seed": 1000,
    "out": None,              # None: a fresh directory under runs/
    "resume": None,           # a run directory to continue, or "auto": continue --out if it holds a run
    "checkpoint_every": 0,    # also write last.pt every N optimizer steps (0: epoch ends and signals)
    "workers": 4,             # DataLoader workers (ImageNet only; the other loaders live on the device)
    "device": "auto",         # auto: cuda when available, else cpu
    "sync_bn": False,
    "compile": False,         # torch.compile the model for training and evaluation
    "mmap_threshold": 0,      # bytes: fix glibc's mmap threshold (lower, steadier peak RSS; slower CPU steps); 0: glibc's default
    "init_from": None,        # start from the weights of a ReLU twin (ANN-to-SNN transfer)
    "freeze": None,           # comma-separated glob patterns of parameter names not to train
    "T_schedule": None,       # "2:5,4:5,6": T=2 for 5 epochs, T=4 for 5, then T=6 (static data only)
    "limit_train": 0,         # use only the first N training samples (0: all); for quick checks
    "limit_test": 0,          # use only the first N test samples (0: all)
}

# Per-dataset facts: class count and the training augmentation of tetsnn's presets.
DATASETS = {
    "digits": dict(num_classes=10, kind="static"),
    "cifar10": dict(num_classes=10, kind="static"),
    "cifar100": dict(num_classes=100, kind="static"),
    "imagenet": dict(num_classes=1000, kind="folder"),
    "cifar10-dvs": dict(num_classes=10, kind="events"),
    "dvs-gesture": dict(num_classes=11, kind="events"),
    "n-mnist": dict(num_classes=10, kind="events"),
    "n-caltech101": dict(num_classes=101, kind="events"),
    "event-folder": dict(num_classes=None, kind="events"),   # classes: the data_dir's folders
}

CHOICES = {"optimizer": ("adam", "sgd"), "loss": ("tet", "sdt"), "amp": ("bf16", "fp16", "none"),
           "dataset": tuple(DATASETS), "split": ("tet", "tebn")}


class ConfigError(ValueError):
    """A bad configuration: unknown key, bad value or missing file (one-line message)."""


def list_presets():
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(path) -> dict:
    """Read a YAML config file, or a preset by name (``digits``, ``cifar10_resnet19``, ...)."""
    path = str(path)
    p = Path(path)
    if not p.is_file() and not path.endswith((".yaml", ".yml")) and (PRESET_DIR / f"{path}.yaml").is_file():
        p = PRESET_DIR / f"{path}.yaml"
    if not p.is_file():
        raise ConfigError(f"config file not found: {path} (presets: {', '.join(list_presets())})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown config key {unknown[0]!r}")
    return data


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(cfg, key, ok, what):
    if not ok(cfg[key]):
        raise ConfigError(f"bad value for {key}: {cfg[key]!r} (expected {what})")


def validate(cfg: dict) -> dict:
    """Check every key of a resolved config; raise ConfigError naming the first bad one."""
    from ..models import list_models

    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}")
    for key, choices in CHOICES.items():
        _check(cfg, key, lambda v: v in choices, "one of " + ", ".join(map(str, choices)))
    _check(cfg, "model", lambda v: v in list_models(), "one of " + ", ".join(list_models()))
    for key in ("T", "epochs", "batch_size"):
        _check(cfg, key, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    for key in ("workers", "limit_train", "limit_test", "mmap_threshold"):
        _check(cfg, key, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "checkpoint_every", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "lr", lambda v: _is_num(v) and v > 0, "a number > 0")
    _check(cfg, "weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0")
    _check(cfg, "momentum", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
    _check(cfg, "lamb", lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
    _check(cfg, "means", _is_num, "a number")
    for key in ("download", "sync_bn", "compile"):
        _check(cfg, key, lambda v: isinstance(v, bool), "true or false")
    for key in ("data_dir", "cache_dir", "out", "resume", "init_from", "freeze", "T_schedule"):
        _check(cfg, key, lambda v: v is None or isinstance(v, str), "a path")
    _check(cfg, "device", lambda v: isinstance(v, str) and v.split(":")[0] in ("auto", "cpu", "cuda"),
           "auto, cpu, cuda or cuda:N")
    _check(cfg, "model_kw", lambda v: isinstance(v, dict), "a mapping of model keyword arguments")
    _check(cfg, "num_classes", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(cfg, "reader", lambda v: v in (None, "aedat2", "aedat31", "atis", "npy"), "aedat2, aedat31, atis or npy")
    _check(cfg, "sensor_size", lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2
                                                        and all(_is_int(s) and s >= 1 for s in v)),
           "[H, W]: two integers >= 1")
    return cfg


def _event_folder(cfg: dict) -> None:
    """``dataset: event-folder`` needs data_dir, reader and sensor_size; its class count is the
    number of class folders in data_dir."""
    missing = [key for key in ("data_dir", "reader", "sensor_size") if cfg.get(key) is None]
    if missing:
        raise ConfigError(f"dataset event-folder needs {', '.join(missing)}")
    if cfg.get("num_classes") is None:
        from ..data.events import class_folders

        try:
            cfg["num_classes"] = len(class_folders(Path(str(cfg["data_dir"])).expanduser()))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def resolve(overrides: dict) -> dict:
    """Defaults <- the config's own keys; fills in num_classes from the dataset; validates."""
    cfg = {**DEFAULTS, **overrides}
    if cfg.get("dataset") == "event-folder":
        _event_folder(cfg)
    if cfg.get("dataset") in DATASETS and cfg.get("num_classes") is None:
        cfg["num_classes"] = DATASETS[cfg["dataset"]]["num_classes"]
    for key in ("lr", "weight_decay", "momentum", "lamb", "means"):   # YAML reads 1e-3 as a string
        if isinstance(cfg.get(key), str):
            try:
                cfg[key] = float(cfg[key])
            except ValueError:
                pass
    validate(cfg)
    if cfg["T_schedule"] is not None:
        if DATASETS[cfg["dataset"]]["kind"] == "events":
            raise ConfigError(f"T_schedule needs static images; {cfg['dataset']} frames have a fixed T")
        try:
            cfg["T"] = parse_T_schedule(cfg["T_schedule"])[-1][0]   # the model ends at the last T
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


STRING_KEYS = {"model", "dataset", "data_dir", "split", "cache_dir", "reader", "optimizer", "loss", "amp", "out",
               "resume", "device", "init_from", "freeze", "T_schedule"}


def _flag_value(key):
    """Flags are read as YAML values (numbers, true/false, {...}); names and paths stay strings."""
    def parse(text):
        if key in STRING_KEYS:
            return text
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text
    return parse


def build_parser(prog="tetsnn train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Train a spiking network with TET. Flags override the config's "
                "keys of the same name (dashes for underscores).")
    p.add_argument("--config", default=None,
                   help="YAML file or preset name (" + ", ".join(list_presets()) + "); default: digits")
    for key, default in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, dest=key, nargs="?", const=True, default=argparse.SUPPRESS,
                           type=_flag_value(key), help=f"(default {default})")
        else:
            p.add_argument(flag, dest=key, default=argparse.SUPPRESS, type=_flag_value(key),
                           metavar=key.upper(), help=f"(default {default})")
    return p


def parse_train_args(argv):
    """Command line -> (config file/preset or None, dict of the flags given)."""
    args = vars(build_parser().parse_args(argv))
    return args.pop("config"), args


def parse_T_schedule(text: str) -> list:
    """``"2:5,4:5,6"`` -> ``[(2, 5), (4, 5), (6, None)]``: (T, epochs) stages; only the last stage
    may omit its epoch count, and the last T continues to the end of the run."""
    stages = []
    parts = [p.strip() for p in str(text).split(",")]
    for i, part in enumerate(parts):
        t, sep, n = part.partition(":")
        try:
            stage = (int(t), int(n) if sep else None)
        except ValueError:
            raise ValueError(f"bad T schedule {text!r}: stage {part!r} is not T:EPOCHS") from None
        if stage[0] < 1 or (stage[1] is not None and stage[1] < 1):
            raise ValueError(f"bad T schedule {text!r}: T and epochs must be >= 1 in stage {part!r}")
        if stage[1] is None and i != len(parts) - 1:
            raise ValueError(f"bad T schedule {text!r}: only the last stage may omit its epochs")
        stages.append(stage)
    return stages


def T_at_epoch(stages: list, epoch: int) -> int:
    """The T of 1-based ``epoch`` under a parsed schedule."""
    end = 0
    for T, n in stages:
        if n is None:
            return T
        end += n
        if epoch <= end:
            return T
    return stages[-1][0]
