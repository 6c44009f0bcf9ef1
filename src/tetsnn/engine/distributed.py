"""DistributedDataParallel setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

NCCL on GPUs, gloo on the CPU. Without torchrun everything runs in one process (rank 0 of 1).

The threads the process group starts (gloo's I/O and worker threads) are created with the stop
signals blocked, so SIGTERM / SIGINT / SIGUSR1 are always delivered to the main thread: a signal
never interrupts a system call inside a communication thread. Teardown is ordered: ``cleanup()`` waits at a barrier until every rank is done with the process
group before destroying it, so no process tears the group down while a peer still uses it. After a
failed collective (a peer died) ``cleanup(ordered=False)`` skips the barrier.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal

import torch
import torch.distributed as dist

from ..utils import pause_point  # noqa: F401  (the test hook, re-exported for the engine)
from .config import ConfigError

__all__ = ["setup", "cleanup", "is_distributed", "main_process_first", "all_reduce_sum", "all_reduce_max",
           "share", "pause_point"]


def setup(device: str = "auto"):
    """Start the process group when launched by torchrun. Returns ``(rank, world_size, device)``."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"bad value for device: {device!r} (CUDA is not available on this machine)")
        if device == "cuda":
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        with signals_blocked():   # threads started here inherit the mask: only the main thread gets signals
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=_attempt_store(rank, world),
                                    rank=rank, world_size=world)
    return rank, world, torch.device(device)


def _attempt_store(rank: int, world: int):
    """The rendezvous store (MASTER_ADDR:MASTER_PORT), its keys prefixed by torchrun's restart count.

    torchrun's agent keeps one store for all its restarts; without the prefix, the workers of a
    restart can read the addresses the killed workers published and fail to connect to them."""
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None   # another launcher: init_process_group's own env:// handling
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"   # torchrun's agent hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=datetime.timedelta(minutes=30))
    return dist.PrefixStore(f"tetsnn/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@contextlib.contextmanager
def signals_blocked(signals=STOP_SIGNALS):
    """Block ``signals`` in the calling (main) thread for the block; a signal that arrives meanwhile
    stays pending and is handled when the block ends. Threads started inside keep them blocked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (a download, an event-frame cache build); the other ranks wait
    for it and then run the block themselves, finding the work done. An exception of rank 0's block
    (a failed or interrupted build) is raised on every rank."""
    if not is_distributed():
        yield
        return
    first = dist.get_rank() == 0
    error = None
    if first:
        try:
            yield
        except Exception as e:
            error = e
        dist.barrier()
        share(_portable(error))
        if error is not None:
            raise error
        return
    dist.barrier()
    error = share(None)
    if error is not None:
        raise error
    yield


def _portable(error):
    """``error`` if it survives pickling (to send to the other ranks), else a RuntimeError with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(str(error))


def cleanup(ordered: bool = True):
    """Leave the process group: first a barrier (every rank has finished with it), then destroy it."""
    if is_distributed():
        if ordered:
            dist.barrier()
        dist.destroy_process_group()


def share(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable value) on every rank; ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place (a no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
