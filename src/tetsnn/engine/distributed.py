"""DistributedDataParallel setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

NCCL on GPUs, gloo on the CPU. Without torchrun everything runs in one process (rank 0 of 1).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = ["setup", "cleanup", "is_distributed", "main_process_first", "all_reduce_sum", "all_reduce_max"]


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
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (a download, an event-frame cache build); the other ranks wait
    for it and then run the block themselves, finding the work done."""
    first = not is_distributed() or dist.get_rank() == 0
    if not first:
        dist.barrier()
    yield
    if first and is_distributed():
        dist.barrier()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place (a no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
