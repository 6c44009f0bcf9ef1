"""Layout helpers and the small layers the models are built from."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .compact import spike_conv2d
from .kernels.ops import bn_neuron
from .kernels.plan import Path, plan
from .memory import check_memory, replaying, run_block
from .neuron import make_neuron, resolve_surrogate, spike_levels
from .norm import make_norm

__all__ = ["SeqToANNContainer", "ConvBN", "Layer", "ConvBNSpike", "Threshold", "add_time_dim", "to_time_first",
           "to_batch_first", "check_T", "fuses_bn", "conv_bn_spike", "bn_path", "bn_spikes", "per_step"]


def check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")
    return T


def add_time_dim(x: torch.Tensor, T: int) -> torch.Tensor:
    """Repeat a static batch ``[N, ...]`` T times along a new dim 1: ``[N, T, ...]`` (a new tensor)."""
    check_T(T)
    if x.dim() < 1:
        raise ValueError("add_time_dim expects a batch [N, ...], got a scalar")
    return x.unsqueeze(1).repeat(1, T, *([1] * (x.dim() - 1)))


def to_time_first(x: torch.Tensor) -> torch.Tensor:
    """``[N, T, ...]`` -> ``[T, N, ...]`` (the SpikingJelly / Norse layout), contiguous."""
    if x.dim() < 2:
        raise ValueError(f"to_time_first expects [N, T, ...], got shape {tuple(x.shape)}")
    return x.transpose(0, 1).contiguous()


def to_batch_first(x: torch.Tensor) -> torch.Tensor:
    """``[T, N, ...]`` -> ``[N, T, ...]``, contiguous."""
    if x.dim() < 2:
        raise ValueError(f"to_batch_first expects [T, N, ...], got shape {tuple(x.shape)}")
    return x.transpose(0, 1).contiguous()


class SeqToANNContainer(nn.Module):
    """Apply ordinary layers to every time step at once: ``[N, T, ...]`` -> ``[N*T, ...]`` -> back.

    BatchNorm inside it therefore pools its statistics over batch and time.
    """

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.module = modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"SeqToANNContainer expects [N, T, ...] with at least 3 dims, got shape {tuple(x.shape)}")
        n, t = x.shape[:2]
        y = self.module(x.flatten(0, 1))
        return y.view(n, t, *y.shape[1:])


class ConvBN(SeqToANNContainer):
    """``SeqToANNContainer(conv, batchnorm)`` with the two named: ``.conv`` and ``.bn`` (the children stay
    ``module.0`` / ``module.1``, so state_dict keys are those of the plain container)."""

    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__(conv, bn)

    @property
    def conv(self) -> nn.Module:
        return self.module[0]

    @property
    def bn(self) -> nn.Module:
        return self.module[1]


class Threshold(nn.Module):
    """A stateless spike ``s = H(x - threshold)`` (NIR's Threshold node), with a surrogate gradient
    as the neurons have (``surrogate``, ``gamma``, ``alpha`` as in :class:`tetsnn.LIF`)."""

    def __init__(self, threshold: float = 0.0, surrogate="zif", gamma: float = 1.0, alpha=None):
        super().__init__()
        self.threshold = float(threshold)
        self.spike_fn = resolve_surrogate(surrogate, gamma, alpha)[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spike_fn(x - self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


# --------------------------------------------------------------------------- BatchNorm fused into the neuron

_warned_sync_bn = False


def fuses_bn(bn: nn.Module, neuron: nn.Module, fuse_bn: bool = True, x: Optional[torch.Tensor] = None) -> bool:
    """Whether ``neuron(bn(...))`` runs as one fused op (:func:`tetsnn.kernels.ops.bn_neuron`) on input ``x``:
    the planner's decision (:func:`tetsnn.kernels.plan.plan`) for the neuron's spec, where ``fuse_bn`` is on
    and no forward hook on either module needs to see it run (eval and no-grad run the modules as they are).
    A ``SyncBatchNorm`` runs unfused: its statistics are gathered across processes; it says so once.
    """
    return bn_path(bn, neuron, fuse_bn, x).fuses_bn


def bn_path(bn: nn.Module, neuron: nn.Module, fuse_bn: bool = True, x: Optional[torch.Tensor] = None) -> Path:
    """The planner's path for ``neuron(bn(...))`` on ``x`` (see :func:`fuses_bn`); ``path.fuses_bn`` says
    whether the BatchNorm runs inside the neuron."""
    if not (fuse_bn and bn.training and torch.is_grad_enabled()) or _hooked(bn) or _hooked(neuron):
        return Path.LOOP   # not fused (eval and no-grad run the modules as they are)
    spec = getattr(neuron, "spec", None)   # a ReLU twin has none
    if spec is None:
        return Path.LOOP
    if isinstance(bn, nn.SyncBatchNorm):
        global _warned_sync_bn
        if not _warned_sync_bn:
            _warned_sync_bn = True
            warnings.warn("SyncBatchNorm layers run unfused from their neuron (their statistics are gathered "
                          "across processes), keeping the normalised input for backward", RuntimeWarning,
                          stacklevel=4)
        return Path.LOOP
    weight = getattr(bn, "weight", None)   # a normalisation that is no BatchNorm (TEBN) may have none
    probe = x if x is not None else (weight if weight is not None else torch.empty(0))
    return plan(spec, probe, bn, neuron.backend)


def bn_spikes(path: Path, y: torch.Tensor, bn: nn.Module, neuron: nn.Module, T: int, output_unused: bool = False,
              **residual) -> torch.Tensor:
    """Spikes of ``neuron(bn(y))`` by the fused ``path`` (``residual``: ``residual=`` spikes, or ``y2=`` and
    ``bn2=`` a downsample branch's conv output and BatchNorm). ``output_unused``: the spikes are a block's
    output, which a ``memory="min"`` recompute discards; there it saves for backward and computes nothing
    (:func:`tetsnn.memory.replaying`)."""
    return bn_neuron(y, bn, neuron.spec, path.kernel, T, neuron.decay_tensor(),
                     saved_only=output_unused and replaying(), packing=getattr(neuron, "packing", None), **residual)


def _hooked(m: nn.Module) -> bool:
    """Whether a forward hook would see ``m`` run (its own hooks or global module hooks)."""
    from torch.nn.modules import module as mod
    return bool(m._forward_hooks or m._forward_pre_hooks or mod._global_forward_hooks
                or mod._global_forward_pre_hooks)


def per_step(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` on the ``[N*T, ...]`` batch of ``[N, T, ...]`` input (the result stays flattened)."""
    return module(x.flatten(0, 1))


def conv_bn_spike(seq: SeqToANNContainer, neuron: nn.Module, x: torch.Tensor, fuse_bn: bool = True,
                  output_unused: bool = False) -> torch.Tensor:
    """``neuron(seq(x))`` for ``seq = SeqToANNContainer(conv, batchnorm)``; the BatchNorm runs inside the
    neuron (keeping only the conv output for backward) where :func:`fuses_bn` allows. ``output_unused``:
    the spikes are a block's output (see :func:`bn_spikes`)."""
    conv, bn = seq.module
    path = bn_path(bn, neuron, fuse_bn, x)
    if path.fuses_bn:
        return bn_spikes(path, per_step(conv, x), bn, neuron, x.shape[1], output_unused)
    return neuron(seq(x))


class Layer(nn.Module):
    """Conv2d (with bias) + BatchNorm2d applied per step, then a spiking neuron.

    ``norm`` picks the normalisation ("bn", "tebn" or "tdbn", :func:`tetsnn.norm.make_norm`); ``T``, the
    number of time steps, is needed by "tebn" and the neuron "psn".
    ``spikes=True`` declares that the input is 0/1 spikes: with a spiking ``neuron`` the conv then
    keeps it for backward as packed bits (:class:`tetsnn.compact.SpikeConv2d`).
    ``fuse_bn`` runs the BatchNorm inside the neuron in training (:func:`conv_bn_spike`).
    ``memory="min"`` keeps only the input (as bits with ``spikes=True``) and the BatchNorm batch statistics
    for backward and recomputes the layer there (:mod:`tetsnn.memory`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, neuron: str = "lif", spikes: bool = False, fuse_bn: bool = True,
                 norm: str = "bn", T: int = None, memory: str = "default", **neuron_kw):
        super().__init__()
        self.memory = check_memory(memory)
        self.in_levels = spike_levels(neuron, **neuron_kw) if spikes else 0   # what the input holds
        self.out_levels = spike_levels(neuron, **neuron_kw)
        self.fwd = ConvBN(
            spike_conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=True,
                         spikes=spike_levels(neuron, **neuron_kw) if spikes else 0),
            make_norm(norm, out_channels, T, neuron_kw.get("threshold", 1.0)),
        )
        self.act = make_neuron(neuron, T=T, **neuron_kw)
        self.fuse_bn = fuse_bn

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_spike(self.fwd, self.act, x, self.fuse_bn, output_unused=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_block(self.block, x, self.in_levels, self.memory, (self,))


class ConvBNSpike(nn.Sequential):
    """``nn.Sequential(SeqToANNContainer(conv, batchnorm), neuron, *more)`` whose first two run through
    :func:`conv_bn_spike` (same children and state_dict keys as the plain ``nn.Sequential``);
    ``memory="min"`` recomputes it in backward from its input (kept as it is; :mod:`tetsnn.memory`)."""

    def __init__(self, *modules: nn.Module, fuse_bn: bool = True, memory: str = "default"):
        super().__init__(*modules)
        self.fuse_bn = fuse_bn
        self.memory = check_memory(memory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_block(self.block, x, 0, self.memory, (self,))

    def block(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_bn_spike(self[0], self[1], x, self.fuse_bn, output_unused=len(self) == 2)
        for m in list(self)[2:]:
            x = m(x)
        return x
