"""The numba BPTT kernel of a BatchNorm-fed neuron with each surrogate (float32, CPU).

    python benchmarks/bench_surrogate.py [--rounds 15] [--threads 1]

The kernel Spikformer's backward runs most (``("bwd", ..., "bn", ...)``: the neuron's input rebuilt from
BatchNorm's input, scale and shift, the forward recomputed, then BPTT) on ``[8, 4, 64 * 384]`` random
float32 inputs, with Spikformer's LIF settings (:data:`tetsnn.attention.TRANSFORMER_LIF`) and each
built-in surrogate. Each round times every surrogate once (the fastest of 10 calls), in an order rotated
from round to round; the ratios to the triangle surrogate (no exp) are taken within a round and their
median quoted. Writes benchmarks/results/bench_surrogate.json and its section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from report import commit, load_average, write_results  # noqa: E402

NAME = "bench_surrogate"
SHAPE = (8, 4, 64 * 384)


def kernels(rounds: int, calls: int = 10) -> dict:
    """Per surrogate, the fastest of ``calls`` kernel calls in each of ``rounds`` rounds (seconds)."""
    from tetsnn.attention import transformer_neuron
    from tetsnn.kernels import numba_kernels as nk
    from tetsnn.kernels.ops import constants
    rng = np.random.default_rng(0)
    y, gs = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    a, b = (rng.standard_normal(SHAPE[2]).astype(np.float32) for _ in range(2))
    gx, gd = np.empty_like(gs), np.zeros(1, np.float32)
    run = {}
    for surrogate in ("zif", "sigmoid", "atan"):
        spec = transformer_neuron("lif", T=SHAPE[1], surrogate=surrogate).spec
        c = constants(spec, torch.float32).numpy()
        k = nk.kernel(("bwd", spec.dynamics, spec.hard, spec.detach_reset, spec.surrogate, spec.decay_input, False,
                       "bn", True))
        k(gs, (y, a, b), gx, gd, c)          # compiled
        run[surrogate] = lambda k=k, c=c: k(gs, (y, a, b), gx, gd, c)
    times = {s: [] for s in run}
    names = list(run)
    for r in range(rounds):
        for s in names[r % len(names):] + names[:r % len(names)]:
            best = float("inf")
            for _ in range(calls):
                t0 = time.perf_counter()
                run[s]()
                best = min(best, time.perf_counter() - t0)
            times[s].append(best)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="numba threads")
    args = ap.parse_args(argv)
    import numba
    numba.set_num_threads(args.threads)
    start = load_average()
    times = kernels(args.rounds)
    ratio = {s: statistics.median(x / z for x, z in zip(t, times["zif"])) for s, t in times.items()}
    res = {"commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "numba_threads": args.threads, "shape": list(SHAPE), "rounds": args.rounds,
           "load_average": {"start": start, "end": load_average()},
           "median_ms": {s: round(1e3 * statistics.median(t), 3) for s, t in times.items()},
           "over_zif": {s: round(v, 3) for s, v in ratio.items()},
           "over_zif_range": {s: [round(min(x / z for x, z in zip(t, times["zif"])), 3),
                                  round(max(x / z for x, z in zip(t, times["zif"])), 3)] for s, t in times.items()}}
    rows = "\n".join(f"| {s} | {res['median_ms'][s]:.2f} ms | {ratio[s]:.2f}x [{lo:.2f}-{hi:.2f}] |"
                     for s, (lo, hi) in res["over_zif_range"].items())
    md = f"""## The BPTT kernel with each surrogate (`benchmarks/bench_surrogate.py`, commit {res['commit']}, cpu, {args.threads} numba thread(s))

The numba backward of a BatchNorm-fed LIF neuron (Spikformer's settings), float32 `{list(SHAPE)}`: the
fastest of 10 calls per round, {args.rounds} interleaved rounds; ratios are the median of the per-round
ratios to the triangle surrogate, the bracket the lowest and highest round. Load average (1, 5, 15 min):
{', '.join(map(str, start))} at the start.

| surrogate | kernel | vs zif |
|---|---|---|
{rows}
"""
    print(md)
    write_results(NAME, res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
