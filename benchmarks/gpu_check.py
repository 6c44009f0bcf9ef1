"""Everything a CPU cannot check, on one CUDA GPU, in one short run (a few minutes on an H200).

    PYTHONPATH=src python benchmarks/gpu_check.py [--out DIR] [--only SECTION ...] [--budget SECONDS]
    PYTHONPATH=src python benchmarks/gpu_check.py --render [--out DIR]
    PYTHONPATH=src python benchmarks/gpu_check.py --dry-run --out DIR

Sections (``--only`` runs some of them):

- correctness: every LIF backend (and the fused BatchNorm neuron, where tetsnn.kernels has one)
  against the per-step loop, T = 1..8, float32 / bfloat16 / float16, hard / soft reset, detached
  or not, each surrogate. Any mismatch makes the script exit non-zero.
- kernels: the Triton LIF's bandwidth against a device-to-device copy of the same bytes (>= 70%).
- models: a ResNet19 bf16-autocast training step against its ANN twin at batch 64 and 128: time
  (<= 1.05x) and peak allocated memory (<= 0.85x), eager and with ``compile: true``.
- frameworks: ``benchmarks/bench_frameworks.py`` on the GPU: VGGSNN, ResNet19 and the Open
  Neuromorphic Linear + LIF layer (16,384 neurons, T=500) built in SpikingJelly (its CUDA / Triton
  neuron kernels, plain and with ``memopt`` levels 1-4), snnTorch and Norse with tetsnn's weights;
  equal to tetsnn in float64 first (a difference is a mismatch), then step time, bytes kept for
  backward and peak allocated memory, interleaved (tetsnn faster than every other setting).
- training: a digits run with ``amp: bf16`` and one with ``amp: fp16`` (best test accuracy >= 98%);
  SIGTERM in the middle of a run and resume, against an uninterrupted run (weights equal under
  deterministic algorithms, or the difference stated).
- data: the CIFAR on-device loader against torchvision's per-sample loader, and the event
  ``batch_transform`` against the per-sample PIL reference (>= 20x).
- tools: ``tetsnn profile`` and ``tetsnn export`` on a checkpoint trained on the GPU; DDP with NCCL
  and one process.

``DIR/gpu_check.json`` (default ``benchmarks/results``) is rewritten after every section: device,
versions, each figure and each goal's verdict. A section that needs a package the machine lacks is
reported as skipped, with the reason. ``--render`` rewrites the ``gpu_check`` section of
docs/performance.md from that JSON, so results copied back from a GPU machine are rendered anywhere.
``--dry-run`` runs every section on the CPU at tiny sizes (the Triton kernels under the
interpreter), to keep the script working; its figures mean nothing.

The script needs no install step: the working tree's ``src`` on PYTHONPATH, torch, triton and numpy.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "gpu_check"
ORDER = ("correctness", "kernels", "models", "frameworks", "training", "data", "tools")
RUN_ORDER = ("correctness", "kernels", "training", "data", "tools", "models", "frameworks")   # the slow ones last

# sizes on the GPU, and the tiny ones of a dry run
SIZES = {
    "gpu": dict(lif_shape=(4, 3, 33, 17), lif_T=range(1, 9), bw_neurons=2 ** 26, bw_T=8,
                model="resnet19", model_input=(3, 32, 32), model_batches=(64, 128), rounds=7, warmup=2,
                compile_backend="inductor", digits={}, resume=dict(limit_train=512, epochs=2, stop_at=12),
                loader_samples=10000, loader_workers=(0, 8), loader_rounds=3, event_batch=128, event_n=512,
                event_repeats=3, bn_T=(1, 4),
                fw_nets=dict(vggsnn=dict(T=10, input=(2, 48, 48), batch=16, sequence=True),
                             resnet19=dict(T=4, input=(3, 32, 32), batch=64, sequence=False),
                             linear=dict(T=500, input=(512,), batch=16, neurons=16384, sequence=True)),
                fw_memopt=(1, 2, 3, 4), fw_rounds=7),
    "dry": dict(lif_shape=(2, 1, 5, 3), lif_T=(1, 3), bw_neurons=2 ** 12, bw_T=4,
                model="digits_snn", model_input=(1, 8, 8), model_batches=(2, 4), rounds=1, warmup=1,
                compile_backend="eager", digits=dict(limit_train=32, limit_test=16, batch_size=16, T=2, epochs=1),
                resume=dict(limit_train=32, limit_test=16, batch_size=16, T=2, epochs=2, stop_at=3),
                loader_samples=256, loader_workers=(0,), loader_rounds=1, event_batch=2, event_n=4,
                event_repeats=1, bn_T=(2,),
                fw_nets=dict(linear=dict(T=4, input=(8,), batch=2, neurons=16, sequence=True)),
                fw_memopt=(1,), fw_rounds=1),
}


class Context:
    """The run's device, sizes, clock and scratch space; ``shared`` passes results between sections."""

    def __init__(self, dry: bool, budget: float, tmp: Path):
        import torch

        self.dry, self.tmp, self.shared = dry, tmp, {}
        self.device = torch.device("cpu" if dry else "cuda")
        self.size = SIZES["dry" if dry else "gpu"]
        self.deadline = time.monotonic() + budget
        if dry:   # the GPU never runs numba; on the CPU, the torch-op kernels spare its compiles
            from tetsnn.kernels import numba_kernels
            numba_kernels.disable()

    def remaining(self) -> float:
        """Seconds left of the budget; the dry run (tiny sizes, there to exercise every part) has no budget,
        so a slow or busy machine cannot make it skip anything."""
        return float("inf") if self.dry else self.deadline - time.monotonic()

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


class Section:
    """One section's findings: figures (label -> value), goals, mismatches and skipped parts."""

    def __init__(self):
        self.figures, self.goals, self.mismatches, self.skipped = {}, [], [], []

    def figure(self, label, value):
        self.figures[label] = value

    def goal(self, measure: str, goal: str, value, met: bool):
        self.goals.append(dict(measure=measure, goal=goal, value=value, verdict="meets" if met else "misses"))

    def skip(self, what: str, reason: str):
        self.skipped.append(f"{what}: {reason}")


# --------------------------------------------------------------------------- correctness

def _membranes(x, tau, threshold, reset):
    """Pre-reset membranes of the loop, in float64."""
    import torch

    x = x.double()
    u, hs = torch.zeros_like(x[:, 0]), []
    for t in range(x.shape[1]):
        h = tau * u + x[:, t]
        s = (h > threshold).double()
        u = h * (1 - s) if reset == "hard" else h - threshold * s
        hs.append(h)
    return torch.stack(hs, 1)


def lif_input(shape, dtype, reset, seed, tau=0.5, threshold=1.0):
    """Random input in ``dtype`` whose membranes stay at least 1e-3 from the threshold, where a fused
    multiply-add in a compiled kernel may round differently from the loop's separate operations."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.8 + 0.5).to(dtype)
    for t in range(shape[1]):
        for _ in range(4):
            near = (_membranes(x, tau, threshold, reset)[:, t] - threshold).abs() < 1e-3
            if not near.any():
                break
            xt = x[:, t].double()
            xt[near] += 0.03
            x[:, t] = xt.to(dtype)
    return x


def _grad_tol(dtype):
    import torch

    return {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 2 * torch.finfo(dtype).eps)


def lif_cases(ctx, sec):
    """Every backend, dtype, T, reset, detach and surrogate against the loop; mismatches are listed."""
    import torch

    from tetsnn import LIF

    backends = ["fused"] + (["triton"] if _has("triton") else [])
    if "triton" not in backends:
        sec.skip("triton backend", "the 'triton' package is not installed")
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    n = 0
    for backend in backends:
        for dtype in dtypes:
            for T in ctx.size["lif_T"]:
                for reset in ("hard", "soft"):
                    shape = (ctx.size["lif_shape"][0], T, *ctx.size["lif_shape"][2:])
                    x = lif_input(shape, dtype, reset, seed=T).to(ctx.device)
                    gen = torch.Generator().manual_seed(T + 100)
                    grad = torch.randn(shape, generator=gen).to(dtype).to(ctx.device)
                    for detach in (False, True):
                        for surrogate in ("zif", "sigmoid", "atan"):
                            kw = dict(reset=reset, detach_reset=detach, surrogate=surrogate)
                            case = f"{backend} {str(dtype)[6:]} T={T} {reset} detach={detach} {surrogate}"
                            n += 1
                            err = _compare_lif(LIF(backend=backend, **kw), LIF(backend="loop", **kw), x, grad)
                            if err:
                                sec.mismatches.append(f"{case}: {err}")
    sec.figure("LIF cases against the loop", n)


def _compare_lif(fast, loop, x, grad):
    """'' when spikes are equal and input gradients agree, else what differs."""
    import torch

    outs = []
    for m in (fast, loop):
        xx = x.clone().requires_grad_()
        y = m(xx)
        (g,) = torch.autograd.grad(y, xx, grad)
        outs.append((y, g))
    (y1, g1), (y2, g2) = outs
    if y1.dtype != x.dtype or g1.dtype != x.dtype:
        return f"dtype {y1.dtype} / {g1.dtype} for a {x.dtype} input"
    if not torch.equal(y1, y2):
        return f"{int((y1 != y2).sum())} of {y1.numel()} spikes differ"
    tol = _grad_tol(x.dtype)
    diff = (g1.double() - g2.double()).abs()
    bad = diff > tol + tol * g2.double().abs()
    return f"gradient differs by up to {diff.max().item():.3g} (tolerance {tol:.1g})" if bad.any() else ""


def bn_neuron_cases(ctx, sec):
    """The fused BatchNorm + neuron op against BatchNorm then the loop, where tetsnn.kernels has one."""
    import torch
    from torch import nn

    from tetsnn import LIF

    from tetsnn.kernels.ops import bn_neuron
    n = 0
    for backend in ["fused"] + (["triton"] if _has("triton") else []):
        for dtype in (torch.float32, torch.bfloat16):
            for T in ctx.size["bn_T"]:
                for reset in ("hard", "soft"):
                    g = torch.Generator().manual_seed(T)
                    y = (torch.randn(2 * T, 8, 5, 5, generator=g) * 1.5).to(dtype).to(ctx.device)
                    grad = torch.randn(2, T, 8, 5, 5, generator=g).to(dtype).to(ctx.device)
                    runs = []
                    for fused in (True, False):
                        torch.manual_seed(0)
                        bn = nn.BatchNorm2d(8).to(ctx.device).train()
                        with torch.no_grad():
                            bn.weight.uniform_(0.5, 1.5)
                            bn.bias.uniform_(-0.2, 0.8)
                        neuron = LIF(reset=reset, backend=backend if fused else "loop")
                        yy = y.clone().requires_grad_()
                        s = bn_neuron(yy, bn, neuron.spec, backend, T) if fused else neuron(bn(yy).view(2, T, 8, 5, 5))
                        gy, gw, gb = torch.autograd.grad(s, (yy, bn.weight, bn.bias), grad)
                        runs.append((s, gy, gw, gb, bn.running_mean.clone(), bn.running_var.clone()))
                    n += 1
                    case = f"bn+{backend} {str(dtype)[6:]} T={T} {reset}"
                    err = _compare_bn(runs[0], runs[1], dtype)
                    if err:
                        sec.mismatches.append(f"{case}: {err}")
    sec.figure("fused BatchNorm neuron cases against BatchNorm + loop", n)


def _compare_bn(a, b, dtype):
    """Spikes may differ where a membrane lands within rounding of the threshold: at most 0.1% of
    them; gradients and running statistics within a relative 1e-3 (float32) or 2e-2 (bfloat16)."""
    flips = (a[0] != b[0]).float().mean().item()
    if flips > 1e-3:
        return f"{100 * flips:.2f}% of spikes differ"
    rel = 1e-3 if str(dtype) == "torch.float32" else 2e-2
    for name, u, v in zip(("dL/dy", "dL/dweight", "dL/dbias", "running mean", "running var"), a[1:], b[1:]):
        err = (u.double() - v.double()).norm().item() / max(v.double().norm().item(), 1e-12)
        if err > rel:
            return f"{name} differs by {err:.3g} relative (tolerance {rel})"
    return ""


CORRECTNESS_CASES = (lif_cases, bn_neuron_cases)   # each adds its case count and any mismatches


def section_correctness(ctx, sec):
    for cases in CORRECTNESS_CASES:
        cases(ctx, sec)
    sec.figure("mismatches", len(sec.mismatches))


# --------------------------------------------------------------------------- kernels

def section_kernels(ctx, sec):
    _require("triton")
    from bench_lif import bench_triton_bandwidth

    b = bench_triton_bandwidth(ctx.device, ctx.size["bw_neurons"], ctx.size["bw_T"])
    sec.figure("neurons per step x T", f"{b['neurons_per_step']} x {b['T']} (float32)")
    for key in ("copy_GBps", "forward_GBps", "backward_GBps"):
        sec.figure(key.replace("_GBps", " GB/s"), b[key])
    for d in ("forward", "backward"):
        sec.goal(f"Triton LIF {d} bandwidth vs device-to-device copy", ">= 0.70", b[f"{d}_vs_copy"],
                 b[f"{d}_vs_copy"] >= 0.70)


# --------------------------------------------------------------------------- models

def twin_models(ctx):
    """The SNN and its ANN twin (ReLU in place of every neuron) with the same weights."""
    from tetsnn import create_model

    ann = create_model(ctx.size["model"], num_classes=10, T=4, neuron="relu")
    snn = create_model(ctx.size["model"], num_classes=10, T=4)
    snn.load_state_dict(ann.state_dict())
    return {"ann": ann.to(ctx.device).train(), "snn": snn.to(ctx.device).train()}


def section_models(ctx, sec):
    import torch

    from bench_lif import interleave, peak_memory, train_step

    model = ctx.size["model"]
    for mode in ("eager", "compiled"):
        if ctx.remaining() < (90 if mode == "compiled" else 20):
            sec.skip(f"{model} bf16 steps, {mode}", "the time budget is spent")
            continue
        models = twin_models(ctx)
        if mode == "compiled":   # once per model: the batch dimension is marked dynamic below
            for m in models.values():
                m.compile(backend=ctx.size["compile_backend"])
        for n in ctx.size["model_batches"]:
            what = f"{model} bf16 step, batch {n}, {mode}"
            if ctx.remaining() < 20:
                sec.skip(what, "the time budget is spent")
                continue
            g = torch.Generator().manual_seed(n)
            x = torch.randn(n, *ctx.size["model_input"], generator=g).to(ctx.device)
            y = torch.randint(0, 10, (n,), generator=g).to(ctx.device)
            if mode == "compiled":
                torch._dynamo.mark_dynamic(x, 0)
            steps = {k: train_step(m, x, y, torch.bfloat16)[0] for k, m in models.items()}
            t0 = time.perf_counter()
            for step in steps.values():     # warm-up (and the compiles)
                for _ in range(ctx.size["warmup"]):
                    step()
            ctx.sync()
            sec.figure(f"{what}: warm-up, {ctx.size['warmup']} step(s) of each model, compiles included",
                       f"{time.perf_counter() - t0:.1f} s")
            times = interleave(steps, ctx.size["rounds"], ctx.device)
            ratio = statistics.median(s / a for a, s in zip(times["ann"], times["snn"]))
            sec.figure(f"{what}: SNN / ANN median step", f"{1e3 * statistics.median(times['snn']):.1f} / "
                                                         f"{1e3 * statistics.median(times['ann']):.1f} ms")
            sec.goal(f"{what}: time vs ANN twin", "<= 1.05x", round(ratio, 3), ratio <= 1.05)
            # the rise of memory during one step, and on CUDA torch.cuda.max_memory_allocated during it
            # (which also counts the resident weights and optimizer state of both twins)
            rise, peak = {}, {}
            for k, step in steps.items():
                rise[k] = peak_memory(step, ctx.device)
                if ctx.device.type == "cuda":
                    peak[k] = torch.cuda.max_memory_allocated(ctx.device)
            for label, mem in (("memory rise in one step", rise), ("max_memory_allocated", peak)):
                if mem.get("snn") and mem.get("ann"):
                    sec.figure(f"{what}: SNN / ANN {label}",
                               f"{mem['snn'] / 2 ** 20:.0f} / {mem['ann'] / 2 ** 20:.0f} MiB")
            mem, label = (peak, "max_memory_allocated") if peak else (rise, "memory rise in one step")
            if mem.get("snn") and mem.get("ann"):
                mem_ratio = mem["snn"] / mem["ann"]
                sec.goal(f"{what}: {label} vs ANN twin", "<= 0.85x", round(mem_ratio, 3), mem_ratio <= 0.85)
            del steps
        del models
        torch._dynamo.reset()
    if ctx.dry:
        sec.figure("compile backend (dry run)", ctx.size["compile_backend"])


# --------------------------------------------------------------------------- frameworks

def section_frameworks(ctx, sec):
    import torch

    import bench_frameworks as bf

    have = [fw for fw in bf.FRAMEWORKS if bf.has(fw)]
    if not have:
        _require("spikingjelly")
    for fw in bf.FRAMEWORKS:
        if fw not in have:
            sec.skip(bf.LABELS[fw], f"the {bf.PACKAGES[fw]!r} package is not installed")
    sec.figure("frameworks", ", ".join(f"{bf.LABELS[f]} {v}" for f, v in bf.versions().items() if v))
    levels = ctx.size["fw_memopt"]
    if ctx.device.type != "cuda":
        sec.skip("SpikingJelly memopt levels 2-4", "they search peak CUDA memory")

    def peak(step):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    for net, sizes in ctx.size["fw_nets"].items():
        if ctx.remaining() < 30:
            sec.skip(net, "the time budget is spent")
            continue
        eq = bf.check_equal(net, frameworks=have, device=ctx.device)
        for k, r in eq.items():
            if r["output_max_abs_diff"] > 1e-9 or r.get("grad_max_rel_diff", 0) > 1e-6:
                sec.mismatches.append(f"{net}, {k}: differs from tetsnn in float64 ({r})")
        sec.figure(f"{net}: float64, largest output / relative gradient difference from tetsnn", "; ".join(
            f"{k} {r['output_max_abs_diff']:.1e} / {r.get('grad_max_rel_diff', 0):.1e}" for k, r in eq.items()))
        failed = {}
        res = bf.measure(net, sizes, ctx.size["fw_rounds"], levels, ctx.device,
                         peak if ctx.device.type == "cuda" else None, failed)
        for name, why in failed.items():
            sec.skip(f"{net}, {name}", why)
        what = bf.describe(net, sizes)
        for k, r in res.items():
            mem = f", peak allocated {r['peak_bytes'] / 2 ** 20:,.0f} MiB" if "peak_bytes" in r else ""
            sec.figure(f"{what}: {k}", f"{r['median_s'] * 1e3:,.1f} ms ({r['vs_tetsnn']}x tetsnn), kept for backward "
                                       f"{r['saved_bytes'] / 2 ** 20:,.1f} MiB ({r['saved_vs_tetsnn']}x){mem}")
        others = [r["vs_tetsnn"] for k, r in res.items() if not k.startswith("tetsnn")]
        if others:
            sec.goal(f"{net}: fastest other framework setting / tetsnn step", ">= 1.00x", min(others),
                     min(others) >= 1.0)


# --------------------------------------------------------------------------- training

def _digits_config(ctx, out, **kw):
    from tetsnn.engine.config import load_config, resolve

    return resolve({**load_config("digits"), **ctx.size["digits"], "device": ctx.device.type, "out": str(out), **kw})


# A training process that enables deterministic algorithms and, with GPU_CHECK_STOP_AT=k, sends
# itself SIGTERM during its k-th training step (the engine stops after that step and saves).
_TRAIN_CHILD = """
import os, signal, sys
import torch
torch.use_deterministic_algorithms(os.environ["GPU_CHECK_DETERMINISTIC"] == "1")
import tetsnn.engine.train as train
import tetsnn.kernels.numba_kernels as numba_kernels
if os.environ["GPU_CHECK_DRY_RUN"] == "1":   # as in the dry run's own process
    numba_kernels.disable()
stop_at = int(os.environ.get("GPU_CHECK_STOP_AT", "0"))
build = train.build_criterion

def build_criterion(cfg):
    criterion, calls = build(cfg), [0]

    def wrapped(out, y):
        loss = criterion(out, y)
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return loss
    return wrapped

train.build_criterion = build_criterion
sys.exit(train.main(sys.argv[1:]))
"""


def _train_process(ctx, args, deterministic, stop_at=0):
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1" if ctx.dry else "0", "GPU_CHECK_STOP_AT": str(stop_at),
           "GPU_CHECK_DETERMINISTIC": "1" if deterministic else "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _TRAIN_CHILD, *args], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"tetsnn train {' '.join(args)} exited {res.returncode}: {res.stderr.strip()[-1500:]}")
    return res


def section_training(ctx, sec):
    import torch

    from tetsnn.engine.checkpoint import load_checkpoint
    from tetsnn.engine.train import fit

    for amp in ("bf16", "fp16"):
        out = ctx.tmp / f"digits-{amp}"
        t0 = time.perf_counter()
        res = fit(_digits_config(ctx, out, amp=amp))
        best = res["best"]["test_acc"]
        sec.figure(f"digits, amp {amp}: run time", f"{time.perf_counter() - t0:.1f} s")
        sec.goal(f"digits best test accuracy, amp {amp}", ">= 98%", round(100 * best, 2), best >= 0.98)
        ctx.shared.setdefault("checkpoint", str(out / "best.pt"))

    r = ctx.size["resume"]
    common = ["--device", ctx.device.type, "--seed", "7"]
    for key, value in r.items():
        if key != "stop_at":
            common += ["--" + key.replace("_", "-"), str(value)]
    for deterministic in (True, False):
        full, part = ctx.tmp / f"full-{deterministic}", ctx.tmp / f"part-{deterministic}"
        try:
            _train_process(ctx, common + ["--out", str(full)], deterministic)
        except RuntimeError as e:
            if deterministic:   # an operation without a deterministic implementation: say which, go on
                sec.figure("deterministic algorithms", f"not usable: {str(e)[-300:]}")
                continue
            raise
        stopped = _train_process(ctx, common + ["--out", str(part)], deterministic, stop_at=r["stop_at"])
        if "stopped by signal" not in stopped.stdout:
            raise RuntimeError(f"SIGTERM at step {r['stop_at']} did not stop the run: {stopped.stdout[-500:]}")
        mid = load_checkpoint(part / "last.pt")
        _train_process(ctx, ["--resume", str(part)], deterministic)
        a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(part / "last.pt")["model"]
        diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
        equal = all(torch.equal(a[k], b[k]) for k in a)
        sec.figure("SIGTERM", f"stopped at epoch {mid['epoch'] + 1}, step {mid['step']}; resumed to the end")
        sec.figure(f"resumed vs uninterrupted weights (deterministic algorithms {'on' if deterministic else 'off'})",
                   "equal" if equal else f"max difference {diff:.3g}")
        if deterministic:
            sec.goal("SIGTERM + resume, deterministic algorithms: weights", "equal to an uninterrupted run",
                     "equal" if equal else f"max difference {diff:.3g}", equal)
        break


# --------------------------------------------------------------------------- data

def section_data(ctx, sec):
    import numpy as np
    from torch.utils.data import DataLoader

    from bench_events import bench_batches
    from bench_loader import PerSample, one_epoch
    from tetsnn.data import BatchLoader
    from tetsnn.data.static import StaticImages

    n, batch = ctx.size["loader_samples"], 128
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    on_device = BatchLoader(n, batch, StaticImages(images.transpose(0, 3, 1, 2), labels, "cifar10", ctx.device),
                            train=True, seed=0, device=ctx.device)
    variants = {"on-device": on_device}
    for w in ctx.size["loader_workers"]:
        variants[f"per-sample, {w} workers"] = DataLoader(PerSample(images, labels), batch, shuffle=True, num_workers=w,
                                                          pin_memory=ctx.device.type == "cuda")
    rates = {k: [] for k in variants}
    for r in range(ctx.size["loader_rounds"]):
        on_device.set_epoch(r)
        for k, loader in variants.items():
            rates[k].append(one_epoch(loader, ctx.device))
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in med.items():
        sec.figure(f"CIFAR loader, {k}: samples/s", round(v))
    for k, v in med.items():
        if k != "on-device":
            sec.figure(f"CIFAR on-device loader vs {k}", f"{med['on-device'] / v:.1f}x")

    b = bench_batches(ctx.tmp, ctx.device, ctx.size["event_batch"], ctx.size["event_repeats"], n=ctx.size["event_n"])
    sec.figure(f"event training batches (B={b['batch']}, T={b['T']}): tetsnn / reference samples/s",
               f"{b['tetsnn_samples_per_s']:.0f} / {b['reference_samples_per_s']:.0f}")
    sec.goal("event batch_transform vs per-sample PIL reference", ">= 20x", round(b["ratio"], 1), b["ratio"] >= 20)


# --------------------------------------------------------------------------- tools

def _quiet(main, argv):
    """``(exit status, stdout)`` of a subcommand's ``main(argv)``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def section_tools(ctx, sec):
    import torch
    import torch.distributed as dist
    from torch import nn

    from tetsnn import create_model, tet_loss
    from tetsnn.engine import distributed, export_cli, profile_cli
    from tetsnn.engine.train import fit

    ckpt = ctx.shared.get("checkpoint")
    if ckpt is None:
        out = ctx.tmp / "tools-run"
        with contextlib.redirect_stdout(io.StringIO()):
            fit(_digits_config(ctx, out, **{"limit_train": 256, "limit_test": 128, **ctx.size["digits"], "epochs": 1}))
        ckpt = str(out / "best.pt")
    rc, text = _quiet(profile_cli.main, ["--checkpoint", ckpt, "--device", ctx.device.type, "--batches", "2", "--json"])
    if rc != 0:
        raise RuntimeError(f"tetsnn profile exited {rc}")
    prof = json.loads(text)
    sec.figure("tetsnn profile: samples, SOPs per sample", f"{prof['samples']}, {prof['synops_per_sample']:.4g}")

    if importlib.util.find_spec("nir") is None:
        sec.skip("tetsnn export", "the 'nir' package is not installed")
    else:
        path = ctx.tmp / "model.nir"
        rc, text = _quiet(export_cli.main, ["--checkpoint", ckpt, "--out", str(path)])
        if rc != 0 or not path.is_file():
            raise RuntimeError(f"tetsnn export exited {rc}")
        sec.figure("tetsnn export", text.strip().split(": ", 1)[-1])

    # DDP in one process: its gradients are the plain model's (averaged over one rank)
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = create_model("digits_snn", T=4).to(ctx.device)
        ddp_model = create_model("digits_snn", T=4).to(ctx.device)
        ddp_model.load_state_dict(plain.state_dict())
        ids = [ctx.device.index or 0] if ctx.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(ddp_model, device_ids=ids)
        x, y = torch.rand(32, 1, 8, 8, device=ctx.device) * 3, torch.randint(0, 10, (32,), device=ctx.device)
        tet_loss(plain(x), y).backward()
        tet_loss(ddp(x), y).backward()
        # relative to the largest gradient: cuDNN's backward may sum in another order from run to run
        diff = max((p.grad - q.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-12)
                   for p, q in zip(plain.parameters(), ddp_model.parameters()))
        total = distributed.all_reduce_sum(torch.ones(1, device=ctx.device)).item()
    finally:
        dist.destroy_process_group()
    sec.figure(f"DDP ({backend}, 1 process): relative gradient difference from the plain model", diff)
    if diff > 1e-5 or total != 1.0:
        sec.mismatches.append(f"DDP ({backend}, 1 process): gradients differ by {diff:.3g}, all-reduce sum {total}")


SECTIONS = {"correctness": section_correctness, "kernels": section_kernels, "models": section_models,
            "frameworks": section_frameworks, "training": section_training, "data": section_data, "tools": section_tools}


# --------------------------------------------------------------------------- running and reporting

def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:   # set to None in sys.modules: blocked
        return False


def _missing_package(e: BaseException):
    """The package that this machine lacks, when ``e`` (or what caused it) is an ImportError of one;
    None for any other error (an ImportError inside tetsnn included)."""
    while e is not None:
        if isinstance(e, ImportError) and e.name and not _has(e.name.split(".")[0]):
            return e.name.split(".")[0]
        e = e.__cause__ or e.__context__
    return None


def _require(name: str):
    if not _has(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _versions(ctx) -> dict:
    import torch

    from importlib import metadata

    v = dict(python=platform.python_version(), torch=torch.__version__)
    for pkg in ("triton", "numpy", "numba", "torchvision", "scikit-learn", "nir"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    if ctx.device.type == "cuda":
        nccl = torch.cuda.nccl.version()
        v.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl))
    return v


def _device_name(ctx) -> str:
    import torch

    if ctx.device.type == "cuda":
        return torch.cuda.get_device_name(ctx.device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def run_section(ctx, name) -> dict:
    sec, t0 = Section(), time.perf_counter()
    try:
        SECTIONS[name](ctx, sec)
        status = "failed" if sec.mismatches else "ok"
        reason = None
    except Exception as e:  # a broken section is reported and the others still run
        missing = _missing_package(e)
        if missing:
            status, reason = "skipped", f"needs the {missing!r} package, which is not installed"
        else:
            status, reason = "error", f"{type(e).__name__}: {e}"
            traceback.print_exc()
    res = dict(status=status, seconds=round(time.perf_counter() - t0, 1), figures=sec.figures, goals=sec.goals)
    if reason:
        res["reason"] = reason
    if sec.mismatches:
        res["mismatches"] = sec.mismatches[:50]
        res["mismatch_count"] = len(sec.mismatches)
    if sec.skipped:
        res["skipped_parts"] = sec.skipped
    return res


def write_json(path: Path, result: dict) -> None:
    from tetsnn.utils import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(result, indent=2, default=str) + "\n")


def run(args) -> int:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    path = Path(args.out) / f"{NAME}.json"
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args.dry_run, args.budget, Path(tmp))
        result = dict(device=_device_name(ctx), dry_run=ctx.dry, versions=_versions(ctx),
                      started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), sections={})
        if args.only and path.is_file():   # keep the sections of an earlier run on the same device
            old = json.loads(path.read_text())
            if old.get("device") == result["device"] and old.get("dry_run") == ctx.dry:
                result["sections"] = old.get("sections", {})
        t0 = time.perf_counter()
        for name in RUN_ORDER:
            if args.only and name not in args.only:
                continue
            print(f"gpu_check: {name} ...", flush=True)
            result["sections"][name] = run_section(ctx, name)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            write_json(path, result)
            s = result["sections"][name]
            why = f": {s['reason']}" if "reason" in s else ""
            print(f"gpu_check: {name}: {s['status']} ({s['seconds']} s){why}", flush=True)
    print(f"gpu_check: wrote {path} ({result['seconds']} s)")
    bad = [n for n, s in result["sections"].items() if s["status"] in ("failed", "error")]
    if bad:
        print(f"gpu_check: failed sections: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def markdown(result: dict) -> str:
    kind = "dry run on the CPU: the figures only show that the script works" if result.get("dry_run") else "one run"
    lines = [f"## GPU check (`benchmarks/gpu_check.py`, {result['device']}, {kind})", "",
             f"Started {result.get('started', '?')}, {result.get('seconds', '?')} s in all. Versions: "
             + ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items() if v) + ".", "",
             "### Goals", "", "| section | measure | goal | measured | verdict |", "|---|---|---|---|---|"]
    sections = result.get("sections", {})
    for name in ORDER:
        for g in sections.get(name, {}).get("goals", []):
            lines.append(f"| {name} | {g['measure']} | {g['goal']} | {g['value']} | {g['verdict']} the goal |")
    for name in ORDER:
        if name not in sections:
            lines += ["", f"### {name}: not run"]
            continue
        s = sections[name]
        lines += ["", f"### {name}: {s['status']} ({s['seconds']} s)"]
        if "reason" in s:
            lines += ["", s["reason"]]
        if s.get("figures"):
            lines += ["", "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in s["figures"].items()]
        for m in s.get("mismatches", []):
            lines.append(f"- mismatch: {m}")
        if s.get("mismatch_count", 0) > len(s.get("mismatches", [])):
            lines.append(f"- ... {s['mismatch_count']} mismatches in all")
        for part in s.get("skipped_parts", []):
            lines.append(f"- skipped: {part}")
    return "\n".join(lines)


def render(json_path: Path, doc_path: Path = None) -> None:
    """Rewrite the gpu_check section of docs/performance.md (or ``doc_path``) from a results file."""
    from report import DOC, write_section

    write_section(NAME, markdown(json.loads(Path(json_path).read_text())), doc_path or DOC)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of gpu_check.json")
    p.add_argument("--only", nargs="+", choices=ORDER, help="run only these sections")
    p.add_argument("--budget", type=float, default=270.0,
                   help="seconds for the whole run; the slowest parts are skipped once it is spent (default 270; "
                        "the dry run has none)")
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny sizes")
    p.add_argument("--render", action="store_true", help="rewrite docs/performance.md's GPU section from the JSON")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))   # report, bench_lif, ...
    if args.render:
        path = Path(args.out) / f"{NAME}.json"
        if not path.is_file():
            print(f"gpu_check: {path} not found (run the check first)", file=sys.stderr)
            return 2
        render(path)
        print(f"gpu_check: rendered {path} into docs/performance.md")
        return 0
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before any Triton kernel is built
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
