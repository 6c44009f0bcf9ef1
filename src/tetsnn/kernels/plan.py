"""The path planner: which implementation runs a neuron on an input, with or without the BatchNorm
before it fused in. Every caller (the neuron modules, the layers, the models' blocks) asks
:func:`plan`; the table is documented in docs/kernels.md.
"""
from __future__ import annotations

import enum
import functools
from typing import Optional

import torch
from torch import Tensor, nn

from ..neuron.spec import NeuronSpec
from . import psn_numba
from .ops import numba_applies

__all__ = ["Path", "plan", "resolve_backend", "BACKENDS", "has_triton", "bn_fusable"]

BACKENDS = ("auto", "loop", "fused", "triton")


class Path(enum.Enum):
    """A named execution path; ``kernel`` is what the custom ops are told ("loop", "fused", "triton")."""

    LOOP = "loop"            # the per-step loop under autograd: the reference (backend="loop")
    CUSTOM = "custom"        # graph-free torch ops with a user-callable surrogate
    NUMBA = "numba"          # numba kernels, one pass per direction (CPU float32 / float64)
    TORCH_OPS = "torch_ops"  # the same recurrence in torch ops (no numba, or not CPU float32/64 after casting)
    TRITON = "triton"        # Triton kernels (CUDA, or the interpreter)
    BN_NUMBA = "bn_numba"    # BatchNorm fused: torch's batch_norm + numba forward; backward rebuilds BN(y) in numba
    BN_TORCH = "bn_torch"    # BatchNorm fused: torch's batch_norm + torch-op neuron; backward re-runs batch_norm
    BN_TRITON = "bn_triton"  # BatchNorm fused into the Triton kernels: BN(y) never written
    PSN_NUMBA = "psn_numba"  # a parallel neuron: the mix over time and the spike in one numba kernel per direction
    PSN_TORCH = "psn_torch"  # a parallel neuron: one batched matmul and torch ops per direction

    @property
    def kernel(self) -> str:
        if self is Path.LOOP:
            return "loop"
        return "triton" if self in (Path.TRITON, Path.BN_TRITON) else "fused"

    @property
    def fuses_bn(self) -> bool:
        return self in (Path.BN_NUMBA, Path.BN_TORCH, Path.BN_TRITON)


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(spec: NeuronSpec, x: Tensor, backend: str = "auto") -> str:
    """``backend`` made concrete: "auto" is "triton" on CUDA when triton imports and the surrogate is
    built in, "fused" otherwise."""
    if backend != "auto":
        return backend
    if x.is_cuda and spec.builtin_surrogate and has_triton():
        return "triton"
    return "fused"


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_fusable(bn: nn.Module, spec: NeuronSpec, backend: str) -> bool:
    """Whether ``bn`` can run inside the neuron: a plain ``nn.BatchNorm1d/2d/3d`` (not SyncBatchNorm, whose
    statistics are gathered across processes), or a subclass that declares ``fusable_batchnorm = True``
    (its forward is BatchNorm's, as :class:`tetsnn.tdBN`'s), in training with gradients enabled, before a neuron
    (binary or ILIF's counts, fixed or learnable decay) with a built-in surrogate on a fused backend."""
    plain = type(bn) in _BATCHNORMS or getattr(type(bn), "fusable_batchnorm", False)
    return (plain and bn.training and torch.is_grad_enabled() and spec.builtin_surrogate
            and backend != "loop")


def plan(spec: NeuronSpec, x: Tensor, bn: Optional[nn.Module] = None, backend: str = "auto") -> Path:
    """The path that runs ``spec`` on ``x`` (the neuron's input, or the conv output a fused BatchNorm
    normalises), with the module's ``backend`` setting; ``bn`` the BatchNorm before the neuron, offered
    for fusion (the caller has checked that no hook needs to see the modules run)."""
    if spec.dynamics == "psn":   # no recurrence: never Triton, never a fused BatchNorm
        if backend == "loop":
            return Path.LOOP
        return Path.PSN_NUMBA if psn_numba.applies(x, spec.surrogate) else Path.PSN_TORCH
    b = resolve_backend(spec, x, backend)
    if b == "loop":
        return Path.LOOP
    if bn is not None and bn_fusable(bn, spec, b):
        if b == "triton":
            return Path.BN_TRITON
        return Path.BN_NUMBA if numba_applies(_compute(x)) else Path.BN_TORCH
    if b == "triton":
        return Path.TRITON
    if not spec.builtin_surrogate:
        return Path.CUSTOM
    return Path.NUMBA if numba_applies(_compute(x)) else Path.TORCH_OPS


def _compute(x: Tensor) -> Tensor:
    """A tensor of the dtype the kernels compute ``x`` in (half precision in float32)."""
    return x.new_empty(0, dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
