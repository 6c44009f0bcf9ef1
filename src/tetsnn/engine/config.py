"""Run configuration: a plain dict built from defaults, a YAML preset or file, and command-line flags.

Every key can be set in YAML or as a flag (``--batch-size 128`` sets ``batch_size``). Values are
checked by ``validate``, which raises ``ConfigError`` with a one-line message naming the key.
The presets live in ``tetsnn/configs/*.yaml`` (the repository's ``configs/`` points there), so
``--config cifar10_resnet19`` works from any directory.
"""
from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path

import yaml

__all__ = ["parse_T_schedule", "T_at_epoch", "ConfigError", "DEFAULTS", "DATASETS", "PRESET_DIR", "list_presets", "load_config",
           "resolve", "validate", "parse_train_args", "parse_sensor_size", "Parser", "checkpoint_parser", "absolute_paths", "PATH_KEYS", "HELP",
           "did_you_mean", "DEFAULT_MEANS"]

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
    "sensor_size": None,      # event-folder: H,W of the sensor
    "size": None,             # event data: model input side (None: the dataset's)
    "split_by": "count",      # event data: T frames of equal event count or equal time
    "on_error": "raise",      # event data: stop at an unreadable recording, or skip it
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
    "label_smoothing": 0.0,   # the training loss's label smoothing (0: off)
    "warmup_epochs": 0,       # linear learning-rate warmup before the cosine schedule (0: none)
    "mixup": 0.0,             # mixup's Beta alpha (0: off)
    "cutmix": 0.0,            # cutmix's Beta alpha (0: off)
    "mixup_prob": 1.0,        # probability that a batch is mixed (mixup or cutmix)
    "mixup_off_epoch": 0,     # mixup and cutmix only in the first N epochs (0: all)
    "randaugment": None,      # e.g. "rand-m9-n1-mstd0.4-inc1" (None: off)
    "random_erasing": 0.0,    # probability of erasing one rectangle of a training image (0: off)
    "amp": "none",
    "seed": 1000,
    "out": None,              # None: a fresh directory under runs/
    "resume": None,           # a run directory to continue, or "auto": continue --out if it holds a run
    "checkpoint_every": 0,    # also write last.pt every N optimizer steps (0: epoch ends and signals)
    "workers": 4,             # DataLoader workers (ImageNet only; the other loaders live on the device)
    "device": "auto",         # auto: cuda when available, else cpu
    "sync_bn": False,
    "compile": False,         # torch.compile the model for training and evaluation
    "memory": "default",      # min: spiking blocks keep only their input (bits) and recompute in backward
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

CHOICES = {"optimizer": ("adam", "sgd", "adamw"), "loss": ("tet", "sdt"), "amp": ("bf16", "fp16", "none"),
           "dataset": tuple(DATASETS), "split": ("tet", "tebn"), "split_by": ("count", "time"),
           "on_error": ("raise", "skip"), "memory": ("default", "min")}
READERS = ("aedat2", "aedat31", "atis", "npy")

# keys that name files or folders: relative values are taken from the current directory, and a run
# saves them absolute, so its directory works from anywhere
PATH_KEYS = ("data_dir", "cache_dir", "out", "resume", "init_from")

# what a default of None means, where it means more than "none"
DEFAULT_MEANS = {
    "num_classes": "the dataset's",
    "data_dir": "data/<dataset> for CIFAR; other datasets need one",
    "cache_dir": "$TETSNN_CACHE or ~/.cache/tetsnn",
    "size": "the dataset's: 48, N-MNIST 34",
    "out": "a fresh runs/<time>-<dataset>-<model>",
}

# one line per key: the flag's --help and the manual's key table
HELP = {
    "model": "model name (see tetsnn.list_models())",
    "model_kw": "extra keyword arguments of the model, e.g. '{neuron: if, tau: 0.5}'",
    "num_classes": "number of classes",
    "dataset": "which data to train on",
    "data_dir": "folder holding the dataset (the digits need none)",
    "download": "download CIFAR-10/100 into data_dir if missing",
    "split": "train/test split of CIFAR10-DVS, N-Caltech101 and event-folder (tet: the first 90 percent of "
             "each class trains; tebn: the TEBN split)",
    "cache_dir": "folder of the event-frame cache",
    "reader": "event-folder: the recordings' file format",
    "sensor_size": "event-folder: the sensor's height and width, as H,W (e.g. 64,64)",
    "size": "event data: side of the frames the model sees",
    "split_by": "event data: cut each recording into T frames of equal event count or of equal time",
    "on_error": "event data: stop at an unreadable recording (raise), or leave it out and list it in "
                "the cache's manifest (skip)",
    "T": "time steps per sample",
    "epochs": "number of training epochs",
    "batch_size": "global batch size (split evenly across processes)",
    "lr": "peak learning rate (cosine schedule to 0, after the warmup epochs if any)",
    "optimizer": "optimizer (adamw: AdamW, decoupled weight decay)",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay (L2 in the gradient for adam and sgd, decoupled for adamw)",
    "lamb": "TET's lambda: weight of the MSE regulariser on the outputs",
    "means": "TET's target of that regulariser",
    "loss": "tet (TET loss) or sdt (cross-entropy of the time-averaged output)",
    "label_smoothing": "label smoothing epsilon of the training loss: each target becomes (1 - epsilon) target "
                       "+ epsilon / classes (0: off; the test loss is never smoothed)",
    "warmup_epochs": "epochs of linear learning-rate warmup, epoch e (from 0) at lr * (e + 1) / (N + 1); the "
                     "cosine schedule takes over after them (0: none)",
    "mixup": "mixup alpha: a batch is blended with its reverse, weight drawn from Beta(alpha, alpha) (0: off)",
    "cutmix": "cutmix alpha: a box of the reversed batch is pasted in, its area share from Beta(alpha, alpha); "
              "with mixup too, each batch takes one of them at even odds (0: off)",
    "mixup_prob": "probability that a training batch is mixed by mixup or cutmix",
    "mixup_off_epoch": "mixup and cutmix run only in the first N epochs (0: in every epoch)",
    "randaugment": "RandAugment policy of the training images, timm's syntax rand-mM-nN[-mstdS][-mmaxX][-incB] "
                   "(e.g. rand-m9-n1-mstd0.4-inc1; null: off; static images only)",
    "random_erasing": "probability of erasing one random rectangle of each training image to zero after "
                      "normalisation (0: off; static images only)",
    "amp": "mixed precision",
    "seed": "random seed",
    "out": "run directory",
    "resume": "run directory to continue, or auto: continue --out if it holds a run, else start one there",
    "checkpoint_every": "also save last.pt every N optimizer steps (0: at epoch ends and on a stop signal)",
    "workers": "DataLoader worker processes (ImageNet only)",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "sync_bn": "synchronise BatchNorm statistics across GPUs",
    "compile": "torch.compile the model",
    "memory": "default, or min: each spiking block keeps only its input (as bits when it is spikes) and its "
              "BatchNorm batch statistics for backward, and recomputes the rest there (the same gradients, "
              "bit for bit, for one more forward per block)",
    "init_from": "checkpoint of a ReLU twin to start from (ANN-to-SNN transfer)",
    "freeze": "comma-separated glob patterns of parameter names not to train",
    "T_schedule": "T per epoch range, e.g. 2:5,4:5,6 (static data only)",
    "limit_train": "use only the first N training samples (0: all), for quick checks. Few optimizer steps "
                   "leave the BatchNorm running statistics near their initial values, so the test accuracy "
                   "(which uses them) can be near chance while the training accuracy is high",
    "limit_test": "use only the first N test samples (0: all)",
    "mmap_threshold": "fix glibc's mmap threshold to this many bytes on Linux (steadier, lower peak memory; slower CPU steps; 0: glibc's default, or MALLOC_MMAP_THRESHOLD_ when set)",
}


class ConfigError(ValueError):
    """A bad configuration: unknown key, bad value or missing file (one-line message)."""


def did_you_mean(word: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(key: str, where: str = "") -> ConfigError:
    return ConfigError(f"{where}unknown config key {key!r}{did_you_mean(key, DEFAULTS)}")


def parse_sensor_size(value):
    """``"64,64"`` (flags and YAML) or ``[64, 64]`` (YAML) -> ``[64, 64]``; other values unchanged
    (``validate`` names them)."""
    if isinstance(value, str):
        parts = [v.strip() for v in value.strip().strip("[]()").split(",")]
        try:
            return [int(v) for v in parts]
        except ValueError:
            return value
    return list(value) if isinstance(value, tuple) else value


def absolute_paths(cfg: dict) -> dict:
    """``cfg`` with its PATH_KEYS (but ``resume: auto``) made absolute against the current directory
    (``~`` expanded)."""
    out = dict(cfg)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and not (key == "resume" and out[key] == "auto"):
            out[key] = os.path.abspath(os.path.expanduser(out[key]))
    return out


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
        raise _unknown_key(unknown[0], f"{path}: ")
    return data


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _randaugment_ok(v) -> bool:
    from ..data.augment import parse_randaugment

    try:
        parse_randaugment(v)
    except ValueError:
        return False
    return True


def _check(cfg, key, ok, what):
    if not ok(cfg[key]):
        raise ConfigError(f"bad value for {key}: {cfg[key]!r} (expected {what})")


def validate(cfg: dict) -> dict:
    """Check every key of a resolved config; raise ConfigError naming the first bad one."""
    from ..models import list_models

    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise _unknown_key(unknown[0])
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
    _check(cfg, "warmup_epochs", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "mixup_off_epoch", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(cfg, "label_smoothing", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
    for key in ("mixup", "cutmix"):
        _check(cfg, key, lambda v: _is_num(v) and v >= 0, "a number >= 0 (0: off)")
    for key in ("mixup_prob", "random_erasing"):
        _check(cfg, key, lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
    _check(cfg, "randaugment", lambda v: v is None or _randaugment_ok(v),
           "null or a policy like rand-m9-n1-mstd0.4-inc1")
    for key in ("download", "sync_bn", "compile"):
        _check(cfg, key, lambda v: isinstance(v, bool), "true or false")
    for key in ("data_dir", "cache_dir", "out", "resume", "init_from", "freeze", "T_schedule"):
        _check(cfg, key, lambda v: v is None or isinstance(v, str), "a path")
    _check(cfg, "device", lambda v: isinstance(v, str) and v.split(":")[0] in ("auto", "cpu", "cuda"),
           "auto, cpu, cuda or cuda:N")
    _check(cfg, "model_kw", lambda v: isinstance(v, dict), "a mapping of model keyword arguments")
    if isinstance(cfg.get("model_kw"), dict) and "memory" in cfg["model_kw"]:
        raise ConfigError("model_kw: memory is a key of its own (memory: min, or --memory min), not a model_kw entry")
    _check(cfg, "num_classes", lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check(cfg, "reader", lambda v: v is None or v in READERS, "one of " + ", ".join(READERS))
    _check(cfg, "sensor_size", lambda v: v is None or (isinstance(v, (list, tuple)) and len(v) == 2
                                                        and all(_is_int(s) and s >= 1 for s in v)),
           "H,W: two integers >= 1")
    _check(cfg, "size", lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1")
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
    cfg["sensor_size"] = parse_sensor_size(cfg.get("sensor_size"))
    if cfg.get("dataset") == "event-folder":
        _event_folder(cfg)
    if cfg.get("dataset") in DATASETS and cfg.get("num_classes") is None:
        cfg["num_classes"] = DATASETS[cfg["dataset"]]["num_classes"]
    for key in ("lr", "weight_decay", "momentum", "lamb", "means", "label_smoothing", "mixup", "cutmix",
                "mixup_prob", "random_erasing"):   # YAML reads 1e-3 as a string
        if isinstance(cfg.get(key), str):
            try:
                cfg[key] = float(cfg[key])
            except ValueError:
                pass
    validate(cfg)
    if DATASETS[cfg["dataset"]]["kind"] == "events":
        for key, off in (("randaugment", None), ("random_erasing", 0)):
            if cfg[key] != off:
                raise ConfigError(f"{key} needs static images; {cfg['dataset']} gives event frames "
                                  f"(mixup and cutmix work on them)")
    if cfg["T_schedule"] is not None:
        if DATASETS[cfg["dataset"]]["kind"] == "events":
            raise ConfigError(f"T_schedule needs static images; {cfg['dataset']} frames have a fixed T")
        try:
            cfg["T"] = parse_T_schedule(cfg["T_schedule"])[-1][0]   # the model ends at the last T
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ConfigErrors, with a "did you mean" for a
    misspelt flag."""

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            flags = [a for s in self._option_string_actions for a in [s] if a.startswith("--")]
            for word in message.split(":", 1)[1].split():
                if word.startswith("-"):
                    message += did_you_mean(word.split("=")[0], flags)
                    break
        raise ConfigError(message)


STRING_KEYS = {"model", "dataset", "data_dir", "split", "cache_dir", "reader", "optimizer", "loss", "amp", "out",
               "resume", "device", "init_from", "freeze", "T_schedule", "split_by", "on_error", "memory"}


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


def _choices(key):
    from ..models import list_models

    if key == "model":
        return list_models()
    if key == "reader":
        return READERS
    return CHOICES.get(key)


def add_key_flags(p: argparse.ArgumentParser, keys=None) -> None:
    """One ``--key-name`` flag per config key (all of DEFAULTS, or ``keys``), with its help, allowed
    values and default. Given flags land in the namespace under the key; others are absent."""
    for key in keys or DEFAULTS:
        default = DEFAULTS[key]
        flag = "--" + key.replace("_", "-")
        choices = _choices(key)
        text = (HELP[key] + (": " + ", ".join(map(str, choices)) if choices else "")
                + f" (default: {DEFAULT_MEANS.get(key, default)})")
        if isinstance(default, bool):
            p.add_argument(flag, dest=key, nargs="?", const=True, default=argparse.SUPPRESS,
                           type=_flag_value(key), help=text + "; the bare flag means true")
        else:
            p.add_argument(flag, dest=key, default=argparse.SUPPRESS, type=_flag_value(key),
                           metavar="H,W" if key == "sensor_size" else key.upper(), help=text)


def add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML file or preset name (" + ", ".join(list_presets()) + "); default: digits. "
                        "Relative paths in it, as in flags, are taken from the current directory")


# a trained run's keys that the checkpoint commands (test, profile) may change: where its data is
# and where it runs
CHECKPOINT_OVERRIDES = ("data_dir", "cache_dir", "batch_size", "device")


def checkpoint_parser(prog: str, description: str, overrides=CHECKPOINT_OVERRIDES) -> Parser:
    """The parser of a command that reads a ``tetsnn train`` checkpoint: ``--checkpoint`` and the
    flags of ``overrides`` (config keys, spelt and read as in ``tetsnn train``; default: the run's)."""
    p = Parser(prog=prog, description=description)
    p.add_argument("--checkpoint", required=True, help="a last.pt or best.pt written by tetsnn train")
    for key in overrides:
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, type=_flag_value(key),
                       metavar=key.upper(),
                       help=HELP[key] + (" (default auto)" if key == "device" else " (default: the run's)"))
    return p


def build_parser(prog="tetsnn train", description=None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description or (
        "Train a spiking network with TET. Every config key is a flag (dashes for underscores) and "
        "overrides the config's value; flags take the same values as YAML."))
    add_config_flag(p)
    add_key_flags(p)
    return p


def parse_train_args(argv, prog="tetsnn train", description=None):
    """Command line -> (config file/preset or None, dict of the flags given)."""
    args = vars(build_parser(prog, description).parse_args(argv))
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
