"""The training engine's fixed mmap threshold (``tetsnn.engine.allocator``): step time and peak
resident memory of a training step with and without it.

    python benchmarks/bench_allocator.py [--rounds 7] [--batch 4]

Each round runs a resnet19 (T=4, [N, 3, 32, 32], float32) training step (forward + backward + SGD)
in two fresh processes, one with glibc's default allocator settings and one with
:func:`tetsnn.engine.allocator.fix_mmap_threshold` called first, the order alternating from round
to round. The LIF kernels run in torch ops (the numba ones would compile anew in each of the
fresh processes). Each process takes a warm-up step, then measures the rise of VmHWM over the RSS before one
step (:func:`bench_lif.peak_memory`), then times 3 steps (the fastest counts). The ratios are taken
within each round and their median quoted.
Writes benchmarks/results/bench_allocator.json and its section of docs/performance.md.
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

NAME = "bench_allocator"
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("glibc default", "fixed mmap threshold")


def child(setting: str, batch: int) -> int:
    from tetsnn.engine.allocator import fix_mmap_threshold

    fixed = fix_mmap_threshold() if setting == SETTINGS[1] else None
    import torch

    from tetsnn.kernels import fused
    fused._NUMBA = False   # the LIF kernels in torch ops: spares numba's compile in every fresh process

    from tetsnn import create_model
    from bench_lif import peak_memory, train_step

    torch.manual_seed(0)
    model = create_model("resnet19", T=4).train()
    g = torch.Generator().manual_seed(batch)
    x, y = torch.rand(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    step, _ = train_step(model, x, y)
    step()   # warm-up
    peak = peak_memory(step, torch.device("cpu"))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(threshold=fixed, peak_bytes=peak, step_s=min(times))))
    return 0


def run_child(setting: str, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    res = subprocess.run([sys.executable, __file__, "--child", setting, "--batch", str(batch)], capture_output=True,
                         text=True, check=True, env=env, timeout=900)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(rounds: int, batch: int) -> dict:
    runs = {s: [] for s in SETTINGS}
    for r in range(rounds):
        for s in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
            runs[s].append(run_child(s, batch))
        print(f"round {r + 1}:", json.dumps({s: (v[-1]["step_s"], v[-1]["peak_bytes"]) for s, v in runs.items()}),
              flush=True)
    base, fixed = runs[SETTINGS[0]], runs[SETTINGS[1]]
    out = {}
    for key in ("step_s", "peak_bytes"):
        per_round = sorted(f[key] / b[key] for b, f in zip(base, fixed))
        out[key] = dict(median={s: statistics.median(r[key] for r in runs[s]) for s in SETTINGS},
                        ratio=round(statistics.median(per_round), 3), rounds=[round(v, 3) for v in per_round],
                        runs={s: [r[key] for r in runs[s]] for s in SETTINGS})
    out["threshold"] = fixed[0]["threshold"]
    return out


def mib(b) -> str:
    return f"{b / 2 ** 20:,.1f} MiB"


def markdown(res: dict) -> str:
    m = res["measured"]
    t, p = m["step_s"], m["peak_bytes"]
    lines = [f"## CPU allocator: a fixed mmap threshold (`benchmarks/bench_allocator.py`, {res['device']}, "
             f"{res['cpu_count']} CPUs, torch {res['torch']}, commit {res['commit']})", "",
             f"A resnet19 training step (T=4, batch {res['batch']}, float32, forward + backward + SGD) in fresh "
             f"processes with glibc's default settings and with `tetsnn.engine.allocator.fix_mmap_threshold()` "
             f"({m['threshold']:,} bytes; LIF kernels in torch ops), {res['rounds']} interleaved rounds; the ratio is the median of the "
             "per-round ratios, the bracket the lowest and highest round.", "",
             "| measure | glibc default | fixed threshold | fixed / default |", "|---|---|---|---|",
             f"| step time (fastest of 3) | {t['median'][SETTINGS[0]] * 1e3:.0f} ms | "
             f"{t['median'][SETTINGS[1]] * 1e3:.0f} ms | {t['ratio']}x [{t['rounds'][0]:.3f}-{t['rounds'][-1]:.3f}] |",
             f"| peak RSS rise in one step | {mib(p['median'][SETTINGS[0]])} | {mib(p['median'][SETTINGS[1]])} | "
             f"{p['ratio']}x [{p['rounds'][0]:.3f}-{p['rounds'][-1]:.3f}] |", "",
             "Peak rise per process, default: " + ", ".join(mib(b) for b in p["runs"][SETTINGS[0]])
             + "; fixed: " + ", ".join(mib(b) for b in p["runs"][SETTINGS[1]]) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--batch", type=int, default=1, help="resnet19 batch size (default 1)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.child:
        return child(args.child, args.batch)
    import torch

    from report import commit, write_results

    t0 = time.time()
    res = dict(measured=measure(args.rounds, args.batch), rounds=args.rounds, batch=args.batch, device="cpu",
               machine=platform.machine(), cpu_count=os.cpu_count(), torch=torch.__version__, commit=commit())
    res["seconds"] = round(time.time() - t0)
    write_results(NAME, res, markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
