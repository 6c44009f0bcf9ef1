"""Stress run-directory ownership, best.pt and frame-cache builds at random moments, with the CPU
loaded (not part of the suite).

    python benchmarks/stress_run_dir.py [--runs 3] [--load 1] [--seed 0] [--scenarios lock,best,cache,train-cache]

- ``lock``: ``torchrun --nproc_per_node=2 -m tetsnn train --resume auto --out R`` (rank 0 holds the
  run lock); at a random moment either a second ``tetsnn train --resume auto --out R`` starts (pass:
  refused with exit 2 and one line naming the holder while the job is live, the job exits 0 with
  every epoch in last.pt and metrics.jsonl) or the whole job is killed with SIGKILL and
  ``--resume auto`` takes the dead owner's lock over (pass: it finishes, exit 0).
- ``best``: one process on a schedule whose accuracy rises; SIGKILL at a random moment (sometimes
  inside a best.pt write, through the pause hook), then ``--resume auto`` to the end. Pass: best.pt
  holds the history's best epoch; no temporary file.
- ``cache``: two ``tetsnn preprocess`` of one cache at once; SIGKILL, SIGTERM or SIGINT to one of
  them at a random moment. Pass: the other exits 0, a signalled one exits 0 (or dies for SIGKILL),
  one finished cache and no temporary folder are left after a final build.
- ``train-cache``: ``tetsnn train`` on event data; SIGTERM at a random moment of its start (often
  inside the cache build). Pass: exit 0, no temporary folder; a printed "continue with" command
  exits 0.

Writes benchmarks/results/stress_run_dir.json and its section of docs/performance.md.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from stress import TINY, arguments, catches_sigterm, run_scenarios, write_report  # noqa: E402

from tetsnn.engine.checkpoint import load_checkpoint  # noqa: E402

LEARNS = ["--limit-train", "192", "--limit-test", "128", "--batch-size", "32", "--lr", "0.01",
          "--model-kw", "{backend: loop}"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COMMIT = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                        text=True).stdout.strip() or "unknown"


def start(args, torchrun=False, pause=None):
    cmd = [sys.executable, "-m", "tetsnn", *map(str, args)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--monitor-interval=0.1", "-m", "tetsnn", *map(str, args)]
    env = {**ENV, **({"TETSNN_TEST_PAUSE": pause} if pause else {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return None, out, err
    return proc.returncode, out, err


def wait_until(condition, proc, timeout=600):
    deadline = time.time() + timeout
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def temps(folder: Path):
    return [p.name for p in folder.iterdir() if ".tmp" in p.name] if folder.exists() else []


def run_lock(rng, work: Path):
    out = work / "r"
    args = ["train", *TINY, "--epochs", "3", "--resume", "auto", "--out", out]
    job = start(args, torchrun=True)
    wait_until(lambda: (out / ".lock").exists() and (out / ".lock").stat().st_size > 0, job)   # the job holds it
    delay = rng.uniform(0, 20)
    time.sleep(delay)
    if rng.random() < 0.5:
        what = f"second start {delay:.1f} s after the lock was taken"
        rc2, _, err2 = finish(start(args[:1] + args[-4:]))
        live = job.poll() is None
        rc, text, err = finish(job)
        if rc != 0:
            return False, f"{what}: the job exited {rc}: {err[-2000:]}"
        if live and (rc2 != 2 or len(err2.strip().splitlines()) != 1 or "is in use by a live run" not in err2):
            return False, f"{what}: not refused in one line (exit {rc2}): {err2[-1000:]}"
        if rc2 not in (0, 2):
            return False, f"{what}: second start exited {rc2}: {err2[-1500:]}"
        what += " (refused)" if rc2 == 2 else " (after the end)"
    else:
        what = f"SIGKILL of the job at {delay:.1f} s, then --resume auto"
        os.killpg(job.pid, signal.SIGKILL)
        finish(job)
        rc, text, err = finish(start(args))
        if rc != 0:
            return False, f"{what}: the resumed run exited {rc}: {err[-2000:]}"
    ckpt = load_checkpoint(out / "last.pt")
    rows = (out / "metrics.jsonl").read_text().splitlines()
    if ckpt["epoch"] != 3 or len(rows) != 3 or temps(out):
        return False, f"{what}: epoch {ckpt['epoch']}, {len(rows)} rows, temporaries {temps(out)}"
    return True, what


def run_best(rng, work: Path):
    out = work / "r"
    args = ["train", *LEARNS, "--epochs", "3", "--resume", "auto", "--out", out]    # the same command again
    epoch = rng.choice([1, 2, 3])
    if rng.random() < 0.5:
        what = f"SIGKILL inside the best.pt write of epoch {epoch} (if it is a best)"
        job = start(args, pause=f"save#best.pt/{epoch}:600")
        deadline = time.time() + 600
        while job.poll() is None and time.time() < deadline:
            if (out / f"best.tmp{job.pid}.pt").exists():
                time.sleep(0.5)          # the pause holds it there until a signal
                break
            time.sleep(0.01)
    else:
        delay = rng.uniform(0, 40)
        what = f"SIGKILL at {delay:.1f} s"
        job = start(args)
        time.sleep(delay)
    os.killpg(job.pid, signal.SIGKILL)
    finish(job)
    rc, text, err = finish(start(args))
    if rc != 0:
        return False, f"{what}: resume exited {rc}: {text[-1000:]} {err[-2000:]}"
    history = load_checkpoint(out / "last.pt")["history"]
    best = max(history, key=lambda m: m["test_acc"])["epoch"]
    held = load_checkpoint(out / "best.pt")["epoch"]
    if held != best or temps(out):
        return False, f"{what}: best.pt holds epoch {held}, the best is {best}; temporaries {temps(out)}"
    return True, what + (" (recovered)" if "recovered" in text else "")


def run_cache(rng, work: Path, root: Path):
    cache = work / "cache"
    args = ["preprocess", "--dataset", "cifar10-dvs", "--data-dir", root, "--cache-dir", cache, "--T", "2", "--threads", "1"]
    jobs = [start(args), start(args)]
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
    target = rng.choice([0, 1])
    wait_until(lambda: catches_sigterm(jobs[target].pid), jobs[target])    # building, or waiting for the other
    delay = rng.uniform(0, 4)
    what = f"{sig.name} to build {target} {delay:.1f} s after it started"
    time.sleep(delay)
    if jobs[target].poll() is None:
        os.kill(jobs[target].pid, sig)
    results = [finish(j) for j in jobs]
    for i, (rc, _, err) in enumerate(results):
        # the target may also end by the signal itself when it came after its build (SIGINT: 130)
        if rc != 0 and not (i == target and rc in (-sig, 130)):
            return False, f"{what}: build {i} exited {rc}: {err[-1500:]}"
        if "Traceback" in err:
            return False, f"{what}: build {i} printed a traceback: {err[-1500:]}"
    rc, _, err = finish(start(args))
    done = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if rc != 0 or len(done) != 1 or temps(cache):
        return False, f"{what}: final build exit {rc}, {len(done)} caches, temporaries {temps(cache)}"
    return True, what


def run_train_cache(rng, work: Path, root: Path):
    out, cache = work / "r", work / "c"
    args = ["train", "--config", "cifar10dvs_vggsnn", "--data-dir", root, "--cache-dir", cache, "--T", "1",
            "--epochs", "1", "--batch-size", "4", "--limit-train", "4", "--limit-test", "4", "--workers", "1",
            "--out", out]
    job = start(args)
    wait_until(lambda: catches_sigterm(job.pid), job)     # its stop handling is installed
    delay = rng.uniform(0, 6)
    what = f"SIGTERM {delay:.1f} s after the start"
    time.sleep(delay)
    if job.poll() is None:
        os.kill(job.pid, signal.SIGTERM)
    rc, text, err = finish(job)
    if rc != 0 or temps(cache):
        return False, f"{what}: exit {rc}, temporaries {temps(cache)}: {err[-1500:]}"
    if "continue with: " in text:
        what += " (during the build)" if "frame cache" in text else " (in training)"
        line = [s for s in text.splitlines() if "continue with: " in s][0]
        rc, _, err = finish(start(shlex.split(line.split("continue with: ")[1])[1:]))
        if rc != 0:
            return False, f"{what}: the printed command exited {rc}: {err[-1500:]}"
    return True, what


def report(args, results, echo=False):
    write_report("stress_run_dir", "## Run directories and cache builds under faults (`benchmarks/stress_run_dir.py`)",
                 "{cores} cores, with {load} busy-loop process(es) and the machine's other work competing; "
                 "random moments, seed {seed}; commit " + COMMIT + ".",
                 {"lock": "2-worker torchrun job; a second --resume auto start, or SIGKILL of the job then --resume auto",
                  "best": "SIGKILL at a random moment or inside a best.pt write, then --resume auto (best.pt = best epoch)",
                  "cache": "two concurrent preprocess builds of one cache; SIGKILL/SIGTERM/SIGINT to one",
                  "train-cache": "SIGTERM to train on event data during its start (exit 0, the printed command works)"},
                 args, results, echo)


def event_root(tmp: Path, scenarios):
    """The small event dataset the cache scenarios build from."""
    from test_events_datasets import make_cifar_root
    return make_cifar_root(tmp / "dvs")


def run(scenario, rng, work: Path, root):
    if scenario == "lock":
        return run_lock(rng, work)
    if scenario == "best":
        return run_best(rng, work)
    if scenario == "cache":
        return run_cache(rng, work, root)
    return run_train_cache(rng, work, root)


def main(argv=None):
    args = arguments(__doc__, argv, runs=3, load=1, scenarios="lock,best,cache,train-cache")
    return run_scenarios(args, run, report, setup=event_root)


if __name__ == "__main__":
    raise SystemExit(main())
