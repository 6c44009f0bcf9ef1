"""PSN and SlidingPSN against SpikingJelly 2.0's modules: forward + backward time and bytes kept for backward.

    python benchmarks/bench_psn.py [--rounds 9]

The same float32 input, [32, 8, 128, 16, 16] batch-first for tetsnn and its time-first copy
[8, 32, 128, 16, 16] for SpikingJelly (the layout each library takes; the transpose is not timed),
the same parameters and the same surrogate (arctan, width 2: SpikingJelly's default). Variants run
interleaved round by round; the speed-up is SpikingJelly's time over tetsnn's within each round, and
its median over rounds is quoted. Saved bytes: every distinct storage ``saved_tensors_hooks`` packs
during the forward, the module's parameters excluded. Writes benchmarks/results/bench_psn.json and
its own section of docs/performance.md, naming the commit measured.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

from tetsnn import PSN, SlidingPSN, to_time_first
from tetsnn.kernels import psn_numba

from bench_lif import ROOT, interleave, mib, peak_memory, saved_bytes, summarise, verdict
from report import load_average, load_sentence, write_results

NAME = "bench_psn"
SHAPE = (32, 8, 128, 16, 16)
ORDER = 4  # SlidingPSN's order


def pairs(T: int) -> dict:
    """neuron -> (SpikingJelly's module, tetsnn's), sharing their parameters."""
    torch.manual_seed(0)
    sj_psn = sj_neuron.PSN(T, surrogate_function=sj_surrogate.ATan(alpha=2.0))
    with torch.no_grad():
        sj_psn.bias.zero_()  # so that about half of the neurons fire on this input, as SlidingPSN's do
    sj_sliding = sj_neuron.SlidingPSN(ORDER, surrogate_function=sj_surrogate.ATan(alpha=2.0), step_mode="m")
    ours_psn, ours_sliding = PSN(T, surrogate="atan"), SlidingPSN(ORDER, surrogate="atan")
    ours_psn.load_state_dict(sj_psn.state_dict())
    ours_sliding.load_state_dict(sj_sliding.state_dict())
    return {"PSN": (sj_psn, ours_psn), f"SlidingPSN(order={ORDER})": (sj_sliding, ours_sliding)}


def step(module, x, grad):
    def run():
        xx = x.detach().requires_grad_()
        module(xx).backward(grad)
    return run


def forward_only(module, x):
    return lambda: module(x.detach().requires_grad_())


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench(rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * 0.5 + 0.6   # the firing rates at the initial parameters are reported
    grad = torch.randn(SHAPE, generator=g)
    xt, gradt = to_time_first(x), to_time_first(grad)
    out = {}
    for name, (sj, ours) in pairs(SHAPE[1]).items():
        variants = {"spikingjelly": step(sj, xt, gradt), "tetsnn fused": step(ours, x, grad)}
        for fn in variants.values():
            fn()  # warm-up: the first call pays the numba compile
        times = interleave(variants, rounds, torch.device("cpu"))
        res = summarise(times, "tetsnn fused")  # speedup_vs_base = tetsnn's time / this variant's
        for key, mod, inp in (("spikingjelly", sj, xt), ("tetsnn fused", ours, x)):
            res[key]["saved_bytes"] = saved_bytes(forward_only(mod, inp), exclude=mod)
            res[key]["peak_bytes"] = peak_memory(variants[key], torch.device("cpu"))
        per_round = sorted(s / t for s, t in zip(times["spikingjelly"], times["tetsnn fused"]))
        res["speedup_vs_spikingjelly"] = round(per_round[len(per_round) // 2], 2)
        res["round_speedups"] = [round(r, 2) for r in per_round]
        res["saved_vs_spikingjelly"] = round(res["tetsnn fused"]["saved_bytes"] / res["spikingjelly"]["saved_bytes"], 3)
        with torch.no_grad():
            fired = float(ours(x).mean())
        res["firing_rate"] = round(fired, 3)
        out[name] = res
        print(name, res["speedup_vs_spikingjelly"], res["saved_vs_spikingjelly"], fired)
    return out


def markdown(res: dict) -> str:
    lines = [f"## PSN and SlidingPSN against SpikingJelly (`benchmarks/bench_psn.py`, commit {res['commit']}, "
             f"{res['device']}, {res['cpu_count']} CPUs, {res['torch_threads']} torch threads, torch {res['torch']}, "
             f"numba kernels: {res['numba']})", "",
             f"Forward + backward on float32 [{', '.join(map(str, SHAPE))}] (T = {SHAPE[1]}; SpikingJelly gets the "
             "time-first copy), arctan surrogate (width 2) in both. "
             f"{res['rounds']} interleaved rounds; the speed-up is SpikingJelly's time over tetsnn's within a round, "
             "median over rounds [lowest-highest round]. Saved bytes: what autograd keeps for backward "
             "(parameters excluded). Peak: the rise of peak RSS during one step. "
             + (load_sentence(res["load_start"], res["load_end"], res["cpu_count"]) if "load_end" in res else ""), "",
             "| neuron | firing rate | SpikingJelly | tetsnn fused | speed-up | saved, SpikingJelly | saved, tetsnn | "
             "saved ratio | peak, SpikingJelly | peak, tetsnn |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["neurons"].items():
        sj, ours = r["spikingjelly"], r["tetsnn fused"]
        spread = f"[{r['round_speedups'][0]}-{r['round_speedups'][-1]}]"
        lines.append(f"| {name} | {r['firing_rate']} | {sj['median_ms']} ms | {ours['median_ms']} ms | "
                     f"{r['speedup_vs_spikingjelly']}x {spread} | {mib(sj['saved_bytes'])} | {mib(ours['saved_bytes'])} | "
                     f"{r['saved_vs_spikingjelly']} | {mib(sj['peak_bytes'])} | {mib(ours['peak_bytes'])} |")
    lines += ["", "| goal | measured | verdict |", "|---|---|---|"]
    for name, r in res["neurons"].items():
        lines.append(f"| {name}: at least as fast as SpikingJelly | {r['speedup_vs_spikingjelly']}x | "
                     f"{verdict(r['speedup_vs_spikingjelly'], 1.0, False)} |")
        lines.append(f"| {name}: keeps less for backward | {r['saved_vs_spikingjelly']} | "
                     f"{verdict(r['saved_vs_spikingjelly'], 1.0 - 1e-9)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9, at least 7)")
    args = p.parse_args(argv)
    if args.rounds < 7:
        p.error("--rounds must be at least 7")
    result = dict(commit=commit(), device="cpu", machine=platform.machine(), cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), torch=torch.__version__, rounds=args.rounds,
                  numba=psn_numba.available(), started=time.strftime("%Y-%m-%d %H:%M:%S"), load_start=load_average())
    result["neurons"] = bench(args.rounds)
    result["load_end"] = load_average()
    write_results(NAME, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
