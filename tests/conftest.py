"""Shared helpers for the training-engine tests: a quick digits schedule and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# a few optimizer steps per epoch: enough to exercise every path of the engine in seconds
QUICK = ["--limit-train", "256", "--limit-test", "128", "--batch-size", "64"]


def run_cli(*args, cwd=None, timeout=600, module="tetsnn", env=None):
    """Run ``python -m tetsnn ARGS`` (or another module) in a fresh process; output is not a terminal."""
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def quick_args():
    return list(QUICK)
