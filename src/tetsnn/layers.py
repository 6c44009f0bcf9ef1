"""Layout helpers and the small layers the models are built from."""
from __future__ import annotations

import torch
from torch import nn

from .kernels.compact import spike_conv2d
from .neuron import make_neuron, resolve_surrogate

__all__ = ["SeqToANNContainer", "Layer", "Threshold", "add_time_dim", "to_time_first", "to_batch_first", "check_T"]


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


class Layer(nn.Module):
    """Conv2d (with bias) + BatchNorm2d applied per step, then a spiking neuron.

    ``spikes=True`` declares that the input is 0/1 spikes: with a spiking ``neuron`` the conv then
    keeps it for backward as packed bits (:class:`tetsnn.kernels.compact.SpikeConv2d`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, neuron: str = "lif", spikes: bool = False, **neuron_kw):
        super().__init__()
        self.fwd = SeqToANNContainer(
            spike_conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=True,
                         spikes=spikes and neuron != "relu"),
            nn.BatchNorm2d(out_channels),
        )
        self.act = make_neuron(neuron, **neuron_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fwd(x))
