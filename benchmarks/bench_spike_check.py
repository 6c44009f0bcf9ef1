"""Cost of checking that a spike-fed layer's input is 0/1.

A layer built with ``spikes=True`` saves its input as packed bits for the weight gradient, and checks
that the input is 0/1 as it packs it (on the CPU in the packing's own pass, ``ops._pack_checked``;
elsewhere by ``ops.check_spikes`` first). Measured: a spike-fed ``Layer`` (conv + BatchNorm + LIF)
forward + backward with the checked packing and with a packing that checks nothing, interleaved in
each round; the ratio is taken within a round and the median over rounds is quoted. The last two
columns time the two packings alone.

    PYTHONPATH=src python benchmarks/bench_spike_check.py [--rounds 7] [--device cpu]

Writes benchmarks/results/spike_check.json and the bench_spike_check section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import tetsnn
from tetsnn.kernels import ops as compact

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [  # (N, T, C_in, C_out, H=W)
    (16, 4, 64, 64, 16),
    (16, 4, 128, 128, 8),
    (8, 10, 64, 128, 24),
]


def _time(fn, reps, device):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def measure(shape, rounds, reps, device):
    N, T, cin, cout, hw = shape
    torch.manual_seed(0)
    layer = tetsnn.Layer(cin, cout, spikes=True).to(device)
    x = (torch.rand(N, T, cin, hw, hw, device=device) < 0.2).float()

    def step():
        layer.zero_grad(set_to_none=True)
        compact._RECENT.clear()          # pack (and check) afresh every call
        layer(x).sum().backward()

    real = compact._pack_checked
    unchecked = lambda t: compact.pack_spikes(t.detach())   # noqa: E731
    ratios, times = [], {"checked": [], "unchecked": []}
    for r in range(rounds):
        order = ("checked", "unchecked") if r % 2 == 0 else ("unchecked", "checked")
        got = {}
        for variant in order:
            compact._pack_checked = real if variant == "checked" else unchecked
            try:
                got[variant] = _time(step, reps, device)
            finally:
                compact._pack_checked = real
        ratios.append(got["checked"] / got["unchecked"])
        for k, v in got.items():
            times[k].append(v)
    flat = x.view(N * T, cin, hw, hw)
    return dict(shape=dict(N=N, T=T, C_in=cin, C_out=cout, H=hw, W=hw), ratio_median=statistics.median(ratios),
                ratio_min=min(ratios), ratio_max=max(ratios),
                checked_ms=1e3 * statistics.median(times["checked"]),
                unchecked_ms=1e3 * statistics.median(times["unchecked"]),
                pack_checked_ms=1e3 * _time(lambda: real(flat), reps, device),
                pack_unchecked_ms=1e3 * _time(lambda: unchecked(flat), reps, device))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows = [measure(s, args.rounds, args.reps, args.device) for s in SHAPES]
    result = dict(commit=commit, device=args.device, machine=platform.machine(), cpus=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), torch=torch.__version__, rounds=args.rounds,
                  load_average=os.getloadavg()[0], rows=rows)
    out = ROOT / "benchmarks" / "results" / "spike_check.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = ["| input [N, T, C, H, W] -> C_out | forward + backward, checked | unchecked | checked / unchecked "
             "(median [min-max]) | packing alone, checked | unchecked |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        table.append(f"| [{s['N']}, {s['T']}, {s['C_in']}, {s['H']}, {s['W']}] -> {s['C_out']} | "
                     f"{r['checked_ms']:.2f} ms | {r['unchecked_ms']:.2f} ms | {r['ratio_median']:.3f}x "
                     f"[{r['ratio_min']:.3f}-{r['ratio_max']:.3f}] | {r['pack_checked_ms']:.2f} ms | "
                     f"{r['pack_unchecked_ms']:.2f} ms |")
    section = "\n".join([
        "<!-- begin bench_spike_check -->",
        f"## The 0/1 check of spike-fed layers (`benchmarks/bench_spike_check.py`, commit {commit}, "
        f"{args.device}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
        f"{result['load_average']:.1f} at the start)",
        "",
        f"A spike-fed `Layer` (conv + BatchNorm + LIF, `spikes=True`), forward + backward, packing its input "
        f"with the 0/1 check (on the CPU in the packing's own pass) and without it; {args.rounds} interleaved "
        f"rounds, the ratio taken within each round, median over rounds; then the two packings alone.",
        "",
        *table,
        "<!-- end bench_spike_check -->",
    ])
    perf = ROOT / "docs" / "performance.md"
    text = perf.read_text()
    if "<!-- begin bench_spike_check -->" in text:
        head, rest = text.split("<!-- begin bench_spike_check -->", 1)
        text = head + section + rest.split("<!-- end bench_spike_check -->", 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    perf.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
