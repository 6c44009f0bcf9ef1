"""Training under torchrun with 2 gloo CPU processes: signals to any subset of the workers, at
chosen moments, a worker killed with SIGKILL under --max-restarts, a failed checkpoint write, and
resuming on another number of processes. The TETSNN_TEST_PAUSE hook holds a rank at a point, says
so on stderr and waits there until it receives a signal, so every signal lands inside the chosen
moment however busy the machine is; the tests wait for events (a line), with generous timeouts."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from tetsnn.engine.checkpoint import load_checkpoint
from tetsnn.engine.evaluate import main as evaluate_main
from tetsnn.engine.train import main

from conftest import CHILD_ENV

pytestmark = pytest.mark.slow   # every test here launches torchrun jobs

# 3 optimizer steps per epoch (global batch 64); 65 test samples: 2 evaluation batches on rank 0,
# 1 on rank 1; the per-step loop backend (no kernel compilation in every new process)
TINY = ["--limit-train", "192", "--limit-test", "65", "--batch-size", "64", "--model-kw", "{backend: loop}"]
TIMEOUT = 240


def read_metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Torchrun:
    """``torchrun --standalone --nproc_per_node=N -m tetsnn train ARGS`` with its output in files."""

    def __init__(self, tmp_path, args, nproc=2, pause=None, restarts=0, preexec_fn=None, name="run"):
        self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": "1"}
        if pause:
            env["TETSNN_TEST_PAUSE"] = pause
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={restarts}", "--monitor-interval=0.1", "-m", "tetsnn", "train", *map(str, args)]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=preexec_fn)

    def stdout(self):
        return self.out_path.read_text()

    def stderr(self):
        return self.err_path.read_text()

    def wait_for(self, what, condition, timeout=TIMEOUT):
        """Poll until ``condition()``; fail with the output if the job ends first or time runs out."""
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"never saw {what} (exit {self.proc.poll()}):\n{self.stderr()[-3000:]}")
            time.sleep(0.02)

    def wait_line(self, text, count=1):
        self.wait_for(repr(text), lambda: self.stderr().count(text) >= count)

    def finish(self):
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"torchrun did not finish:\n{self.stderr()[-3000:]}")
        return self.proc.returncode

    def worker(self, rank):
        """The pid of the worker process with RANK=rank (from /proc)."""
        for task in os.listdir(f"/proc/{self.proc.pid}/task"):
            for child in open(f"/proc/{self.proc.pid}/task/{task}/children").read().split():
                try:
                    env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        raise AssertionError(f"no worker with RANK={rank}")


def assert_clean(run):
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("targets", [((1, signal.SIGTERM),), ((0, signal.SIGTERM), (1, signal.SIGUSR1))],
                         ids=["rank1", "both-term-usr1"])
def test_signal_stops_every_rank_at_the_same_step(tmp_path, targets, capsys):
    """Signals reach a subset of the workers while rank 1 is held after step 4 (epoch 2, step 1) and
    rank 0 waits for it in step 5: every rank stops after step 5, rank 0 writes last.pt, every
    process exits 0 (and so does torchrun)."""
    out = tmp_path / "run"
    job = Torchrun(tmp_path, TINY + ["--epochs", "30", "--out", out], pause="step@1#4:120")
    job.wait_line("tetsnn-pause step 1")
    pids = {rank: job.worker(rank) for rank, _ in targets}
    for rank, sig in targets:
        os.kill(pids[rank], sig)
    assert job.finish() == 0, job.stderr()[-3000:]
    assert job.stdout().count("stopped by signal at epoch 2, step 2") == 1
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["run_steps"], ckpt["world_size"]) == (1, 2, 5, 2)
    assert ckpt["partial"][2] == 64 * 2                    # the samples of both ranks
    assert len(read_metrics(out)) == 1
    assert_clean(out)
    # the DDP evaluation (uneven shares, no padding) agrees with a one-process one
    assert evaluate_main(["--checkpoint", str(out / "best.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(read_metrics(out)[0]["test_acc"], abs=1e-12)


def test_resume_across_process_counts_with_signals_in_evaluation_and_before_first_step(tmp_path, monkeypatch):
    """1 process -> 2 -> 1, each resumed at the exact global step. On 2 processes a signal during
    the evaluation abandons it: last.pt holds the trained epoch without its metrics row, and the
    evaluation runs on resume. A signal before the first step saves nothing."""
    from test_train import _criterion_with, sigterm_at

    out = tmp_path / "run"
    args = TINY + ["--epochs", "3", "--out", str(out)]

    _criterion_with(monkeypatch, sigterm_at(5))   # epoch 2, step 2
    assert main(args) == 0
    monkeypatch.undo()
    assert (load_checkpoint(out / "last.pt")["step"], len(read_metrics(out))) == (2, 1)

    job = Torchrun(tmp_path, args + ["--resume", "auto"], pause="eval@1:120", name="eval")
    job.wait_line("tetsnn-pause eval 1")                  # rank 1 before its first evaluation batch
    os.kill(job.worker(1), signal.SIGTERM)
    assert job.finish() == 0, job.stderr()[-3000:]
    assert "resuming" in job.stdout() and "stopped by signal while evaluating epoch 2" in job.stdout()
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["run_steps"], len(ckpt["history"])) == (1, 3, 6, 1)
    assert ckpt["partial"][2] == 192                  # 2 steps on 1 process, 1 on 2 processes
    assert len(read_metrics(out)) == 1

    job = Torchrun(tmp_path, args + ["--resume", "auto"], pause="start:120", name="start")
    job.wait_line("tetsnn-pause start 0")
    os.kill(job.worker(0), signal.SIGINT)
    os.kill(job.worker(1), signal.SIGINT)
    assert job.finish() == 0, job.stderr()[-3000:]
    assert "before the first step" in job.stdout()
    assert load_checkpoint(out / "last.pt")["run_steps"] == 6                # untouched

    assert main(args + ["--resume", "auto"]) == 0
    rows = read_metrics(out)
    assert [m["epoch"] for m in rows] == [1, 2, 3] and [m["world_size"] for m in rows] == [1, 1, 1]
    assert rows[1]["train_loss"] > 0
    assert load_checkpoint(out / "last.pt")["run_steps"] == 9
    assert_clean(out)


def test_signals_during_checkpoint_write(tmp_path):
    """Signals to rank 0 only, while it writes last.pt (two, then one more during the final write):
    the write completes, the ranks stop after the next step, and the final last.pt is whole."""
    out = tmp_path / "run"
    job = Torchrun(tmp_path, TINY + ["--epochs", "30", "--checkpoint-every", "1", "--out", out],
                   pause="save:120")
    job.wait_line("tetsnn-pause save 0")               # inside the write after step 1
    rank0 = job.worker(0)
    os.kill(rank0, signal.SIGTERM)
    os.kill(rank0, signal.SIGTERM)
    job.wait_line("tetsnn-pause save 0", count=2)      # the stop's write, after step 2
    os.kill(rank0, signal.SIGINT)
    assert job.finish() == 0, job.stderr()[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["run_steps"]) == (0, 2, 2)
    assert_clean(out)


def test_kill9_with_max_restarts_and_resume_auto_is_bit_identical(tmp_path):
    """SIGKILL of one worker: torchrun restarts both, --resume auto continues from the last
    checkpoint (written every 2 steps), and the final weights equal an uninterrupted run's."""
    args = TINY + ["--epochs", "3", "--checkpoint-every", "2", "--resume", "auto"]
    ref = Torchrun(tmp_path, args + ["--out", tmp_path / "ref"], name="ref")
    assert ref.finish() == 0, ref.stderr()[-3000:]

    out = tmp_path / "run"
    # 3 restarts, as recommended: on a loaded machine gloo's reconnection after a restart can itself
    # fail ("Connection refused"), which costs one more restart
    job = Torchrun(tmp_path, args + ["--out", out], restarts=3, pause="step@1#5:120")
    job.wait_line("tetsnn-pause step 1")              # after step 5: last.pt holds step 4 (epoch 2)
    os.kill(job.worker(1), signal.SIGKILL)
    assert job.finish() == 0, job.stderr()[-3000:]
    assert "resuming" in job.stdout()
    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(out / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    strip = lambda rows: [{k: v for k, v in m.items() if k != "seconds"} for m in rows]
    assert strip(read_metrics(out)) == strip(read_metrics(tmp_path / "ref")) and len(read_metrics(out)) == 3
    assert_clean(out)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))   # 1 MiB


def test_failed_write_stops_every_rank_with_rank0s_message(tmp_path):
    """A checkpoint (about 2 MB) over the file size limit: rank 0's write fails, every rank exits 1
    with its message, and neither last.pt nor a temporary file is left."""
    out = tmp_path / "run"
    job = Torchrun(tmp_path, TINY + ["--epochs", "3", "--checkpoint-every", "1", "--out", out],
                   preexec_fn=_limit_file_size)
    assert job.finish() != 0
    err = job.stderr()
    assert f"tetsnn train: error: cannot write checkpoint {out / 'last.pt'}" in err
    assert "exitcode  : 1" in err and "exitcode  : -" not in err         # both workers exited 1
    assert not (out / "last.pt").exists()
    assert_clean(out)


def test_memory_min_under_ddp_matches_the_default_mode(tmp_path):
    """Two gloo ranks training with ``--memory min`` end with the weights and metrics of the default mode."""
    args = TINY + ["--epochs", "1"]
    runs = {}
    for mode in ("default", "min"):
        job = Torchrun(tmp_path, args + ["--memory", mode, "--out", tmp_path / mode], name=mode)
        assert job.finish() == 0, job.stderr()[-3000:]
        runs[mode] = load_checkpoint(tmp_path / mode / "last.pt")
    assert runs["min"]["config"]["memory"] == "min"
    for k, v in runs["default"]["model"].items():
        assert torch.equal(v, runs["min"]["model"][k]), k
    strip = lambda rows: [{k: v for k, v in m.items() if k != "seconds"} for m in rows]
    assert strip(read_metrics(tmp_path / "min")) == strip(read_metrics(tmp_path / "default"))
