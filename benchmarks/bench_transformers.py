"""tetsnn's Spikformer against SpikingJelly 2.0's ``spikformer_cifar10`` and tetsnn's ReLU twin, on the
same weights (float32, CPU).

    python benchmarks/bench_transformers.py [--rounds 7] [--batch 8] [--T 4] [--quick]

Settings, each a training step (forward, TET loss, backward, SGD step with momentum):

- ``tetsnn``: ``create_model("spikformer", preset="cifar-4-384", qkv_bias=False)`` (SpikingJelly's
  layers), SpikingJelly's weights loaded through ``convert_state_dict``;
- ``relu twin``: the same model with ``neuron="relu"`` (the same matrix products, no neuron: the floor);
- ``spikingjelly``: ``spikformer_cifar10()`` with its torch backend (its fastest on a CPU), time-first.

Timed interleaved: each round times every setting once, in an order rotated from round to round; the
ratios are taken within a round and the median over rounds is quoted. Bytes kept for backward: the
distinct storages ``saved_tensors_hooks`` sees during one training forward, parameters and buffers
excluded (``bench_lif.saved_bytes``). ``--breakdown N`` adds where tetsnn's step and its twin's differ:
the self CPU time of each operator (``torch.profiler``) averaged over N profiled steps of each, the
largest differences first. Writes benchmarks/results/bench_transformers.json.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import tetsnn  # noqa: E402
from bench_lif import saved_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_transformers.json"


def build(kw: dict, T: int):
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.model.spikformer import Spikformer
    torch.manual_seed(0)
    sj = Spikformer(T=T, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10, **kw)
    arch = dict(preset="cifar-4-384", qkv_bias=False, embed_dim=kw["embed_dims"], heads=kw["num_heads"],
                depth=kw["depths"])
    sd = tetsnn.convert_state_dict(sj.state_dict(), model="spikformer", **arch)
    ours = tetsnn.create_model("spikformer", 10, T=T, **arch)
    ours.load_state_dict(sd)
    twin = tetsnn.create_model("spikformer", 10, T=T, neuron="relu", **arch)
    twin.load_state_dict(sd)

    def sj_forward(x):
        functional.reset_net(sj)
        return sj(x).transpose(0, 1)          # [T, N, classes] -> [N, T, classes]
    return {"tetsnn": (ours, ours), "relu twin": (twin, twin), "spikingjelly": (sj, sj_forward)}


def step_fn(module, forward, x, y):
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = tetsnn.tet_loss(forward(x), y)
        loss.backward()
        opt.step()
    return step


def breakdown(steps: dict, reps: int, top: int = 14) -> dict:
    """Self CPU milliseconds per operator of one step of tetsnn and of its ReLU twin (mean over ``reps``
    profiled steps each, interleaved), the ``top`` largest differences first, and the totals."""
    from torch.profiler import ProfilerActivity, profile
    ms = {"tetsnn": {}, "relu twin": {}}
    for _ in range(reps):
        for name, per_op in ms.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name]()
            for e in prof.key_averages():
                per_op[e.key] = per_op.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / reps
    ours, twin = ms["tetsnn"], ms["relu twin"]
    ops = sorted(set(ours) | set(twin), key=lambda k: -abs(ours.get(k, 0.0) - twin.get(k, 0.0)))[:top]
    return {"total_ms": {n: round(sum(d.values()), 1) for n, d in ms.items()},
            "ops_ms": [{"op": k, "tetsnn": round(ours.get(k, 0.0), 1), "relu twin": round(twin.get(k, 0.0), 1)}
                       for k in ops]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="a small model, to check the script")
    ap.add_argument("--breakdown", type=int, default=0, metavar="N",
                    help="profile N steps of tetsnn and of its twin and record the per-operator difference")
    args = ap.parse_args(argv)
    kw = dict(embed_dims=384, num_heads=12, depths=4) if not args.quick else dict(embed_dims=64, num_heads=2,
                                                                                   depths=1)
    settings = build(kw, args.T)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    steps = {name: step_fn(module, fwd, x, y) for name, (module, fwd) in settings.items()}
    for step in steps.values():   # warm up: kernels compiled, allocator settled
        step()
        step()
    saved = {}
    for name, (module, fwd) in settings.items():
        saved[name] = saved_bytes(lambda: tetsnn.tet_loss(fwd(x), y), exclude=module)
    load = [os.getloadavg()[0]]
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    res = {
        "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch_threads":
        torch.get_num_threads(), "load_average": [min(load), max(load)], "batch": args.batch, "T": args.T,
        "model": kw, "rounds": args.rounds,
        "median_step_s": {n: statistics.median(t) for n, t in times.items()},
        "tetsnn_over_relu_twin": ratio("tetsnn", "relu twin"),
        "tetsnn_over_relu_twin_per_round": [round(a / b, 3) for a, b in zip(times["tetsnn"], times["relu twin"])],
        "tetsnn_over_spikingjelly": ratio("tetsnn", "spikingjelly"),
        "spikingjelly_over_relu_twin": ratio("spikingjelly", "relu twin"),
        "saved_bytes": saved, "saved_tetsnn_over_spikingjelly": saved["tetsnn"] / saved["spikingjelly"],
    }
    if args.breakdown:
        res["gap_breakdown"] = breakdown(steps, args.breakdown)
    print(json.dumps(res, indent=1))
    if not args.quick:
        RESULTS.parent.mkdir(exist_ok=True)
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
