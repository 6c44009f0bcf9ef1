"""Run directories and frame caches under concurrency and faults: one owner per run directory (a
second start is refused and touches nothing; a dead owner's lock is taken over), unique auto-named
run directories, best.pt recovered after a kill during its write, cache builds that clean up after
kill -9, SIGTERM and SIGINT without touching a live concurrent build, and one-line errors for the
I/O failures a user can cause. Kills land at chosen moments through the TETSNN_TEST_PAUSE hook (a
process says ``tetsnn-pause NAME`` and waits there for a signal; SIGCONT lets it go on); the tests
poll for events with generous timeouts and never time anything."""
import errno
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import tetsnn.engine.train as train_mod
from tetsnn.engine.checkpoint import load_checkpoint, save_checkpoint
from tetsnn.data.events import cache as cache_mod
from tetsnn.engine.preprocess_cli import main as preprocess_main
from tetsnn.engine.evaluate import main as evaluate_main
from tetsnn.engine.train import main
from tetsnn.utils import FolderLock

from conftest import CHILD_ENV, QUICK
from test_events_datasets import make_cifar_root

TIMEOUT = 300
# learns visibly from epoch to epoch (test accuracy 28% -> 53% on this machine's CPU kernels)
LEARNS = ["--limit-train", "192", "--limit-test", "128", "--batch-size", "32", "--lr", "0.01",
          "--model-kw", "{backend: loop}"]


class Cli:
    """``python -m tetsnn ARGS`` in the background, its output in files."""

    def __init__(self, tmp_path, args, name, pause=None, preexec_fn=None, cwd=None):
        self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        env.pop("TETSNN_TEST_PAUSE", None)
        if pause:
            env["TETSNN_TEST_PAUSE"] = pause
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tetsnn", *map(str, args)], stdout=out, stderr=err,
                                         env=env, cwd=cwd, preexec_fn=preexec_fn)

    def stdout(self):
        return self.out_path.read_text()

    def stderr(self):
        return self.err_path.read_text()

    def wait_line(self, text):
        deadline = time.time() + TIMEOUT
        while text not in self.stderr() + self.stdout():
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"never saw {text!r} (exit {self.proc.poll()}):\n{self.stderr()[-3000:]}")
            time.sleep(0.02)

    def finish(self):
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"did not finish:\n{self.stderr()[-3000:]}")

    def kill(self, sig):
        os.kill(self.proc.pid, sig)


def run(args, cwd=None, preexec_fn=None):
    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TETSNN_TEST_PAUSE", None)
    return subprocess.run([sys.executable, "-m", "tetsnn", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=cwd, preexec_fn=preexec_fn)


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.slow   # subprocesses, each paying torch's import and the kernels' compile
def test_a_second_start_on_a_live_run_is_refused_and_the_run_finishes_unharmed(tmp_path):
    out = tmp_path / "r"
    live = Cli(tmp_path, ["train", *QUICK, "--epochs", "2", "--checkpoint-every", "1", "--out", out],
               "live", pause="step#2:600")
    live.wait_line("tetsnn-pause step 0")     # last.pt (step 1) written, a temporary of step 2 may follow
    before = snapshot(out)
    holder = f"host {socket.gethostname()} pid {live.proc.pid}"
    for args in (["--epochs", "3", "--out", out, "--seed", "7"], ["--resume", "auto", "--out", out]):
        second = run(["train", *QUICK, *args] if args[0] == "--epochs" else ["train", *args])
        assert second.returncode == 2, second.stderr
        line = one_line(second.stderr)
        assert f"{out} is in use by a live run ({holder})" in line
    assert snapshot(out) == before                  # nothing touched
    live.kill(signal.SIGCONT)                       # go on
    assert live.finish() == 0, live.stderr()
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["seed"] == 1000
    assert "seed: 1000" in (out / "config.yaml").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.slow   # subprocesses, each paying torch's import and the kernels' compile
def test_two_starts_on_one_new_out_one_refused_and_a_stop_before_the_first_step_resumes(tmp_path, capsys):
    """The refused start leaves the first one intact; SIGTERM before the first step saves the new
    run's start, and the printed command continues it (a killed owner's lock is taken over in
    test_kill_during_the_best_write_then_resume_recovers_best)."""
    out = tmp_path / "r"
    first = Cli(tmp_path, ["train", *QUICK, "--epochs", "1", "--out", out], "first", pause="start:600")
    first.wait_line("tetsnn-pause start 0")
    second = run(["train", *QUICK, "--epochs", "1", "--out", out, "--seed", "7"])
    assert second.returncode == 2 and f"pid {first.proc.pid}" in one_line(second.stderr)
    first.kill(signal.SIGTERM)
    assert first.finish() == 0, first.stderr()
    printed = first.stdout().strip().splitlines()[-1]
    assert "stopped by signal before the first step; saved last.pt" in printed
    command = shlex.split(printed.split("continue with: ")[1])
    assert command[:2] == ["tetsnn", "train"] and main(command[2:]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["seed"] == 1000
    assert (out / ".lock").read_text().split() == [socket.gethostname(), str(os.getpid())]   # the last holder


def test_auto_named_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_mod.time, "strftime", lambda fmt: "20260101-000000")
    base = "20260101-000000-digits-digits_snn"
    (tmp_path / "runs" / base).mkdir(parents=True)     # a run of this second already took the name
    accuracies = []
    for _ in range(2):
        assert main(["--limit-train", "64", "--limit-test", "64", "--batch-size", "64", "--epochs", "1"]) == 0
        accuracies.append(capsys.readouterr().out)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [base, f"{base}-2", f"{base}-3"]
    for name, printed in zip(runs[1:], accuracies):
        m = json.loads((tmp_path / "runs" / name / "metrics.jsonl").read_text())
        assert f"final test accuracy: {100 * m['test_acc']:.2f}%" in printed and f"runs/{name}" in printed


@pytest.mark.slow   # subprocesses, each paying torch's import and the kernels' compile
def test_kill_during_the_best_write_then_resume_recovers_best(tmp_path, capsys):
    out = tmp_path / "r"
    job = Cli(tmp_path, ["train", *LEARNS, "--epochs", "2", "--out", out], "run", pause="save#best.pt/2:600")
    job.wait_line("tetsnn-pause save 0")
    job.kill(signal.SIGKILL)
    job.finish()
    assert load_checkpoint(out / "best.pt")["epoch"] == 1 and load_checkpoint(out / "last.pt")["best"]["epoch"] == 2
    resumed = run(["train", "--resume", "auto", "--out", out])     # a finished run: only the summary
    assert resumed.returncode == 0, resumed.stderr
    assert "best.pt recovered from last.pt (epoch 2" in resumed.stdout
    history = load_checkpoint(out / "last.pt")["history"]
    best = max(history, key=lambda m: m["test_acc"])
    held = load_checkpoint(out / "best.pt")
    assert held["epoch"] == best["epoch"] and held["history"][-1] == best
    assert f"best test accuracy: {100 * best['test_acc']:.2f}% (epoch {best['epoch']})" in resumed.stdout
    assert evaluate_main(["--checkpoint", str(out / "best.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(best["test_acc"], abs=1e-12)


def test_lost_best_weights_are_reported_and_the_summary_states_what_best_pt_holds(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    rows = [dict(epoch=e, test_acc=a) for e, a in ((1, 0.5), (2, 0.7), (3, 0.6))]
    save_checkpoint(dict(model={}, config={}, epoch=1, best=dict(epoch=1, test_acc=0.5)), out / "best.pt")
    (out / "last.pt").write_bytes(b"")
    last = dict(epoch=3, step=0, best=dict(epoch=2, test_acc=0.7), history=rows)
    held = train_mod._recover_best(str(out), last, print)
    assert held == dict(epoch=1, test_acc=0.5)
    line = one_line(capsys.readouterr().out)
    assert "best.pt holds epoch 1 (50.00%), but the best test accuracy was 70.00% at epoch 2" in line
    train_mod._summary(rows, held, None, print)
    assert "best test accuracy: 50.00% (epoch 1), as held by best.pt (epoch 2 reached 70.00%" in capsys.readouterr().out


def test_resume_auto_on_a_damaged_run_and_a_new_run_over_one_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(QUICK + ["--epochs", "1", "--out", str(out)]) == 0
    (out / "last.pt").unlink()
    kept = snapshot(out)
    capsys.readouterr()
    assert main(["--resume", "auto", "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{out} holds a run without its last.pt (best.pt, metrics.jsonl present)" in line
    assert main(QUICK + ["--out", str(out)]) == 2
    assert "holds a run without its last.pt" in one_line(capsys.readouterr().err)
    now = snapshot(out)
    assert now.pop(".lock")[0] == kept.pop(".lock")[0] and now == kept     # the lock holder's name only


def test_empty_tetsnn_cache_is_unset(monkeypatch):
    monkeypatch.setenv("TETSNN_CACHE", "")
    assert cache_mod.default_cache_dir() == cache_mod.Path.home() / ".cache" / "tetsnn"
    monkeypatch.setenv("TETSNN_CACHE", "/x/y")
    assert str(cache_mod.default_cache_dir()) == "/x/y"


# -- frame-cache builds ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dvs_root(tmp_path_factory):
    return make_cifar_root(tmp_path_factory.mktemp("dvs"))


def temps(cache):
    return sorted(p.name for p in cache.iterdir() if ".tmp-" in p.name) if cache.exists() else []


def finished(cache):
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def preprocess(root, cache, T):
    return ["preprocess", "--dataset", "cifar10-dvs", "--data-dir", root, "--cache-dir", cache, "--T", T, "--threads", "1"]


@pytest.mark.slow   # subprocesses, each paying torch's import and the kernels' compile
def test_cache_builds_clean_up_orphans_never_a_live_build_and_stop_on_sigterm(dvs_root, tmp_path):
    cache = tmp_path / "cache"
    killed = Cli(tmp_path, preprocess(dvs_root, cache, 2), "killed", pause="cache#3:600")
    killed.wait_line("tetsnn-pause cache 0")
    killed.kill(signal.SIGKILL)
    killed.finish()
    assert temps(cache) == [f".{finished_name(cache, 2)}.tmp-{killed.proc.pid}"]     # an orphan
    live = Cli(tmp_path, preprocess(dvs_root, cache, 3), "live", pause="cache#3:600")   # another cache
    live.wait_line("tetsnn-pause cache 0")
    live_tmp = [t for t in temps(cache) if t.endswith(f".tmp-{live.proc.pid}")]
    assert len(live_tmp) == 1 and temps(cache) == live_tmp           # the orphan is gone, the live one built
    done = run(preprocess(dvs_root, cache, 2))                         # the killed cache, built anew
    assert done.returncode == 0, done.stderr
    assert temps(cache) == live_tmp                                    # the live build untouched
    live.kill(signal.SIGTERM)
    assert live.finish() == 0, live.stderr()
    assert temps(cache) == [] and "Traceback" not in live.stderr()
    printed = one_line(live.stdout())
    assert printed.startswith("stopped by signal while building the frame cache in")
    again = run(shlex.split(printed.split("continue with: ")[1])[1:])
    assert again.returncode == 0, again.stderr
    assert len(finished(cache)) == 2 and temps(cache) == []


def finished_name(cache, T):
    """The name the cache of T frames will get (from the temporary folder's name)."""
    names = [p.name for p in cache.iterdir() if ".tmp-" in p.name]
    assert len(names) == 1
    return names[0][1:names[0].index(".tmp-")]


@pytest.mark.slow   # subprocesses, each paying torch's import and the kernels' compile
def test_a_build_waits_for_a_live_build_of_the_same_cache_and_sigint_stops_it(dvs_root, tmp_path):
    cache = tmp_path / "cache"
    first = Cli(tmp_path, preprocess(dvs_root, cache, 2), "first", pause="cache#3:600")
    first.wait_line("tetsnn-pause cache 0")
    second = Cli(tmp_path, preprocess(dvs_root, cache, 2), "second")
    second.wait_line("waiting for the build of")
    assert f"pid {first.proc.pid}" in second.stdout()
    first.kill(signal.SIGINT)                       # Ctrl-C: stops, cleans up, no traceback
    assert first.finish() == 0 and "Traceback" not in first.stderr()
    assert second.finish() == 0, second.stderr()
    assert len(finished(cache)) == 1 and temps(cache) == []


@pytest.mark.slow   # subprocesses, each paying torch's import and the kernels' compile
def test_sigterm_during_the_cache_build_inside_train_exits_0_and_the_printed_command_works(dvs_root, tmp_path):
    out = tmp_path / "r"
    args = ["train", "--config", "cifar10dvs_vggsnn", "--data-dir", dvs_root, "--cache-dir", tmp_path / "c",
            "--T", "1", "--epochs", "1", "--batch-size", "4", "--limit-train", "4", "--limit-test", "4",
            "--workers", "1", "--out", out]
    job = Cli(tmp_path, args, "train", pause="cache#3:600")
    job.wait_line("tetsnn-pause cache 0")
    job.kill(signal.SIGTERM)
    assert job.finish() == 0, job.stderr()
    assert temps(tmp_path / "c") == [] and not out.exists()      # the run directory comes after the data
    printed = one_line(job.stdout())
    assert printed.startswith("stopped by signal while building the frame cache")
    again = run(shlex.split(printed.split("continue with: ")[1])[1:])
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


# -- one-line errors ------------------------------------------------------------------------------
def _fsize_limit(n):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


@pytest.mark.slow   # subprocesses, each paying torch's import and the kernels' compile
def test_file_size_limit_on_the_cache_and_on_checkpoints_is_one_line(dvs_root, tmp_path):
    cache = tmp_path / "cache"
    built = run(preprocess(dvs_root, cache, 2), preexec_fn=_fsize_limit(100_000))
    assert built.returncode == 1
    line = one_line(built.stderr)
    assert "cannot write the frame cache" in line and str(cache) in line and "file too large" in line
    assert temps(cache) == [] and finished(cache) == []
    out = tmp_path / "r"
    trained = run(["train", "--limit-train", "64", "--limit-test", "64", "--epochs", "1", "--out", out],
                  preexec_fn=_fsize_limit(200_000))
    assert trained.returncode == 1
    assert one_line(trained.stderr) == (f"tetsnn train: error: cannot write checkpoint {out / 'last.pt'}: "
                                        f"file too large (over the file-size limit, see ulimit -f)")


def test_cache_dir_that_is_a_file_and_a_full_disk_are_one_line(dvs_root, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert preprocess_main([str(a) for a in preprocess(dvs_root, blocker, 2)[1:]]) == 1
    assert one_line(capsys.readouterr().err) == f"tetsnn preprocess: error: cannot use {blocker} as a folder: it is a file"
    args = ["--config", "cifar10dvs_vggsnn", "--data-dir", str(dvs_root), "--T", "1", "--epochs", "1",
            "--batch-size", "4", "--limit-train", "4", "--limit-test", "4", "--out", str(tmp_path / "r")]
    assert main(args + ["--cache-dir", str(blocker / "sub")]) == 1
    assert one_line(capsys.readouterr().err).startswith(f"tetsnn train: error: cannot create the folder {blocker / 'sub'}")

    real_open = open

    def full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and ".tmp-" in str(path):
            class Full:
                def __getattr__(self, name):
                    return getattr(f, name)

                def write(self, data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return Full()
        return f
    monkeypatch.setattr(cache_mod, "open", full_disk, raising=False)
    cache = tmp_path / "cache"
    assert main(args + ["--cache-dir", str(cache)]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("tetsnn train: error: cannot write the frame cache ") and line.endswith(
        "no space left on the device")
    assert temps(cache) == []


def test_download_without_network_is_one_line(tmp_path, monkeypatch, capsys):
    def offline(*a, **k):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["--dataset", "cifar10", "--model", "resnet19", "--data-dir", str(tmp_path / "cifar"), "--download",
                 "--out", str(tmp_path / "r")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"tetsnn train: error: cannot download cifar10 to {tmp_path / 'cifar'}: no connection")


def test_test_profile_and_export_name_the_path_they_cannot_use(tmp_path, capsys):
    from tetsnn.engine.export_cli import main as export_main
    from tetsnn.engine.profile_cli import main as profile_main

    out = tmp_path / "r"
    assert main(QUICK + ["--epochs", "1", "--out", str(out)]) == 0
    blocker = tmp_path / "file"
    blocker.write_text("")
    capsys.readouterr()
    assert export_main(["--checkpoint", str(out / "best.pt"), "--out", str(blocker / "x.nir")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("tetsnn export: error:") and str(blocker) in line
    assert profile_main(["--checkpoint", str(out / "best.pt"), "--plot", str(blocker / "p.png")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("tetsnn profile: error:") and str(blocker) in line


def test_folder_lock_is_exclusive_and_names_its_holder(tmp_path):
    a, b = FolderLock(tmp_path / "l"), FolderLock(tmp_path / "l")
    assert a.try_acquire() and not b.try_acquire()
    assert b.holder() == f"host {socket.gethostname()} pid {os.getpid()}"
    a.release()
    assert b.try_acquire()
    b.release()


@pytest.mark.slow   # subprocesses, each paying torch's import and the kernels' compile
def test_under_torchrun_rank_0_holds_the_run_lock(tmp_path):
    from test_ddp import TINY, Torchrun

    out = tmp_path / "r"
    job = Torchrun(tmp_path, TINY + ["--epochs", "1", "--out", out], pause="start@0:600")
    job.wait_line("tetsnn-pause start 0")
    second = run(["train", "--resume", "auto", "--out", out])
    assert second.returncode == 2, second.stderr
    assert f"({'host ' + socket.gethostname()} pid {job.worker(0)})" in one_line(second.stderr)
    os.kill(job.worker(0), signal.SIGCONT)
    assert job.finish() == 0, job.stderr()[-3000:]
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_permission_denied_is_one_line_naming_the_folder(dvs_root, tmp_path, monkeypatch, capsys):
    """A folder the user may not write (simulated: the tests may run as root, which may write anywhere)."""
    locked = tmp_path / "locked"
    real_mkdir = os.mkdir

    def no_write(path, *a, **k):
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *a, **k)
    monkeypatch.setattr(os, "mkdir", no_write)
    assert main(QUICK + ["--epochs", "1", "--out", str(locked / "r")]) == 1
    assert one_line(capsys.readouterr().err) == (f"tetsnn train: error: cannot create the folder {locked / 'r'}: "
                                                 f"permission denied")
    real_mkdir(locked)
    assert preprocess_main([str(a) for a in preprocess(dvs_root, locked, 2)[1:]]) == 1
    assert one_line(capsys.readouterr().err) == (f"tetsnn preprocess: error: cannot build the frame cache in "
                                                 f"{locked}: permission denied")
