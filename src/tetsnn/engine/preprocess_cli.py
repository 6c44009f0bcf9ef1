"""``tetsnn preprocess``: build an event dataset's frame cache ahead of training.

    tetsnn preprocess [--config FILE|PRESET] --dataset NAME --data-dir RAW [--KEY VALUE ...]

It reads the same config and flags as ``tetsnn train`` (those that decide the cache: dataset,
data_dir, cache_dir, T, split, size, reader, sensor_size, split_by and on_error; the others are
checked and unused), so ``train`` with the same flags reads the cache it builds. ``--threads N``
sets the framing threads (train's ``--workers`` is its DataLoader's, and not taken here).
"""
from __future__ import annotations

import shlex
import sys


# old spellings, named in the error message that replaces them
RENAMED = {"--root": "--data-dir", "--cache": "--cache-dir", "--workers": "--threads"}


def build_parser():
    from .config import DEFAULTS, Parser, add_config_flag, add_key_flags

    p = Parser(prog="tetsnn preprocess",
               description="Frame an event-camera dataset's original recordings into the cache that training "
                           "reads (both splits). Takes the config and flags of tetsnn train (but --workers); "
                           "a train run with the same flags reads the cache.")
    add_config_flag(p)
    add_key_flags(p, [key for key in DEFAULTS if key != "workers"])
    p.add_argument("--threads", type=int, default=None, help="threads framing files (default: all CPUs)")
    return p


def resolve_cache_config(argv) -> tuple[dict, int | None]:
    """Command line -> (the run config these flags describe, framing threads)."""
    from .config import DATASETS, ConfigError, absolute_paths, load_config, resolve

    for arg in argv:
        name = arg.split("=")[0]
        if name in RENAMED:
            raise ConfigError(f"{name} is now {RENAMED[name]} (the same flag as tetsnn train's)")
    if argv and not argv[0].startswith("-"):
        raise ConfigError(f"give the dataset as --dataset {argv[0]} (the same flag as tetsnn train's)")
    args = vars(build_parser().parse_args(argv))
    config, threads = args.pop("config"), args.pop("threads")
    if threads is not None and threads < 1:
        raise ConfigError(f"bad value for --threads: {threads} (expected an integer >= 1)")
    cfg = resolve(absolute_paths({**load_config(config or "digits"), **args}))
    if DATASETS[cfg["dataset"]]["kind"] != "events":
        events = ", ".join(k for k, v in DATASETS.items() if v["kind"] == "events")
        raise ConfigError(f"bad value for dataset: {cfg['dataset']!r} (preprocess builds event caches: {events})")
    return cfg, threads


def main(argv=None) -> int:
    from .config import ConfigError
    from .data import event_cache_args
    from ..data import DataError
    from ..data.events import build_cache
    from ..utils import Interrupted, error_line

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, threads = resolve_cache_config(argv)
        directory, manifest = build_cache(**event_cache_args(cfg), workers=threads)
    except (ConfigError, DataError, ValueError) as error:      # bad input: a usage error
        print(f"tetsnn preprocess: error: {error_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:     # the cache could not be written: the build failed, as a failed write in train
        print(f"tetsnn preprocess: error: {error_line(error)}", file=sys.stderr)
        return 1
    except Interrupted as stopped:    # SIGTERM / SIGINT during the build: nothing is left behind
        print(f"{stopped}. continue with: {shlex.join(['tetsnn', 'preprocess', *argv])}", flush=True)
        return 0
    except KeyboardInterrupt:         # Ctrl-C before the build started
        print("tetsnn preprocess: interrupted; no cache was left half-written", file=sys.stderr)
        return 130
    splits = manifest["splits"]
    print(f"{cfg['dataset']}: {splits['train']['shape'][0]} train / {splits['test']['shape'][0]} test samples, "
          f"T={manifest['params']['T']}, in {directory}")
    for skipped in manifest["skipped"]:
        print(f"skipped {skipped['file']}: {skipped['error']}")
    ignored = manifest.get("ignored", [])
    if ignored:
        print(f"ignored {len(ignored)} entries that are not recordings (listed in {directory}/manifest.json), "
              f"e.g. {ignored[0]}")
    return 0
