"""The LIF's fused forward + backward at this commit against another tree of tetsnn (an earlier commit),
interleaved round by round on the same input, each tree in its own long-lived process.

    git archive REV src | tar -x -C /tmp/base
    python benchmarks/bench_lif_against.py /tmp/base/src [--rounds 7] [--label REV]

[32, 8, 128, 16, 16] float32, LIF defaults (fused backend), as in bench_lif.py's (a) at T = 8. Writes
benchmarks/results/bench_lif_against.json and its section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from report import write_results

ROOT = Path(__file__).resolve().parents[1]
WORKER = r"""
import sys, time, torch
from tetsnn import LIF
g = torch.Generator().manual_seed(8)
x = torch.randn(32, 8, 128, 16, 16, generator=g) * 0.8 + 0.5
grad = torch.randn(x.shape, generator=g)
m = LIF(backend=sys.argv[1])
def run():
    xx = x.detach().requires_grad_()
    m(xx).backward(grad)
run()
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter(); run(); print(time.perf_counter() - t0, flush=True)
"""


def worker(src: str, backend: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": src}
    p = subprocess.Popen([sys.executable, "-c", WORKER, backend], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def once(p: subprocess.Popen) -> float:
    p.stdin.write("go\n")
    p.stdin.flush()
    return float(p.stdout.readline())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the other tree's src directory")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--label", default="", help="what the other tree is (a commit), for the report")
    args = ap.parse_args(argv)
    here = str(ROOT / "src")
    procs = {"this fused": worker(here, "fused"), "base fused": worker(args.base, "fused")}
    times = {k: [] for k in procs}
    try:
        for _ in range(args.rounds):
            for k, p in procs.items():
                times[k].append(once(p))
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=60)
    ratios = sorted(t / b for t, b in zip(times["this fused"], times["base fused"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            timeout=30).stdout.strip()
    res = dict(commit=commit, base=args.label or args.base, rounds=args.rounds, shape=[32, 8, 128, 16, 16],
               this_ms=round(statistics.median(times["this fused"]) * 1e3, 2),
               base_ms=round(statistics.median(times["base fused"]) * 1e3, 2),
               time_vs_base=round(statistics.median(ratios), 3), round_ratios=[round(r, 3) for r in ratios])
    print(json.dumps(res))
    md = (f"## The fused LIF against an earlier tree (`benchmarks/bench_lif_against.py`, cpu, commit {commit})\n\n"
          f"LIF forward + backward on {res['shape']} float32, fused backend, {res['rounds']} interleaved rounds, each "
          f"tree in its own process: {res['this_ms']} ms here against {res['base_ms']} ms for {res['base']}; "
          f"time ratio {res['time_vs_base']}x (median of per-round ratios, rounds "
          f"{res['round_ratios'][0]}-{res['round_ratios'][-1]}).")
    write_results("bench_lif_against", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
