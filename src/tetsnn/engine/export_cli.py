"""``tetsnn export``: write a trained model in a format other SNN tools read.

    tetsnn export --checkpoint FILE --format nir --out PATH [--input-shape C,H,W] [--dt 1e-4] [--avgpool sum]
"""
from __future__ import annotations

import sys

__all__ = ["INPUT_SHAPES", "main"]

# one sample at one time step, as the dataset loaders deliver it
INPUT_SHAPES = {
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "imagenet": (3, 224, 224),
    "cifar10-dvs": (2, 48, 48),
    "dvs-gesture": (2, 48, 48),
    "n-mnist": (2, 34, 34),
    "n-caltech101": (2, 48, 48),
    "event-folder": (2, 48, 48),
}


def _shape(text: str):
    from .config import ConfigError

    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape must be three positive integers C,H,W, got {text!r}")
    return shape


def input_shape(cfg: dict) -> tuple:
    """C,H,W of one input frame of a run: its dataset's, at its ``size`` for event data."""
    shape = INPUT_SHAPES[cfg["dataset"]]
    if cfg.get("size") and shape[0] == 2:
        shape = (2, cfg["size"], cfg["size"])
    return shape


def build_parser():
    from .config import checkpoint_parser

    # a model's export reads no data: of the run's keys, no flag here changes it
    p = checkpoint_parser("tetsnn export", "Export a trained model to another format (NIR).", overrides=())
    p.add_argument("--format", choices=["nir"], default="nir", help="output format (nir)")
    p.add_argument("--out", required=True, help="file to write (e.g. model.nir)")
    p.add_argument("--input-shape", type=str, default=None,
                   help="C,H,W of one input frame (default: the checkpoint's dataset)")
    p.add_argument("--dt", type=float, default=1e-4,
                   help="the simulator's Euler step the neurons are written for (default 1e-4, snnTorch's and "
                        "SpikingJelly's; Norse's from_nir takes dt=)")
    p.add_argument("--avgpool", choices=["avg", "sum"], default="avg",
                   help="write average pooling as AvgPool2d, or as SumPool2d with 1/k^2 in the next layer (Norse)")
    return p


def _args(argv):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from ..export import export_nir
    from .checkpoint import load_trained_model
    from ..utils import error_line, write_error

    try:
        args = _args(list(sys.argv[1:] if argv is None else argv))
        cfg, model, _ = load_trained_model(args.checkpoint)
        shape = _shape(args.input_shape) if args.input_shape else input_shape(cfg)
        graph = export_nir(model, args.out, shape, dt=args.dt, avgpool=args.avgpool)
    except OSError as e:
        print(f"tetsnn export: error: {error_line(e) if e.filename else write_error(args.out, e)}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, ValueError, ImportError) as e:   # ImportError: no nir
        print(f"tetsnn export: error: {error_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: NIR graph of {cfg['model']} ({len(graph.nodes)} nodes, {len(graph.edges)} edges), "
          f"input {'x'.join(map(str, shape))} per time step, T = {cfg['T']}, dt = {args.dt:g}")
    return 0
