"""``memory="min"``: spiking blocks that keep only their input for backward and recompute the rest.

A spiking block is conv/linear -> BatchNorm -> neuron (a :class:`tetsnn.Layer`, a ResNet or SEW block with
its residual add and downsample branch, a stem). With ``memory="min"``, in training with gradients,
:func:`run_block` runs the block's forward as usual (the same kernels, so the same outputs), but of the
tensors its operations save for backward it keeps only

- the block's input: as packed bits (``ceil(log2(levels + 1))`` bit planes) when the input is spikes, as
  it is otherwise (the first layer's images or event frames);
- the small ones: the BatchNorm batch statistics (per-channel mean and inverse std), a learnable decay,
  the parameters (which the model holds anyway).

Every other saved tensor (conv outputs, normalised inputs, spike bits of inner neurons, ...) is dropped.
When backward first needs one of them, the block's forward runs again from the rebuilt input, with
gradients enabled, under the same autocast state, and with the BatchNorm running statistics swapped
for copies (so they are updated exactly once, by the first forward). The recompute reads the same
input with the same deterministic kernels, so every tensor it saves is bit-identical to the one the
first forward saved, and backward, which reads the kept batch statistics and the recomputed
activations through the unchanged autograd graph, gives the default mode's gradients bit for bit.

The recompute computes only what backward reads (:func:`replaying`): the fused BatchNorm-neuron op that
forms the block's output saves its tensors without computing (the kept statistics serve backward), and
a rebuilt spike input hands the kept bits to the operations that pack it, with no second 0/1 check.

Evaluation and no-grad forwards run the block as it is (no hooks, nothing kept). Under
``torch.compile`` the graph is traced as in the default mode (docs/decisions.md).
"""
from __future__ import annotations

import gc
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .compact import pack_levels, unpack_levels
from .kernels.ops import pack_once, remember_packing

__all__ = ["MEMORY", "check_memory", "recomputes", "replaying", "run_block", "run_sequence", "kept_tensors"]

MEMORY = ("default", "min")

_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def check_memory(memory) -> str:
    """``memory`` if it is one of :data:`MEMORY`, else a one-line ValueError."""
    if memory not in MEMORY:
        raise ValueError(f"unknown memory {memory!r}: expected one of {list(MEMORY)}")
    return memory


def recomputes(memory: str, module: Optional[nn.Module] = None) -> bool:
    """Whether a block built with ``memory`` recomputes in this forward: ``"min"``, in training (``module``),
    gradients enabled, and eager (a compiled graph is traced as in the default mode)."""
    return (memory == "min" and torch.is_grad_enabled() and (module is None or module.training)
            and not torch.compiler.is_compiling())


_replaying = False   # inside a block's recompute (and not inside a block nested in it)


def replaying() -> bool:
    """Whether this forward is a ``memory="min"`` recompute of a block, whose output is discarded: an
    operation that forms the block's output may save what it saves for backward and skip the rest
    (``output_unused`` of :func:`tetsnn.layers.conv_bn_spike`). A block nested in it (run by
    :func:`run_block` without recomputing) is not replaying: its output is an operand of its caller."""
    return _replaying


class _replay:
    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        global _replaying
        self.before, _replaying = _replaying, self.on

    def __exit__(self, *exc):
        global _replaying
        _replaying = self.before


class _Block:
    """One block forward's state for backward: the kept input and small tensors, and the recompute."""

    def __init__(self, fn: Callable, modules: Sequence[nn.Module], x: Tensor, levels: int, made: bool = False):
        self.fn, self.modules = fn, tuple(modules)
        self.levels = levels
        self.meta = (list(x.shape), x.dtype)
        self.channels_last = not x.is_contiguous() and x.dim() == 4 and \
            x.is_contiguous(memory_format=torch.channels_last)
        self.requires_grad = x.requires_grad
        if levels < 0:
            levels = self.levels = _count_levels(x)
        if levels:
            with torch.no_grad():   # x itself (not a detached alias): the block's spike-fed ops reuse the bits
                self.input = (pack_once(x, checked=False),) if made and levels == 1 else \
                    pack_levels(x, levels)   # bit planes
            self.storage = None
        else:
            self.input = x.detach()
            self.storage = x.untyped_storage().data_ptr()
        self.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]
        self.kept: List[Optional[Tensor]] = []
        self.recomputed: Optional[List[Optional[Tensor]]] = None

    # -- the first forward's hooks
    def pack(self, t: Tensor) -> int:
        keep = isinstance(t, nn.Parameter) or (t.is_floating_point() and t.dim() <= 1) or (
            self.storage is not None and t.untyped_storage().data_ptr() == self.storage)
        # detached: a kept output of an operation in the block would otherwise hold its own graph node
        # (through these hooks) in a reference cycle
        self.kept.append((t if isinstance(t, nn.Parameter) else t.detach()) if keep else None)
        return len(self.kept) - 1

    def unpack(self, i: int) -> Tensor:
        t = self.kept[i]
        if t is not None:
            return t
        if self.recomputed is None or self.recomputed[i] is None:   # first use (or a second backward)
            self.recomputed = self._recompute()
        t, self.recomputed[i] = self.recomputed[i], None   # freed as backward goes
        return t

    # -- backward
    def _input(self) -> Tensor:
        if not self.levels:
            return self.input
        x = unpack_levels(self.input, *self.meta)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _recompute(self) -> List[Optional[Tensor]]:
        x = self._input().detach().requires_grad_(self.requires_grad)
        if self.levels == 1:   # 0/1 spikes: an op that packs x gets the kept bits, unchecked
            remember_packing(x, self.input[0])
        saved: List[Optional[Tensor]] = []

        kept = self.kept   # (not self: the recompute's graph holds this hook, which must not hold the block)

        def record(t):
            # what the first forward kept is read from there: free the recomputed twin at once; the rest
            # detached, so that it does not hold the recompute's graph (and this hook) in a cycle
            i = len(saved)
            saved.append(None if i < len(kept) and kept[i] is not None else t.detach())
            return i

        with torch.enable_grad(), _copied_running_stats(self.modules), _replay(True), \
                torch.autograd.graph.saved_tensors_hooks(record, saved.__getitem__), _autocast(self.autocast):
            self.fn(x)
        if len(saved) != len(self.kept):
            raise RuntimeError(f"memory='min': a block's recompute saved {len(saved)} tensors for backward where "
                               f"its forward saved {len(self.kept)}; the block must run the same operations again")
        return saved


class _autocast:
    """Re-enter the autocast state of the first forward (cpu and cuda)."""

    def __init__(self, states):
        self.contexts = [torch.autocast(d, dtype=dt, enabled=on) for d, on, dt in states
                         if on or torch.is_autocast_enabled(d)]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


class _copied_running_stats:
    """The BatchNorm running statistics (and batch counters) of ``modules`` replaced by copies: the
    recompute updates the copies, the module keeps the first forward's update."""

    def __init__(self, modules):
        self.bns = [m for mod in modules for m in mod.modules() if isinstance(m, _BatchNorm)]
        self.saved = []

    def __enter__(self):
        for bn in self.bns:
            old = {k: bn._buffers.get(k) for k in _RUNNING}
            self.saved.append(old)
            for k, v in old.items():
                if v is not None:
                    bn._buffers[k] = v.clone()

    def __exit__(self, *exc):
        for bn, old in zip(self.bns, self.saved):
            for k, v in old.items():
                if v is not None:
                    bn._buffers[k] = v
        self.saved = []


def _count_levels(x: Tensor) -> int:
    """The largest value of ``x`` where it holds non-negative integer counts (a SEW ``ADD`` join of
    spikes), else 0 (kept as it is)."""
    v = x.detach()
    if v.numel() == 0 or not bool(((v == v.round()) & (v >= 0)).all()):
        return 0
    return max(1, int(v.max()))


def run_block(fn: Callable[[Tensor], Tensor], x: Tensor, levels: int, memory: str,
              modules: Sequence[nn.Module], made: bool = False) -> Tensor:
    """``fn(x)``, a spiking block made of ``modules``; with ``memory="min"`` (in training with gradients)
    it keeps only ``x`` and the small saved tensors, and recomputes the rest in backward (see the module
    docstring). ``levels``: 0 keeps ``x`` as it is; ``L > 0`` declares spike counts 0..L, kept as
    ``ceil(log2(L + 1))`` bit planes; -1 declares non-negative integer counts whose bound this batch
    tells (a SEW ``ADD`` join), kept as bit planes when they are (as it is otherwise). ``made``: ``x`` is a
    spiking layer's output, 0/1 by construction, so ``levels=1`` packs it without checking it."""
    if _replaying:   # nested in a recompute: this block's output is an operand of its caller
        with _replay(False):
            return run_block(fn, x, levels, memory, modules, made)
    if not recomputes(memory, modules[0] if modules else None):
        return fn(x)
    block = _Block(fn, modules, x, levels, made)
    with torch.autograd.graph.saved_tensors_hooks(block.pack, block.unpack):
        return fn(x)


def run_sequence(seq: nn.Sequential, x: Tensor) -> Tensor:
    """``seq(x)`` for a sequence of spiking layers (modules with ``block``, ``in_levels``, ``out_levels``
    and ``memory``) and parameter-free modules between them (pooling). A spiking layer runs as one
    block (:func:`run_block`) together with the pooling before it, so that the block keeps the spikes
    of the layer before as bits rather than their pooled values."""
    pending: List[nn.Module] = []   # parameter-free modules after spikes, waiting for the next layer
    levels = 0                      # the spike levels of x before ``pending``
    for m in seq:
        if hasattr(m, "block") and hasattr(m, "in_levels"):
            if pending and levels and m.memory == "min":
                pre = tuple(pending)
                # x is the spikes of the layer before, made by its neuron: packed without a check
                x = run_block(lambda v, pre=pre, m=m: m.block(_chain(pre, v)), x, levels, m.memory, (m,), made=True)
            else:
                x = m(_chain(pending, x))
            pending, levels = [], m.out_levels
        elif levels and not any(True for _ in m.parameters()):
            pending.append(m)
        else:
            x, pending, levels = m(_chain(pending, x)), [], 0
    return _chain(pending, x)


def kept_tensors() -> Iterator[Tensor]:
    """The tensors the live ``memory="min"`` block forwards keep for backward (their inputs or input bits
    and the small saved tensors), which hooks outside the blocks do not see: for measuring memory."""
    for obj in gc.get_objects():
        if type(obj) is _Block:
            yield from (t for t in obj.kept if t is not None)
            yield from obj.input if isinstance(obj.input, tuple) else (obj.input,)


def _chain(modules, x):
    for m in modules:
        x = m(x)
    return x
