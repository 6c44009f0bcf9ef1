"""Stress the DDP stop and restart paths at random moments, with the CPU loaded (not part of the suite).

    python benchmarks/stress_ddp.py [--runs 20] [--load 2] [--seed 0] [--scenarios signal,kill]

Each run launches ``torchrun --nproc_per_node=2 -m tetsnn train`` (gloo, CPU) on a tiny digits
schedule while ``--load`` busy-loop processes compete for the CPU.

- ``signal``: once every worker has installed its handlers (SIGTERM appears in the SigCgt mask of
  /proc/PID/status), wait a random 0-15 s, then send SIGTERM, SIGINT or SIGUSR1 (sometimes twice)
  to a random non-empty subset of the workers. The moment falls anywhere: data building, a step,
  an evaluation, a checkpoint write (last.pt is written every step or two), before the first step,
  or after the end. Pass: torchrun exits 0; last.pt, when written, loads and is at a step boundary
  every rank agreed on (its sample count is the global batch times its steps); no temporary file.
- ``kill``: ``--max-restarts=3 --resume auto``; at a random 0-20 s after launch (imports, setup,
  training, a write, anything), SIGKILL one random worker. Pass: torchrun exits 0 and the final
  last.pt weights are bit-identical to an uninterrupted run of the same command.

Writes benchmarks/results/stress_ddp.json and its section of docs/performance.md.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stress import TINY, arguments, catches_sigterm, run_scenarios, write_report  # noqa: E402

import torch  # noqa: E402

from tetsnn.engine.checkpoint import load_checkpoint  # noqa: E402


def torchrun(args, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "--monitor-interval=0.1", "-m", "tetsnn", "train", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def workers(proc) -> dict:
    """{rank: pid} of torchrun's current workers."""
    found = {}
    try:
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            for child in open(f"/proc/{proc.pid}/task/{task}/children").read().split():
                env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
                for item in env:
                    if item.startswith(b"RANK="):
                        found[int(item[5:])] = int(child)
    except OSError:
        pass
    return found


def wait_ready(proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        w = workers(proc)
        if len(w) == 2 and all(catches_sigterm(p) for p in w.values()):
            return w
        time.sleep(0.01)
    return None


def finish(proc, timeout=600):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out


def run_signal(rng, work: Path) -> tuple[bool, str]:
    out = work / "sig"
    every = rng.choice([1, 2])
    proc = torchrun(TINY + ["--epochs", "3", "--checkpoint-every", every, "--out", out])
    w = wait_ready(proc)
    if w is None:
        rc, text = finish(proc)
        return False, f"workers never became ready (exit {rc}): {text[-1500:]}"
    time.sleep(rng.uniform(0, 15))
    sigs = [rng.choice([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]) for _ in range(rng.choice([1, 1, 2]))]
    targets = rng.choice([[0], [1], [0, 1]])
    what = f"{[s.name for s in sigs]} to ranks {targets}, checkpoint_every {every}"
    for sig in sigs:
        for r in targets:
            try:
                os.kill(w[r], sig)
            except ProcessLookupError:
                pass
    rc, text = finish(proc)
    if rc != 0:
        return False, f"{what}: torchrun exit {rc}: {text[-2000:]}"
    if [p.name for p in out.iterdir() if ".tmp" in p.name]:
        return False, f"{what}: temporary files left"
    if (out / "last.pt").exists():
        ckpt = load_checkpoint(out / "last.pt")
        if ckpt["partial"][2] != 64 * ckpt["step"] or ckpt["run_steps"] != 3 * ckpt["epoch"] + ckpt["step"]:
            return False, f"{what}: inconsistent last.pt (epoch {ckpt['epoch']}, step {ckpt['step']})"
    return True, what


def run_kill(rng, work: Path, reference) -> tuple[bool, str]:
    out = work / "kill"
    proc = torchrun(TINY + ["--epochs", "2", "--checkpoint-every", "2", "--resume", "auto", "--out", out], restarts=3)
    delay = rng.uniform(0, 20)
    rank = rng.choice([0, 1])
    deadline = time.time() + delay
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    w = workers(proc)
    what = f"SIGKILL to rank {rank} at {delay:.1f} s"
    if rank in w:
        try:
            os.kill(w[rank], signal.SIGKILL)
        except ProcessLookupError:
            what += " (already gone)"
    else:
        what += " (no such worker at that moment)"
    rc, text = finish(proc)
    if rc != 0:
        return False, f"{what}: torchrun exit {rc}: {text[-2000:]}"
    final = load_checkpoint(out / "last.pt")
    if final["epoch"] != 2 or any(not torch.equal(v, final["model"][k]) for k, v in reference.items()):
        return False, f"{what}: final weights differ from the uninterrupted run"
    return True, what + (" (restarted)" if "resuming" in text else "")


def report(args, results, echo=False):
    write_report("stress_ddp", "## DDP stop and restart under load (`benchmarks/stress_ddp.py`)",
                 "2 gloo CPU workers under torchrun on {cores} cores, with {load} busy-loop process(es) "
                 "and the machine's other work competing; random moments, seed {seed}.",
                 {"signal": "SIGTERM/SIGINT/SIGUSR1 to a random subset of workers (exit 0, whole last.pt)",
                  "kill": "SIGKILL of a random worker, --max-restarts 3 --resume auto (bit-identical weights)"},
                 args, results, echo)


def reference_run(tmp: Path, scenarios):
    """The final weights of the uninterrupted run the ``kill`` scenario compares with."""
    if "kill" not in scenarios:
        return None
    ref = torchrun(TINY + ["--epochs", "2", "--checkpoint-every", "2", "--resume", "auto", "--out", tmp / "ref"])
    rc, text = finish(ref)
    assert rc == 0, text[-2000:]
    return load_checkpoint(tmp / "ref" / "last.pt")["model"]


def run(scenario, rng, work: Path, reference):
    return run_signal(rng, work) if scenario == "signal" else run_kill(rng, work, reference)


def main(argv=None):
    args = arguments(__doc__, argv, runs=20, load=2, scenarios="signal,kill")
    return run_scenarios(args, run, report, setup=reference_run)


if __name__ == "__main__":
    raise SystemExit(main())
