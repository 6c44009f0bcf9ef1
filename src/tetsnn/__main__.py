"""``python -m tetsnn`` and ``torchrun -m tetsnn``."""
import os
import sys

from .cli import main

if __name__ == "__main__":
    code = main() or 0
    if "LOCAL_RANK" in os.environ:
        # A torchrun worker has left its process group by now. Ending the process here, without the
        # interpreter's teardown, keeps the destructors of the communication library's threads from
        # aborting the exit (SIGABRT, "terminate called without an active exception"), which torchrun
        # would report as a failed job although every file was written.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
