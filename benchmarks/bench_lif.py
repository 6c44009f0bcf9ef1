"""LIF backends and a ResNet19 training step against their baselines: time, saved bytes, peak memory.

    python benchmarks/bench_lif.py [--rounds 5] [--batches 8 16] [--skip-resnet]

    python benchmarks/bench_lif.py --zoo [--rounds 7]    # PLIF, ILIF and the vggsnn step with PLIF only

(a) LIF forward + backward on [32, T, 128, 16, 16], T = 2, 4, 8: every backend against "loop".
(b) A ResNet19 CIFAR training step (T = 4) against its ANN twin (ReLU in place of LIF, N*T images),
    and against the per-step loop without compact spikes (the network before the fast backends).
On CUDA it adds (c) the Triton kernels' bandwidth on 2^26 neurons x T=8 against torch's
device-to-device copy, and (d) a bf16 ResNet19 step at batch 64 against its ANN twin.

Variants are interleaved round by round and the medians compared. Saved bytes: every tensor that
``saved_tensors_hooks`` packs during the forward, each distinct storage once at its full size.
Peak memory: the rise of peak RSS over the starting RSS (CPU) or of CUDA max allocated.
Writes benchmarks/results/bench_lif.json and its own section of docs/performance.md; ``--zoo``
(PLIF and ILIF forward + backward at T = 8 against their loop path and SpikingJelly 2.0's modules, and
a vggsnn training step with neuron="plif" against "lif") writes bench_lif_zoo.json and its section.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tetsnn import ILIF, LIF, PLIF, create_model, tet_loss
from tetsnn import compact
from tetsnn.kernels import numba_kernels, ops
from tetsnn.memory import kept_tensors
from tetsnn.neuron.spec import NeuronSpec

from report import load_average, load_sentence, write_results

NAME = "bench_lif"  # a CUDA run writes bench_lif_cuda (JSON and section), next to the CPU one
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- measuring

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def saved_bytes(fn, exclude=None) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs its forward; with ``exclude``
    (a module), not counting the storages of its parameters and buffers."""
    storages = {}
    skip = set() if exclude is None else {(t.untyped_storage().device, t.untyped_storage().data_ptr())
                                           for t in [*exclude.parameters(), *exclude.buffers()]}

    def pack(t):
        st = t.untyped_storage()
        if (st.device, st.data_ptr()) not in skip:
            storages[(st.device, st.data_ptr())] = st.nbytes()
        return t.detach()   # a saved output kept with its graph node would hold the graph in a cycle

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for t in kept_tensors():   # memory="min" blocks keep theirs behind their own hooks
        pack(t)
    del out
    return sum(storages.values())


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn, device) -> int | None:
    """Rise of peak memory while ``fn()`` runs, in bytes (None where it cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is honest
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        return None
    fn()
    return (_rss_kib("VmHWM") - base) * 1024


def interleave(variants: dict, rounds: int, device) -> dict:
    """Time every variant once per round, in turn; returns name -> list of seconds."""
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(times: dict, base: str) -> dict:
    """Per variant: median seconds, and the speed-up over ``base`` within each round (the two ran
    back to back, so they saw the same load) with its median as the headline."""
    out = {}
    for k, v in times.items():
        per_round = sorted(b / t for b, t in zip(times[base], v))
        out[k] = dict(median_ms=round(statistics.median(v) * 1e3, 2),
                      speedup_vs_base=round(statistics.median(per_round), 2),
                      round_speedups=[round(r, 2) for r in per_round])
    return out


# --------------------------------------------------------------------------- (a) LIF alone

def lif_backends(device) -> list:
    names = ["loop", "fused"]
    if device.type == "cpu":
        names.append("fused-torch-ops")  # the same Function with torch ops instead of numba
    else:
        names.append("triton")
    return names


def lif_step(name, x, grad):
    backend = "fused" if name == "fused-torch-ops" else name
    m = LIF(backend=backend)

    def run():
        xx = x.detach().requires_grad_()
        y = m(xx)
        y.backward(grad)
    return run


def with_torch_ops(fn):
    def run():
        numba = numba_kernels.STATE["numba"]
        numba_kernels.disable()
        try:
            fn()
        finally:
            numba_kernels.STATE["numba"] = numba
    return run


def bench_lif(device, rounds) -> dict:
    results = {}
    for T in (2, 4, 8):
        g = torch.Generator(device="cpu").manual_seed(T)
        x = (torch.randn(32, T, 128, 16, 16, generator=g) * 0.8 + 0.5).to(device)
        grad = torch.randn(x.shape, generator=g).to(device)
        variants = {}
        for name in lif_backends(device):
            fn = lif_step(name, x, grad)
            variants[name] = with_torch_ops(fn) if name == "fused-torch-ops" else fn
        first = {}
        for name, fn in variants.items():  # warm-up; the first call pays any one-time compile
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            first[name] = time.perf_counter() - t0
        times = interleave(variants, rounds, device)
        res = summarise(times, "loop")
        for name, fn in variants.items():
            res[name]["saved_bytes"] = saved_bytes(lambda: fn_forward(name, x))
            res[name]["peak_bytes"] = peak_memory(fn, device)
            res[name]["first_call_ms"] = round(first[name] * 1e3, 1)
        results[f"T={T}"] = res
        print(f"LIF T={T}:", json.dumps({k: (v['median_ms'], v['speedup_vs_base']) for k, v in res.items()}))
    return results


def fn_forward(name, x):
    backend = "fused" if name == "fused-torch-ops" else name
    return LIF(backend=backend)(x.detach().requires_grad_())


def numba_compile_cost() -> dict:
    """Seconds the numba kernels of one configuration take to build and compile (once per process,
    reset mode, surrogate and dtype): a fresh configuration's first call minus a later one."""
    x = torch.randn(4, 4, 64) + 0.5
    m = LIF(surrogate="atan", reset="soft", backend="fused")  # a configuration nothing ran before

    def once():
        t0 = time.perf_counter()
        xx = x.clone().requires_grad_()
        m(xx).sum().backward()
        return time.perf_counter() - t0
    first = once()
    later = min(once() for _ in range(3))
    return dict(forward_and_backward_s=round(first - later, 2), threads=torch.get_num_threads())


# --------------------------------------------------------------------------- (b) ResNet19 step

def resnet_variants(device, dtype=None):
    """name -> model; the SNNs load the ANN's weights (their state_dict keys are the same)."""
    ann = create_model("resnet19", T=4, neuron="relu")
    models = {"ann (ReLU)": ann, "snn (default)": create_model("resnet19", T=4)}
    if dtype is None:
        loop = create_model("resnet19", T=4, backend="loop")
        for m in loop.modules():
            if isinstance(m, (compact.SpikeConv2d, compact.SpikeLinear)):
                m.compact = False
        models["snn (loop, no compact)"] = loop
    for m in models.values():
        m.load_state_dict(ann.state_dict())
        m.to(device).train()
    return models


def train_step(model, x, y, dtype=None, loss=tet_loss):
    """``(step, forward)``: one SGD-with-momentum training step on ``(x, y)``, and the loss alone
    (``loss(output, y)``, TET's by default; under autocast to ``dtype`` where given)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def forward():
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            return loss(model(x), y)

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, forward


def bench_resnet(device, batches, rounds, dtype=None) -> dict:
    results = {}
    for n in batches:
        g = torch.Generator(device="cpu").manual_seed(n)
        x = torch.randn(n, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (n,), generator=g).to(device)
        steps = {k: train_step(m, x, y, dtype) for k, m in resnet_variants(device, dtype).items()}
        for step, _ in steps.values():
            step()  # warm-up
        times = interleave({k: s for k, (s, _) in steps.items()}, rounds, device)
        res = summarise(times, "ann (ReLU)")
        for k, (step, forward) in steps.items():
            per_round = sorted(t / a for a, t in zip(times["ann (ReLU)"], times[k]))
            res[k] = dict(median_ms=res[k]["median_ms"], time_vs_ann=round(statistics.median(per_round), 3),
                          round_times_vs_ann=[round(r, 3) for r in per_round])
            res[k]["saved_bytes"] = saved_bytes(forward)
            res[k]["peak_bytes"] = peak_memory(step, device)
        ann = res["ann (ReLU)"]
        for v in res.values():
            v["saved_vs_ann"] = round(v["saved_bytes"] / ann["saved_bytes"], 3)
            if v["peak_bytes"] and ann["peak_bytes"]:
                v["peak_vs_ann"] = round(v["peak_bytes"] / ann["peak_bytes"], 3)
        results[f"N={n}"] = res
        print(f"ResNet19 N={n}:", json.dumps({k: (v['time_vs_ann'], v['saved_vs_ann']) for k, v in res.items()}))
    return results


# --------------------------------------------------------------------------- (c) Triton bandwidth (CUDA)

def device_seconds(fn, device, reps=5) -> float:
    """Median seconds of ``fn()`` after a warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def bench_triton_bandwidth(device, neurons=2 ** 26, T=8) -> dict:
    """Bytes each Triton direction moves per second, against torch's device-to-device copy.

    Forward: x in, s out. Backward: x in, h out (the recurrence again), then dL/ds and h in, dL/dx out."""
    from tetsnn.kernels import triton_lif
    x = torch.randn(1, T, neurons, device=device) + 0.5
    grad = torch.randn_like(x)
    dst = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    copy = 2 * nbytes / device_seconds(lambda: dst.copy_(x), device)
    c = ops.constants(NeuronSpec(), x.dtype, device)
    fwd = 2 * nbytes / device_seconds(lambda: triton_lif.forward(x, c, True), device)
    bwd = 5 * nbytes / device_seconds(lambda: triton_lif.backward(grad, x, c, True, False, "zif"), device)
    return dict(gpu=device_name(device), neurons_per_step=neurons, T=T,
                copy_GBps=round(copy / 1e9, 1), forward_GBps=round(fwd / 1e9, 1), backward_GBps=round(bwd / 1e9, 1),
                forward_vs_copy=round(fwd / copy, 3), backward_vs_copy=round(bwd / copy, 3))


# --------------------------------------------------------------------------- (e) PLIF, ILIF and the PLIF vggsnn

ZOO_SHAPE = (16, 8, 64, 16, 16)   # [N, T=8, C, H, W] float32


def zoo_modules(kind):
    """name -> (module, time_first): tetsnn's loop and fused paths and SpikingJelly's module, same parameters."""
    from spikingjelly.activation_based import neuron as sjn, surrogate as sjs
    if kind == "plif":
        sj = sjn.ParametricLIFNode(init_tau=2.0, decay_input=False, v_reset=0.0,
                                   surrogate_function=sjs.Sigmoid(alpha=4.0), step_mode="m")
        make = lambda b: PLIF(tau=0.5, surrogate="sigmoid", backend=b)  # noqa: E731
    else:
        sj = sjn.ILIFNode(tau=4.0 / 3.0, step_mode="m")
        make = lambda b: ILIF(max_level=4, tau=0.25, backend=b)  # noqa: E731
    return {"loop": (make("loop"), False), "fused": (make("fused"), False), "spikingjelly": (sj, True)}


def zoo_step(module, time_first, x, grad):
    from spikingjelly.activation_based import functional as sjf

    def run():
        xx = x.detach().requires_grad_()
        if time_first:
            sjf.reset_net(module)
            y = module(xx.transpose(0, 1)).transpose(0, 1)
        else:
            y = module(xx)
        y.backward(grad)
    return run


def bench_zoo(rounds) -> dict:
    results = {}
    g = torch.Generator().manual_seed(8)
    x = torch.randn(ZOO_SHAPE, generator=g) * 0.8 + 0.5
    grad = torch.randn(ZOO_SHAPE, generator=g)
    for kind in ("plif", "ilif"):
        variants = {k: zoo_step(m, tf, x, grad) for k, (m, tf) in zoo_modules(kind).items()}
        for fn in variants.values():
            fn()   # warm-up: compiles
        times = interleave(variants, rounds, torch.device("cpu"))
        res = {}
        for k, v in times.items():
            res[k] = dict(median_ms=round(statistics.median(v) * 1e3, 2))
        for base in ("loop", "spikingjelly"):
            per_round = sorted(b / f for b, f in zip(times[base], times["fused"]))
            res["fused"][f"speedup_vs_{base}"] = round(statistics.median(per_round), 2)
            res["fused"][f"round_speedups_vs_{base}"] = [round(r, 2) for r in per_round]
        results[kind] = res
        print(kind, json.dumps(res))
    results["vggsnn_plif_vs_lif"] = bench_vgg_plif(rounds)
    return results


def bench_vgg_plif(rounds, n=2, T=8, size=32) -> dict:
    """A vggsnn training step (T = 8, 2 x 32 x 32 frames) with neuron="plif" against the same with "lif"."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, T, 2, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    steps = {}
    for neuron in ("lif", "plif"):
        torch.manual_seed(0)
        steps[neuron] = train_step(create_model("vggsnn", T=T, size=size, neuron=neuron).train(), x, y)[0]
    for step in steps.values():
        step()
    times = interleave(steps, rounds, torch.device("cpu"))
    per_round = sorted(p / l_ for l_, p in zip(times["lif"], times["plif"]))
    return dict(shape=[n, T, 2, size, size], lif_ms=round(statistics.median(times["lif"]) * 1e3, 1),
                plif_ms=round(statistics.median(times["plif"]) * 1e3, 1),
                plif_vs_lif=round(statistics.median(per_round), 3), round_ratios=[round(r, 3) for r in per_round])


def zoo_markdown(res: dict) -> str:
    lines = [f"## PLIF and ILIF (`benchmarks/bench_lif.py --zoo`, cpu, {res['cpu_count']} CPUs, "
             f"{res['torch_threads']} torch threads, torch {res['torch']}, commit {res['commit']})", "",
             f"Forward + backward on {list(ZOO_SHAPE)} float32 (T = 8), {res['rounds']} interleaved rounds; each "
             "speed-up is the median of the per-round ratios (bracket: lowest and highest round). SpikingJelly "
             "2.0's modules run in its [T, N, ...] layout on the same values (`ParametricLIFNode(init_tau=2, "
             "decay_input=False)`, `ILIFNode()`), tetsnn's as `PLIF(tau=0.5)` and `ILIF()`. "
             + (load_sentence(res["load_start"], res["load_end"], res["cpu_count"]) if "load_end" in res else ""), "",
             "| neuron | variant | time | fused speed-up |", "|---|---|---|---|"]
    goals = []
    for kind in ("plif", "ilif"):
        r = res["zoo"][kind]
        f = r["fused"]
        for k in ("loop", "spikingjelly", "fused"):
            extra = ""
            if k != "fused":
                rr = f[f"round_speedups_vs_{k}"]
                extra = f"{f[f'speedup_vs_{k}']}x [{rr[0]}-{rr[-1]}]"
            lines.append(f"| {kind.upper()} | {k} | {r[k]['median_ms']} ms | {extra} |")
        goals.append(f"| {kind.upper()} fused vs its loop | >= 4x | {f['speedup_vs_loop']}x | "
                     f"{verdict(f['speedup_vs_loop'], 4.0, False)} |")
        goals.append(f"| {kind.upper()} fused vs SpikingJelly | >= 2x | {f['speedup_vs_spikingjelly']}x | "
                     f"{verdict(f['speedup_vs_spikingjelly'], 2.0, False)} |")
    v = res["zoo"]["vggsnn_plif_vs_lif"]
    goals.append(f"| vggsnn step {v['shape']}, plif vs lif | <= 1.05x | {v['plif_vs_lif']}x "
                 f"[{v['round_ratios'][0]}-{v['round_ratios'][-1]}] ({v['plif_ms']} vs {v['lif_ms']} ms) | "
                 f"{verdict(v['plif_vs_lif'], 1.05)} |")
    lines += ["", "| measure | goal | measured | verdict |", "|---|---|---|---|", *goals]
    return "\n".join(lines)


def git_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- report

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per comparison (default 5)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16], help="ResNet19 batch sizes (default 8 16)")
    p.add_argument("--skip-resnet", action="store_true", help="only the LIF comparisons")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--zoo", action="store_true", help="only PLIF, ILIF and the vggsnn PLIF step (CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.zoo:
        result = dict(device="cpu", cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                      torch=torch.__version__, rounds=args.rounds, commit=git_commit(), load_start=load_average())
        result["zoo"] = bench_zoo(args.rounds)
        result["load_end"] = load_average()
        write_results(f"{NAME}_zoo", result, zoo_markdown(result))
        return 0
    result = dict(device=str(device), machine=platform.machine(), cpu=platform.processor() or platform.machine(),
                  cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                  rounds=args.rounds, numba=numba_kernels.available(), commit=git_commit())
    if device.type == "cpu" and numba_kernels.available():
        result["numba_compile"] = numba_compile_cost()
    result["lif"] = bench_lif(device, args.rounds)
    if not args.skip_resnet:
        result["resnet19"] = bench_resnet(device, args.batches, args.rounds)
    if device.type == "cuda":
        result["gpu"] = device_name(device)
        result["triton_bandwidth"] = bench_triton_bandwidth(device)
        result["resnet19_bf16"] = bench_resnet(device, [64], args.rounds, dtype=torch.bfloat16)
    write_results(section_name(device), result, markdown(result))
    return 0


def verdict(value, goal, smaller_is_better=True) -> str:
    ok = value <= goal if smaller_is_better else value >= goal
    return "meets the goal" if ok else "misses the goal"


def mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:,.1f} MiB"


def section_name(device) -> str:
    return NAME if device.type == "cpu" else f"{NAME}_{device.type}"


def markdown(res: dict) -> str:
    lines = [f"## LIF backends and the ResNet19 step (`benchmarks/bench_lif.py`, {res['device']}, "
             f"{res['cpu_count']} CPUs, {res['torch_threads']} torch threads, torch {res['torch']}, "
             f"commit {res.get('commit', 'unknown')})", "",
             f"{res['rounds']} interleaved rounds: each ratio is taken within a round (the variants ran back to back) "
             "and the median over rounds is quoted; the bracket gives the lowest and highest round "
             "(the machine is shared, so the spread is the noise). Times are medians.", "",
             "### (a) LIF forward + backward, [32, T, 128, 16, 16] float32", "",
             "| T | backend | time | speed-up vs loop | saved bytes | saved vs loop | peak memory | first call |",
             "|---|---|---|---|---|---|---|---|"]
    for T, rows in res["lif"].items():
        loop = rows["loop"]["saved_bytes"]
        for name, r in rows.items():
            spread = f"[{r['round_speedups'][0]}-{r['round_speedups'][-1]}]"
            lines.append(f"| {T[2:]} | {name} | {r['median_ms']} ms | {r['speedup_vs_base']}x {spread} | "
                         f"{mib(r['saved_bytes'])} | {r['saved_bytes'] / loop:.3f} | {mib(r['peak_bytes'])} | "
                         f"{r['first_call_ms']} ms |")
    if "numba_compile" in res:
        c = res["numba_compile"]
        lines += ["", f"One-time numba compile of one configuration (forward + backward kernels, per process, "
                      f"reset mode, surrogate and dtype): {c['forward_and_backward_s']} s."]
    for key, title in (("resnet19", "float32"), ("resnet19_bf16", "bf16 autocast")):
        if key not in res:
            continue
        lines += ["", f"### (b) ResNet19 training step (T = 4, {title}) against its ANN twin", "",
                  "| batch | variant | time | time vs ANN | saved bytes | saved vs ANN | peak memory | peak vs ANN |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, rows in res[key].items():
            for name, r in rows.items():
                spread = f"[{r['round_times_vs_ann'][0]:.2f}-{r['round_times_vs_ann'][-1]:.2f}]"
                lines.append(f"| {n[2:]} | {name} | {r['median_ms'] / 1e3:.2f} s | {r['time_vs_ann']}x {spread} | "
                             f"{mib(r['saved_bytes'])} | {r['saved_vs_ann']}x | {mib(r['peak_bytes'])} | "
                             f"{r.get('peak_vs_ann', 'n/a')}x |")
    lines += ["", "### Goals", "", "| measure | goal | measured | verdict |", "|---|---|---|---|"]
    cpu = res["device"] == "cpu"
    for T in ("T=4", "T=8") if cpu else ():
        r = res["lif"][T]["fused"]
        lines.append(f"| LIF fwd+bwd {T}, fused vs loop | >= 3x faster | {r['speedup_vs_base']}x | "
                     f"{verdict(r['speedup_vs_base'], 3.0, False)} |")
    fast = "fused" if cpu else "triton"
    sv = max(rows[fast]["saved_bytes"] / rows["loop"]["saved_bytes"] for rows in res["lif"].values())
    lines.append(f"| LIF saved bytes, {fast} vs loop | <= 1/3 | {sv:.3f} | {verdict(sv, 1 / 3 + 1e-9)} |")
    for n, rows in res.get("resnet19", {}).items() if cpu else ():
        r = rows["snn (default)"]
        lines.append(f"| ResNet19 step time vs ANN, {n} | <= 1.10x | {r['time_vs_ann']}x | "
                     f"{verdict(r['time_vs_ann'], 1.10)} |")
        lines.append(f"| ResNet19 saved bytes vs ANN, {n} | <= 1.10x | {r['saved_vs_ann']}x | "
                     f"{verdict(r['saved_vs_ann'], 1.10)} |")
    if "triton_bandwidth" in res:
        b = res["triton_bandwidth"]
        for d in ("forward", "backward"):
            lines.append(f"| Triton {d} bandwidth vs copy ({b['gpu']}) | >= 0.70 | {b[d + '_vs_copy']} | "
                         f"{verdict(b[d + '_vs_copy'], 0.70, False)} |")
        r = res["resnet19_bf16"]["N=64"]["snn (default)"]
        lines.append(f"| bf16 ResNet19 step vs ANN, batch 64 ({b['gpu']}) | <= 1.10x | {r['time_vs_ann']}x | "
                     f"{verdict(r['time_vs_ann'], 1.10)} |")
    elif not (ROOT / "benchmarks" / "results" / f"{NAME}_cuda.json").exists():
        lines.append("| GPU goals (Triton bandwidth >= 70% of copy; bf16 ResNet19 batch 64 <= 1.10x ANN) | "
                     "| not measured yet: run this script on a CUDA machine | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
