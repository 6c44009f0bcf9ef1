"""``tetsnn profile``: firing rates, synaptic operations and energy of a trained model on test batches.

    tetsnn profile --checkpoint FILE [--data-dir DIR] [--cache-dir DIR] [--batches K] [--json] [--plot out.png]
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

__all__ = ["main"]


def build_parser():
    from .config import checkpoint_parser

    p = checkpoint_parser("tetsnn profile",
                          "Firing rates, synaptic operations and energy of a checkpoint on test batches.")
    p.add_argument("--batches", type=int, default=4, help="number of test batches to run (default 4)")
    p.add_argument("--mac-pj", type=float, default=4.6, help="energy of one MAC in pJ (default 4.6, 45 nm)")
    p.add_argument("--ac-pj", type=float, default=0.9, help="energy of one accumulate in pJ (default 0.9, 45 nm)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--plot", default=None, metavar="PNG", help="write firing rates and a spike raster to this file")
    return p


def _args(argv):
    from .config import ConfigError

    args = build_parser().parse_args(argv)
    if args.batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {args.batches}")
    return args


def run_profile(args) -> dict:
    from .data import build_data
    from .checkpoint import load_trained_model
    from ..analysis import profile

    from .evaluate import overrides

    given = overrides(args)
    device = given["device"] if given["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, _ = load_trained_model(args.checkpoint, given, device)
    data = build_data(cfg, device, train=False)
    batches = (x for x, _ in itertools.islice(iter(data.test), args.batches))
    return profile(model, batches, T=cfg["T"], mac_pj=args.mac_pj, ac_pj=args.ac_pj, raster=args.plot is not None)


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from ..data import DataError
    from ..analysis import format_table
    from ..analysis.plots import plot_profile
    from ..utils import Interrupted, error_line

    try:
        args = _args(list(sys.argv[1:] if argv is None else argv))
        result = run_profile(args)
        if args.plot:
            plot_profile(result, args.plot)
    except (ConfigError, CheckpointError, DataError, ValueError, OSError) as e:
        print(f"tetsnn profile: error: {error_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e)
        return 0
    result.pop("raster", None)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
        if args.plot:
            print(f"figure: {args.plot}")
    return 0
