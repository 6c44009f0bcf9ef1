"""``tetsnn preprocess``: build an event dataset's frame cache ahead of training."""
from __future__ import annotations

import argparse
import shlex
import sys

from ..data.events.datasets import DEFAULT_T, build_cache
from ..utils import Interrupted, error_line


def _sensor_size(text):
    try:
        H, W = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (two integers), got {text!r}") from None
    return H, W


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tetsnn preprocess",
        description="Frame an event-camera dataset's original recordings into the cache that "
                    "training reads (both splits).")
    parser.add_argument("dataset", choices=sorted(DEFAULT_T), help="which dataset")
    parser.add_argument("--root", required=True,
                        help="the original recordings: CIFAR10-DVS or N-Caltech101 class folders, the DvsGesture "
                             "folder, the N-MNIST folder holding Train/ and Test/, or <class>/<recording> folders")
    parser.add_argument("--cache-dir", dest="cache", default=None, help="cache directory (default ~/.cache/tetsnn)")
    parser.add_argument("--T", type=int, default=None, help="frames per sample (default 16 Gesture, 10 the others)")
    parser.add_argument("--split", choices=("tet", "tebn"), default="tet",
                        help="train/test split of CIFAR10-DVS, N-Caltech101 and event-folder "
                             "(default tet: the first 90%% of each class train)")
    parser.add_argument("--size", type=int, default=None,
                        help="model input side; N-Caltech101 and event-folder caches are stored reduced to it "
                             "(default 48)")
    parser.add_argument("--reader", choices=("aedat2", "aedat31", "atis", "npy"), default=None,
                        help="event-folder: the recordings' format")
    parser.add_argument("--sensor-size", type=_sensor_size, default=None, metavar="H,W",
                        help="event-folder: the sensor's height and width")
    parser.add_argument("--split-by", choices=("count", "time"), default="count",
                        help="cut each sample into T frames of equal event count (default) or equal time")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="stop at an unreadable file (default) or skip it and list it in the manifest")
    parser.add_argument("--workers", type=int, default=None, help="threads framing files (default: all CPUs)")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        directory, manifest = build_cache(args.dataset, args.root, args.T, args.split, args.cache,
                                          args.on_error, args.split_by, args.workers, size=args.size,
                                          reader=args.reader, sensor_size=args.sensor_size)
    except (ValueError, OSError) as error:
        print(f"tetsnn preprocess: error: {error_line(error)}", file=sys.stderr)
        return 1
    except Interrupted as stopped:    # SIGTERM / SIGINT during the build: nothing is left behind
        print(f"{stopped}. continue with: {shlex.join(['tetsnn', 'preprocess', *argv])}", flush=True)
        return 0
    except KeyboardInterrupt:         # Ctrl-C before the build started
        print("tetsnn preprocess: interrupted; no cache was left half-written", file=sys.stderr)
        return 130
    splits = manifest["splits"]
    print(f"{args.dataset}: {splits['train']['shape'][0]} train / {splits['test']['shape'][0]} test samples, "
          f"T={manifest['params']['T']}, in {directory}")
    for skipped in manifest["skipped"]:
        print(f"skipped {skipped['file']}: {skipped['error']}")
    ignored = manifest.get("ignored", [])
    if ignored:
        print(f"ignored {len(ignored)} entries that are not recordings (listed in {directory}/manifest.json), "
              f"e.g. {ignored[0]}")
    return 0
