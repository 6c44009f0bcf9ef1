"""``memory="min"`` against the default mode and each model's ANN twin (``neuron="relu"``): saved
activation bytes, peak memory, step time, and a long-T step.

    python benchmarks/bench_memory.py [--rounds 7] [--skip-saved] [--skip-peak] [--skip-time] [--skip-long]

(a skipped table is kept from the previous run's JSON)

(a) Saved activation bytes of one float32 training forward (the distinct storages autograd keeps for
    backward, and those the ``memory="min"`` blocks keep behind their own hooks; parameter and buffer
    storages excluded): vggsnn [N, 10, 2, 48, 48] T=10, resnet19 and sew_resnet19 [N, 3, 32, 32] T=4.
(b) Peak memory of a resnet19 batch-8 training step with a fixed mmap threshold (glibc returns every
    freed large block at once, so the peak is that of the live tensors): the rise of VmHWM over the RSS
    before the step (after a warm-up step), every variant in a fresh process, median of 3 processes,
    the variants interleaved.
(c) Step time (forward + backward + SGD step), the variants interleaved round by round (each the faster
    of two steps, the order rotating); the ratios are taken within each round and their median quoted.
(d) A vggsnn batch-8 T=32 step with ``memory="min"`` against the default mode's at T=4 (peak as in (b)),
    and the floor of any exact per-block backward computed from the shapes (:func:`gradient_floor`).
The machine's load average is recorded before and after. Writes benchmarks/results/bench_memory.json and
its section of docs/performance.md.
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

NAME = "bench_memory"
ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vggsnn": ((10, 2, 48, 48), 10), "resnet19": ((3, 32, 32), 4), "sew_resnet19": ((3, 32, 32), 4)}
VARIANTS = {"ann (ReLU)": dict(neuron="relu"), "snn default": {}, "snn memory=min": dict(memory="min")}
GOALS = {"saved": 0.10, "time": 1.35, "peak": 0.35}
MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def build(name, variant, T):
    torch.manual_seed(0)
    return create_model(name, T=T, **VARIANTS[variant]).train()


def batch(name, n, T=None):
    shape, t = MODELS[name]
    if T is not None and len(shape) == 4:
        shape = (T, *shape[1:])
    g = torch.Generator().manual_seed(n)
    return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def load() -> list:
    return [round(v, 2) for v in os.getloadavg()]


# --------------------------------------------------------------------------- (a) saved bytes

def saved_table(n=8) -> dict:
    out = {}
    for name, (_, T) in MODELS.items():
        x, y = batch(name, n)
        row = {}
        for variant in VARIANTS:
            model = build(name, variant, T)
            _, forward = train_step(model, x, y)
            row[variant] = saved_bytes(forward, exclude=model)
            del model
        ann = row["ann (ReLU)"]
        out[name] = {v: dict(bytes=b, vs_ann=round(b / ann, 4)) for v, b in row.items()}
        out[name]["batch"] = n
        print("saved", name, json.dumps({v: out[name][v]["vs_ann"] for v in VARIANTS}), flush=True)
    return out


# --------------------------------------------------------------------------- (b), (d) peak memory

def peak_child(spec: str) -> int:
    """``NAME:VARIANT:N:T``: one training step after a warm-up step; prints the VmHWM rise in bytes."""
    name, variant, n, T = spec.split(":")
    x, y = batch(name, int(n), int(T))
    step, _ = train_step(build(name, variant, int(T)), x, y)
    step()
    print(json.dumps({"peak_bytes": peak_memory(step, torch.device("cpu"))}))
    return 0


def peaks(specs: dict, processes: int) -> dict:
    runs = {k: [] for k in specs}
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **MMAP}
    for _ in range(processes):   # interleaved: the variants see the same machine state in each round
        for k, spec in specs.items():
            res = subprocess.run([sys.executable, __file__, "--peak-child", spec], capture_output=True, text=True,
                                 check=True, env=env)
            runs[k].append(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])
    return {k: dict(peak_bytes=statistics.median(r), runs=r) for k, r in runs.items()}


def peak_table(processes=3) -> dict:
    out = peaks({v: f"resnet19:{v}:8:4" for v in VARIANTS}, processes)
    ann = out["ann (ReLU)"]["peak_bytes"]
    for r in out.values():
        r["vs_ann"] = round(r["peak_bytes"] / ann, 3)
    print("peak", json.dumps({v: r["vs_ann"] for v, r in out.items()}), flush=True)
    return out


def block_inputs(name: str) -> list:
    """The per-sample shapes of the inputs of ``name``'s ``memory="min"`` blocks, in forward order (one
    training step on one sample at T=1; a block's input is what it keeps, before any pooling it runs)."""
    from tetsnn import memory

    shapes, block = [], memory._Block

    class Recording(block):
        def __init__(self, fn, modules, x, *args):
            shapes.append(list(x.shape[2:]))
            super().__init__(fn, modules, x, *args)
    memory._Block = Recording
    try:
        x, y = batch(name, 1, 1)
        train_step(build(name, "snn memory=min", 1), x, y)[0]()
    finally:
        memory._Block = block
    return shapes


def gradient_floor(name: str, n: int, T: int) -> dict:
    """The least memory a step can run in with exact per-block autograd: a block's backward starts from its
    output gradient (which a training-mode BatchNorm sums over all N*T samples before any input gradient
    can be formed) and ends with its input gradient, so both are alive at once. Block k's output is block
    k+1's input (the last block's is taken as large as its input); float32."""
    shapes = block_inputs(name)
    size = [n * T * 4 * int(torch.tensor(s).prod()) for s in shapes]
    pairs = [(size[k + 1] if k + 1 < len(size) else size[k], size[k], k) for k in range(len(size))]
    out_b, in_b, k = max(pairs, key=lambda p: p[0] + p[1])
    return dict(peak_bytes=out_b + in_b, block=k + 1, output_gradient_bytes=out_b, input_gradient_bytes=in_b,
                block_input=shapes[k], block_output=shapes[k + 1] if k + 1 < len(shapes) else shapes[k])


def long_table(processes=1) -> dict:
    out = peaks({"snn default, T=4": "vggsnn:snn default:8:4", "snn memory=min, T=32": "vggsnn:snn memory=min:8:32"},
                processes)
    out[FLOOR] = gradient_floor("vggsnn", 8, 32)
    base = out["snn default, T=4"]["peak_bytes"]
    for r in out.values():
        r["vs_default_T4"] = round(r["peak_bytes"] / base, 3)
    print("long", json.dumps({v: r["vs_default_T4"] for v, r in out.items()}), flush=True)
    return out


FLOOR = "lower bound at T=32: the largest block's output + input gradient"


# --------------------------------------------------------------------------- (c) step time

TIMED = {"resnet19 batch 8": ("resnet19", 8), "vggsnn batch 2": ("vggsnn", 2)}


def time_table(rounds: int) -> dict:
    out = {}
    for label, (name, n) in TIMED.items():
        x, y = batch(name, n)
        steps = {}
        for variant in VARIANTS:
            step, _ = train_step(build(name, variant, MODELS[name][1]), x, y)
            step()  # warm-up (numba compiles on first use)
            steps[variant] = step
        times = {v: [] for v in steps}
        names = list(steps)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            one = interleave({v: steps[v] for v in order}, 2, torch.device("cpu"))
            for v, t in one.items():
                times[v].append(min(t))
        res = {v: dict(median_s=round(statistics.median(t), 4)) for v, t in times.items()}
        for base in ("ann (ReLU)", "snn default"):
            for v, t in times.items():
                per_round = sorted(a / b for a, b in zip(t, times[base]))
                res[v][f"vs {base}"] = round(statistics.median(per_round), 3)
                res[v][f"rounds vs {base}"] = [round(r, 3) for r in per_round]
        out[label] = res
        print("time", label, json.dumps({v: r["vs snn default"] for v, r in res.items()}), flush=True)
    return out


# --------------------------------------------------------------------------- report

def markdown(res: dict) -> str:
    lines = ["## memory=\"min\": recompute in backward (`bench_memory.py`)", "",
             f"Measured at commits {', '.join(f'`{c}` ({k})' for k, c in res.get('commits', {}).items())} on {res['machine']} with {res['torch_threads']} torch "
             f"threads (torch {res['torch']}), CPU, float32; load average (1, 5, 15 min) "
             f"{res.get('load_before')} before and {res.get('load_after')} after (the machine is shared with other "
             f"work). Step times are medians of {res.get('rounds', '?')} interleaved per-round ratios.", ""]
    goals = ["| goal | target | measured | |", "|---|---|---|---|"]
    if "saved" in res:
        lines += ["| saved bytes, batch 8 | ANN twin | default | memory=\"min\" | min vs ANN |", "|---|---|---|---|---|"]
        for name, row in res["saved"].items():
            v = row["snn memory=min"]["vs_ann"]
            lines.append(f"| {name} (T={MODELS[name][1]}) | {mib(row['ann (ReLU)']['bytes'])} | "
                         f"{mib(row['snn default']['bytes'])} | {mib(row['snn memory=min']['bytes'])} | {v}x |")
            goals.append(f"| {name} saved bytes vs ANN | <= {GOALS['saved']:.2f}x | {v}x | {verdict(v, GOALS['saved'])} |")
        lines.append("")
    if "time" in res:
        lines += ["| step time | ANN twin | default | memory=\"min\" | min vs default |", "|---|---|---|---|---|"]
        for label, row in res["time"].items():
            v = row["snn memory=min"]["vs snn default"]
            lines.append(f"| {label} | {row['ann (ReLU)']['median_s'] * 1e3:.0f} ms | "
                         f"{row['snn default']['median_s'] * 1e3:.0f} ms | "
                         f"{row['snn memory=min']['median_s'] * 1e3:.0f} ms | {v}x |")
            goals.append(f"| {label} step time vs default | <= {GOALS['time']:.2f}x | {v}x | {verdict(v, GOALS['time'])} |")
        lines.append("")
    if "peak" in res:
        lines += ["| resnet19 batch 8 step, fixed mmap threshold | peak rise | vs ANN |", "|---|---|---|"]
        for v, r in res["peak"].items():
            lines.append(f"| {v} | {mib(r['peak_bytes'])} | {r['vs_ann']}x |")
        v = res["peak"]["snn memory=min"]["vs_ann"]
        goals.append(f"| resnet19 peak RSS vs ANN | <= {GOALS['peak']:.2f}x | {v}x | {verdict(v, GOALS['peak'])} |")
        lines.append("")
    if "long" in res:
        lines += ["| vggsnn batch 8, fixed mmap threshold | peak rise | vs default at T=4 |", "|---|---|---|"]
        for v, r in res["long"].items():
            lines.append(f"| {v} | {mib(r['peak_bytes'])} | {r['vs_default_T4']}x |")
        if FLOOR in res["long"]:
            f = res["long"][FLOOR]
            lines += ["", f"The lower bound is computed from the shapes: block {f['block']} (input "
                          f"{' x '.join(map(str, f['block_input']))}, output {' x '.join(map(str, f['block_output']))} per "
                          f"sample and step) passes back an output gradient of {mib(f['output_gradient_bytes'])} and an "
                          f"input gradient of {mib(f['input_gradient_bytes'])} at batch 8, T=32. Its training-mode "
                          "BatchNorm needs the sums of its output gradient over all samples and steps before any input "
                          "gradient can be formed, so with per-block autograd both are alive at once, whatever is "
                          "kept for backward and however a block splits its own backward: the goal is out of reach "
                          "unless the whole network's backward runs a chunk of time steps at a time, outside "
                          "autograd's block-by-block order."]
        v = res["long"]["snn memory=min, T=32"]["vs_default_T4"]
        goals.append(f"| vggsnn T=32 min step within default's T=4 peak | <= 1.00x | {v}x | {verdict(v, 1.0)} |")
        lines.append("")
    return "\n".join(lines + goals) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved step-time rounds (default 7)")
    for table in ("saved", "peak", "time", "long"):
        p.add_argument(f"--skip-{table}", action="store_true", help=f"keep the {table} table of the last run")
    p.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child:
        return peak_child(args.peak_child)
    t0, before = time.time(), load()
    tables = {"saved": saved_table, "peak": peak_table, "time": lambda: time_table(args.rounds), "long": long_table}
    for table, measure in tables.items():   # each table is written as it finishes
        if getattr(args, f"skip_{table}"):
            continue
        measured = {table: measure()}
        if table == "time":
            measured["rounds"] = args.rounds
        last = ROOT / "benchmarks" / "results" / f"{NAME}.json"
        result = json.loads(last.read_text()) if last.exists() else {}
        result.update(measured, device="cpu", machine=platform.machine(), cpu_count=os.cpu_count(),
                      torch_threads=torch.get_num_threads(), torch=torch.__version__, seconds=round(time.time() - t0),
                      load_before=before, load_after=load())
        result["commits"] = {**result.get("commits", {}), table: commit()}
        write_results(NAME, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
