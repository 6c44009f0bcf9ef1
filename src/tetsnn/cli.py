"""The ``tetsnn`` command: ``tetsnn <subcommand> [options]``.

Each subcommand lives in its own module, which exposes ``main(argv) -> int``; it is imported
only when used, so ``tetsnn --help`` stays fast.
"""
from __future__ import annotations

import difflib
import importlib
import signal
import sys

# name -> (module, one-line description)
SUBCOMMANDS = {
    "train": ("tetsnn.engine.train", "train a spiking network (default: TET on the bundled digits)"),
    "test": ("tetsnn.engine.evaluate", "evaluate a checkpoint: top-1, top-5 and top-1 per number of steps"),
    "preprocess": ("tetsnn.engine.preprocess_cli", "frame an event dataset's recordings into the training cache"),
    "profile": ("tetsnn.engine.profile_cli", "firing rates, synaptic operations and energy of a checkpoint"),
    "export": ("tetsnn.engine.export_cli", "write a checkpoint's model as a NIR graph"),
}


def usage() -> str:
    lines = ["usage: tetsnn <command> [options]    (tetsnn --version: the installed version)", "", "commands:"]
    lines += [f"  {name:<12}{desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run 'tetsnn <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"tetsnn {__version__}")
        return 0
    if argv[0] not in SUBCOMMANDS:
        close = difflib.get_close_matches(argv[0], list(SUBCOMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"tetsnn: unknown command {argv[0]!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    # a write over the file-size limit (ulimit -f) fails with "file too large" instead of killing
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    module, _ = SUBCOMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:]) or 0
