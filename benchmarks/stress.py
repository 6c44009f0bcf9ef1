"""The skeleton the stress scripts share (``stress_ddp.py``, ``stress_run_dir.py``): their arguments,
the rounds in which the scenarios take turns beside busy-loop processes, and the report.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional

from report import write_results

# a tiny digits schedule on the per-step loop (no numba compile in every fresh process)
TINY = ["--limit-train", "192", "--limit-test", "65", "--batch-size", "64", "--model-kw", "{backend: loop}"]


def catches_sigterm(pid) -> bool:
    """Whether process ``pid`` has installed a SIGTERM handler (its SigCgt mask in /proc/PID/status)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def arguments(doc: str, argv, runs: int, load: int, scenarios: str) -> argparse.Namespace:
    """``--runs``, ``--load`` (busy-loop processes alongside), ``--seed`` and ``--scenarios`` (comma-separated)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--runs", type=int, default=runs)
    p.add_argument("--load", type=int, default=load, help="busy-loop processes to run alongside")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenarios", default=scenarios)
    return p.parse_args(argv)


def write_report(name: str, title: str, setting: str, describe: Dict[str, str], args, results, echo=False):
    """The section ``name`` of docs/performance.md (and its JSON): ``title``, then ``setting`` (formatted with
    ``cores``, ``load`` and ``seed``), then a row per scenario described by ``describe``."""
    cores = os.cpu_count()
    md = [title, "", setting.format(cores=cores, load=args.load, seed=args.seed), "",
          "| scenario | runs | failures | mean seconds per run |", "|---|---|---|---|"]
    for scenario, res in results.items():
        md.append(f"| {describe[scenario]} | {res['runs']} | {res['failures']} | "
                  f"{res['seconds'] / max(res['runs'], 1):.0f} |")
    write_results(name, dict(load=args.load, seed=args.seed, cores=cores, results=results), "\n".join(md))
    if echo:
        print("\n".join(md))


def run_scenarios(args, run: Callable, report: Callable, setup: Optional[Callable] = None) -> int:
    """``args.runs`` rounds in which the scenarios take turns, each in a fresh folder, with ``args.load``
    busy-loop processes running. ``setup(tmp)`` makes what every run shares; ``run(scenario, rng, work,
    shared) -> (ok, what)``; ``report(args, results, echo=False)`` after every run (an interrupted stress
    run still counts) and at the end. Returns the exit status: 1 if any run failed."""
    rng = random.Random(args.seed)
    scenarios = args.scenarios.split(",")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    results = {s: dict(runs=0, failures=0, failed=[], seconds=0.0) for s in scenarios}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            shared = setup(tmp, scenarios) if setup else None
            for i in range(args.runs):          # the scenarios take turns
                for scenario in scenarios:
                    res = results[scenario]
                    work = tmp / f"{scenario}{i}"
                    work.mkdir()
                    t0 = time.time()
                    ok, what = run(scenario, rng, work, shared)
                    res["runs"] += 1
                    res["seconds"] += time.time() - t0
                    if not ok:
                        res["failures"] += 1
                        res["failed"].append(what)
                    print(f"{scenario} {i + 1}/{args.runs}: {'ok' if ok else 'FAILED'}: {what.splitlines()[0][:200]}",
                          flush=True)
                    if not ok:
                        print(what, flush=True)
                    shutil.rmtree(work, ignore_errors=True)
                    report(args, results)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    report(args, results, echo=True)
    return 1 if any(r["failures"] for r in results.values()) else 0
