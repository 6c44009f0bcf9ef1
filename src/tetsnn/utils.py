from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import warnings

import numpy as np
import torch

__all__ = ["seed_all", "atomic_path", "remove_stale_temps", "FileWriteError", "os_error_text", "write_error",
           "make_folder", "io_error_line", "error_line", "FolderLock", "LockHeld", "Interrupted", "stop_on_signals", "stop_checks", "pause_point"]


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (every device) for a reproducible run."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name next to ``path`` to write to; on success it is renamed to ``path``,
    on failure removed, so ``path`` is never left half-written. The extension is kept (for writers
    that choose a format by it)."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"     # the name remove_stale_temps recognises
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TEMP_NAME = re.compile(r".\.tmp\d+(\.[^.]*)?$")


def remove_stale_temps(folder) -> list:
    """Remove the temporary files ``atomic_path`` left in ``folder`` when a process was killed
    mid-write (``NAME.tmpPID.EXT``). Only call it when no other process writes there. Returns the
    names removed."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    stale = sorted(n for n in os.listdir(folder) if _TEMP_NAME.search(n) and os.path.isfile(os.path.join(folder, n)))
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


# -- I/O failures in plain words ----------------------------------------------------------------
_PLAIN = {
    errno.EFBIG: "file too large (over the file-size limit, see ulimit -f)",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error",
}


class FileWriteError(OSError):
    """A file or folder that could not be written; the message is one line naming the path and
    saying what failed."""

    def __str__(self):
        return self.args[0] if self.args else "write failed"


def os_error_text(e: BaseException) -> str:
    """What an I/O failure was, in plain words (from its errno where known), without the path."""
    if isinstance(e, FileWriteError):
        return str(e)
    if isinstance(e, OSError) and e.errno in _PLAIN:
        return _PLAIN[e.errno]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[:1].lower() + e.strerror[1:]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_error(path, e: BaseException, what: str = "write") -> FileWriteError:
    """``cannot WHAT PATH: REASON`` as a FileWriteError (one line)."""
    return FileWriteError(f"cannot {what} {os.fspath(path)}: {os_error_text(e)}")


def io_error_line(e: OSError) -> str:
    """One line for any OSError: the FileWriteError's message, or ``PATH: what failed``."""
    if isinstance(e, FileWriteError) or not getattr(e, "filename", None):
        return os_error_text(e)
    return f"{os.fspath(e.filename)}: {os_error_text(e)}"


def error_line(e: BaseException) -> str:
    """One line for an error a command reports: ``io_error_line`` for an OSError, else its message's
    first line."""
    if isinstance(e, OSError):
        return io_error_line(e)
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def make_folder(path) -> None:
    """``os.makedirs(path, exist_ok=True)``; a failure is a FileWriteError naming ``path``."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileWriteError(f"cannot use {path} as a folder: it is a file")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise write_error(path, e, "create the folder") from None


# -- locks ----------------------------------------------------------------------------------------
class LockHeld(RuntimeError):
    """Another live process holds the lock (the message names the folder and the holder)."""


class FolderLock:
    """An exclusive ``fcntl.flock`` on the file ``path``, held until ``release()`` or the process
    ends. The kernel drops the lock of a process that dies, however it dies, so a lock file left by
    a dead process is simply taken over. The holder writes ``HOST PID`` into the file, which a
    refused process reports. Lock files are never removed (removing one races with a process that
    has just opened it). Where the file system does not support ``flock`` (Lustre mounted without
    ``flock``) a warning says so and the lock is not held."""

    unsupported_warned = False

    def __init__(self, path):
        self.path = os.fspath(path)
        self.fd = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (True); False if a live process holds it."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise write_error(self.path, e, "create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise write_error(self.path, e, "lock") from None
            if not FolderLock.unsupported_warned:
                FolderLock.unsupported_warned = True
                warnings.warn(f"{self.path}: this file system does not support flock ({os_error_text(e)}); "
                              f"concurrent starts are not detected", stacklevel=2)
            return True
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        except OSError:
            pass    # the lock is held; only the holder's name is missing
        self.fd = fd
        return True

    def holder(self) -> str:
        """``host H pid P`` of the process holding the lock (as it wrote it)."""
        try:
            with open(self.path) as f:
                host, pid = f.read().split()[:2]
            return f"host {host} pid {pid}"
        except (OSError, ValueError):
            return "another process (host and pid not yet written)"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)     # closing the descriptor drops the lock
            self.fd = None


# -- stopping long operations by signal -------------------------------------------------------------
class Interrupted(Exception):
    """A long operation (a frame-cache build) stopped by SIGTERM or SIGINT; what it had written so
    far is removed."""


# callables that say a stop was requested, registered by a caller that takes the stop signals itself
# (``tetsnn train`` blocks them and polls); a long operation consults them with its own flag
stop_checks = []


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGTERM and SIGINT (where they still have their default handling, and in the
    main thread) only set a flag; the block gets a callable that says whether a stop was requested
    (by that flag or by any of ``stop_checks``) and should then raise Interrupted. A signal the block
    did not act on is delivered again after it, with the previous handling."""
    got = []
    previous = {}

    def handle(signum, frame):
        global signals_received
        got.append(signum)
        signals_received += 1

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
                previous[s] = signal.signal(s, handle)
    interrupted = False
    try:
        yield lambda: bool(got) or any(check() for check in stop_checks)
    except Interrupted:
        interrupted = True
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if got and not interrupted:
            signal.raise_signal(got[0])


# -- test hook --------------------------------------------------------------------------------------
# signals the process has received (counted by the stop handlers; read by pause_point) and the function
# that takes pending ones where they are blocked (set by tetsnn train's stop request)
signals_received = 0
poll_signals = None


def pause_point(name: str, index=None) -> None:
    """Test hook. With ``TETSNN_TEST_PAUSE="NAME[@RANK][#INDEX]:SECONDS,..."`` set, the matching rank
    prints ``tetsnn-pause NAME RANK`` to stderr and waits until it receives a signal or SECONDS have
    passed, so a test can deliver a signal inside that moment; SIGCONT ends the wait without asking
    for a stop (``save``: inside a checkpoint write, before the rename, INDEX = ``FILE/EPOCHS``, e.g.
    ``best.pt/2``; ``eval``: before each evaluation batch; ``start``:
    before the first optimizer step; ``step``: after each optimizer step, INDEX = optimizer steps
    since the start of the run; ``cache``: in a frame-cache build, after INDEX recordings are
    written). Only the first attempt of a torchrun job pauses (not the workers it restarts)."""
    spec = os.environ.get("TETSNN_TEST_PAUSE")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank = os.environ.get("RANK", "0")
    for item in spec.split(","):
        where, _, seconds = item.partition(":")
        where, _, at = where.partition("#")
        point, _, only_rank = where.partition("@")
        if point == name and only_rank in ("", rank) and (not at or at == str(index)):
            released = []
            main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGCONT, lambda *a: released.append(1)) if main else None
            try:
                print(f"tetsnn-pause {name} {rank}", file=sys.stderr, flush=True)
                seen, end = signals_received, time.monotonic() + float(seconds or 1)
                while signals_received == seen and not released and time.monotonic() < end:
                    time.sleep(0.01)
                    if poll_signals is not None:
                        poll_signals()
            finally:
                if main:
                    signal.signal(signal.SIGCONT, previous)
