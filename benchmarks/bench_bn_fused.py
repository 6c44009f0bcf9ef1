"""BatchNorm fused into the neuron: saved activation bytes, peak memory and step time against the
unfused layers (``fuse_bn=False``) and each model's ANN twin (``neuron="relu"``).

    python benchmarks/bench_bn_fused.py [--rounds 7] [--skip-saved] [--skip-peak] [--skip-time]

(a skipped table is kept from the previous run's JSON)

(a) Saved activation bytes of one training forward (the distinct storages autograd keeps for
    backward, parameter and buffer storages excluded): resnet19 [N, 3, 32, 32] T=4, vggsnn
    [N, 10, 2, 48, 48] T=10, sew_resnet19 [N, 3, 32, 32] T=4; float32 at batch 8 and 16, bf16
    autocast at batch 8.
(b) Peak memory of a resnet19 batch-16 training step: the rise of VmHWM over the RSS before the
    step (after a warm-up step), every variant in a fresh process, median of 3 processes each; with
    glibc's default allocator settings and with a fixed mmap threshold (live tensors only).
(c) Step time (forward + backward + SGD step) of resnet19 batch 8 and of the README's digits network
    (batch 64, T=4), the three variants interleaved round by round (each the faster of two steps in
    turn, the order rotating from round to round); the ratios are taken within each round and their
    median quoted. The digits network runs 3x as many rounds (its steps are short and noisier).
Writes benchmarks/results/bench_bn_fused.json and its section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tetsnn import create_model

from bench_lif import interleave, mib, peak_memory, saved_bytes, train_step, verdict
from report import commit, write_results

NAME = "bench_bn_fused"
ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (input shape after the batch dim, T, goal for the fused model's saved bytes vs ANN)
    "resnet19": ((3, 32, 32), 4, 0.60),
    "vggsnn": ((10, 2, 48, 48), 10, 0.60),
    "sew_resnet19": ((3, 32, 32), 4, 0.70),
    "digits_snn": ((1, 8, 8), 4, None),  # step time only
}
VARIANTS = {"ann (ReLU)": dict(neuron="relu"), "snn fuse_bn=False": dict(fuse_bn=False), "snn fused": {}}


def build(name, variant, T):
    torch.manual_seed(0)
    return create_model(name, T=T, **VARIANTS[variant]).train()


def batch(name, n):
    shape, _, _ = MODELS[name]
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


# --------------------------------------------------------------------------- (a) saved bytes

def saved_table() -> dict:
    out = {}
    for name, (_, T, goal) in MODELS.items():
        if goal is None:
            continue
        for label, n, dtype in (("float32, batch 8", 8, None), ("float32, batch 16", 16, None),
                                ("bf16 autocast, batch 8", 8, torch.bfloat16)):
            x, y = batch(name, n)
            row = {}
            for variant in VARIANTS:
                model = build(name, variant, T)
                _, forward = train_step(model, x, y, dtype)
                row[variant] = saved_bytes(forward, exclude=model)
                del model
            ann = row["ann (ReLU)"]
            out.setdefault(name, {})[label] = {v: dict(bytes=b, vs_ann=round(b / ann, 3)) for v, b in row.items()}
            print(name, label, json.dumps({v: r["vs_ann"] for v, r in out[name][label].items()}), flush=True)
    return out


# --------------------------------------------------------------------------- (b) peak memory

def peak_child(variant: str) -> int:
    """One resnet19 batch-16 step after a warm-up step; prints the VmHWM rise in bytes."""
    x, y = batch("resnet19", 16)
    step, _ = train_step(build("resnet19", variant, 4), x, y)
    step()
    print(json.dumps({"peak_bytes": peak_memory(step, torch.device("cpu"))}))
    return 0


PEAK_SETTINGS = {  # name -> extra environment of the child processes
    "peak": {},
    # glibc's default moves its mmap threshold up as large blocks are freed, after which freed
    # tensors stay in the heap and count in the RSS: a fixed threshold returns every large block at
    # once, so the peak is that of the live tensors
    "peak, fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


def peak_table(extra_env: dict, processes=3) -> dict:
    runs = {v: [] for v in VARIANTS}
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **extra_env}
    for _ in range(processes):  # interleaved: the variants see the same machine state in each round
        for variant in VARIANTS:
            res = subprocess.run([sys.executable, __file__, "--peak-child", variant], capture_output=True,
                                 text=True, check=True, env=env)
            runs[variant].append(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])
    ann = statistics.median(runs["ann (ReLU)"])
    out = {v: dict(peak_bytes=statistics.median(r), runs=r, vs_ann=round(statistics.median(r) / ann, 3))
           for v, r in runs.items()}
    print("peak", extra_env, json.dumps({v: r["vs_ann"] for v, r in out.items()}), flush=True)
    return out


# --------------------------------------------------------------------------- (c) step time

TIMED = {"resnet19 batch 8": ("resnet19", 8), "digits_snn batch 64": ("digits_snn", 64)}  # the README's run
TIMED_ROUNDS = {"resnet19 batch 8": 1, "digits_snn batch 64": 3}  # multiples of --rounds


def time_table(rounds: int) -> dict:
    out = {}
    for label, (name, n) in TIMED.items():
        x, y = batch(name, n)
        steps = {}
        for variant in VARIANTS:
            step, _ = train_step(build(name, variant, MODELS[name][1]), x, y)
            step()  # warm-up (numba compiles on first use)
            steps[variant] = step
        # each round times every variant in turn, each as the faster of two steps (a load spike from
        # other work on the machine then has to hit both to count), starting from the next variant
        # each round so that no variant always runs right after the same other one
        times = {v: [] for v in steps}
        names = list(steps)
        for r in range(rounds * TIMED_ROUNDS[label]):
            order = names[r % len(names):] + names[:r % len(names)]
            one = interleave({v: steps[v] for v in order}, 2, torch.device("cpu"))
            for v, t in one.items():
                times[v].append(min(t))
        res = {v: dict(median_s=round(statistics.median(t), 4)) for v, t in times.items()}
        for base in ("ann (ReLU)", "snn fuse_bn=False"):
            for v, t in times.items():
                per_round = sorted(a / b for a, b in zip(t, times[base]))
                res[v][f"vs {base}"] = round(statistics.median(per_round), 3)
                res[v][f"rounds vs {base}"] = [round(r, 3) for r in per_round]
        out[label] = res
        print("time", label, json.dumps({v: (r["vs ann (ReLU)"], r["vs snn fuse_bn=False"]) for v, r in res.items()}),
              flush=True)
    return out


# --------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    lines = [f"## BatchNorm fused into the neuron (`benchmarks/bench_bn_fused.py`, {res['device']}, "
             f"{res['cpu_count']} CPUs, {res['torch_threads']} torch threads, torch {res['torch']}, "
             f"commit {res.get('commit', 'not recorded')})", "",
             "Each model against its ANN twin (`neuron=\"relu\"`, the same layers with ReLU) and against the "
             "unfused spiking layers (`fuse_bn=False`; its pooling of spikes keeps no float copy either).", "",
             "### (a) Saved activation bytes of one training step (parameters and buffers excluded)", "",
             "| model | setting | ANN twin | SNN fuse_bn=False | SNN fused | unfused vs ANN | fused vs ANN |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in res.get("saved", {}).items():
        for label, r in rows.items():
            a, u, f = (r[v] for v in VARIANTS)
            lines.append(f"| {name} | {label} | {mib(a['bytes'])} | {mib(u['bytes'])} | {mib(f['bytes'])} | "
                         f"{u['vs_ann']}x | {f['vs_ann']}x |")
    goals = []
    for name, (_, _, goal) in MODELS.items():
        if goal is None or "saved" not in res:
            continue
        v = res["saved"][name]["float32, batch 8"]["snn fused"]["vs_ann"]
        goals.append(f"| {name} saved bytes vs ANN, float32 batch 8 | <= {goal:.2f}x | {v}x | {verdict(v, goal)} |")
    for key, extra_env in PEAK_SETTINGS.items():
        if key not in res:
            continue
        p = res[key]
        how = f", with {', '.join(f'{k}={v}' for k, v in extra_env.items())}" if extra_env else ""
        lines += ["", f"### (b) Peak memory of a resnet19 batch-16 training step (VmHWM rise, fresh process per "
                      f"variant, median of 3{how})", "", "| variant | peak rise | vs ANN | runs |", "|---|---|---|---|"]
        for v, r in p.items():
            lines.append(f"| {v} | {mib(r['peak_bytes'])} | {r['vs_ann']}x | "
                         f"{', '.join(mib(b) for b in r['runs'])} |")
        v = p["snn fused"]["vs_ann"]
        goals.append(f"| resnet19 batch-16 step {key} vs ANN | <= 0.85x | {v}x | {verdict(v, 0.85)} |")
    if "peak" in res:
        lines += ["", "With glibc's default settings the VmHWM also counts freed tensors the allocator kept in its "
                      "heap, which depends on the order of allocations and frees: the runs spread by 10-20%. With "
                      "a fixed mmap threshold every large block goes back to the system when freed, and the peak "
                      "is that of the live tensors (the same in every run)."]
    if "time" in res:
        counts = ", ".join(f"{label}: {res['rounds'] * TIMED_ROUNDS.get(label, 1)}" for label in res["time"])
        lines += ["", f"### (c) Training step time (forward + backward + SGD), interleaved rounds ({counts})", "",
                  "The bracket gives the lowest and highest per-round ratio.", "",
                  "| step | variant | median step | vs ANN | vs fuse_bn=False |", "|---|---|---|---|---|"]
        for label, t in res["time"].items():
            for v, r in t.items():
                ra, ru = r["rounds vs ann (ReLU)"], r["rounds vs snn fuse_bn=False"]
                lines.append(f"| {label} | {v} | {r['median_s'] * 1e3:.0f} ms | {r['vs ann (ReLU)']}x "
                             f"[{ra[0]:.2f}-{ra[-1]:.2f}] | {r['vs snn fuse_bn=False']}x [{ru[0]:.2f}-{ru[-1]:.2f}] |")
            v = t["snn fused"]["vs snn fuse_bn=False"]
            goals.append(f"| {label} step time, fused vs fuse_bn=False | <= 1.02x | {v}x | {verdict(v, 1.02)} |")
            v = t["snn fused"]["vs ann (ReLU)"]
            goals.append(f"| {label} step time, fused vs ANN (aim) | <= 1.00x | {v}x | {verdict(v, 1.00)} |")
    if "time" in res:
        lines += ["", "The fused backward rebuilds the normalised input inside the LIF's BPTT kernel from the conv "
                      "output and the saved statistics, so it reads the conv output where the unfused LIF reads the "
                      "BatchNorm output: the same memory traffic, and one op call per layer instead of two. Before "
                      "that (the backward ran BatchNorm's forward again, and the ops went through the dispatcher "
                      "on every call) the fused step was 1.034x the unfused one for resnet19 and 1.116x for the "
                      "digits network."]
    lines += ["", "### Goals", "", "| measure | goal | measured | verdict |", "|---|---|---|---|"] + goals
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved step-time rounds (default 7)")
    p.add_argument("--skip-saved", action="store_true", help="keep the saved-bytes table of the last run")
    p.add_argument("--skip-time", action="store_true", help="keep the step-time table of the last run")
    p.add_argument("--skip-peak", action="store_true", help="keep the peak-memory table of the last run")
    p.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child:
        return peak_child(args.peak_child)
    t0 = time.time()
    measured = {}
    if not args.skip_saved:
        measured["saved"] = saved_table()
    if not args.skip_peak:
        for key, extra_env in PEAK_SETTINGS.items():
            measured[key] = peak_table(extra_env)
    if not args.skip_time:
        measured.update(time=time_table(args.rounds), rounds=args.rounds)
    last = ROOT / "benchmarks" / "results" / f"{NAME}.json"
    result = json.loads(last.read_text()) if last.exists() else {}  # the tables a skip keeps
    result.update(measured, commit=commit(), device="cpu", machine=platform.machine(), cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), torch=torch.__version__)
    if measured:
        result["seconds"] = round(time.time() - t0)  # of the latest measuring invocation
    write_results(NAME, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
