"""Spiking neurons: the LIF / IF neurons (their surrogate spike functions are in ``tetsnn.surrogate``).

Layout: every spiking tensor is batch-first ``[N, T, ...]`` (dim 1 is time).

LIF dynamics (TET's ``LIFSpike``), with the membrane starting at 0 on every call::

    u[t] = tau * u[t-1] + x[t]          tau is a decay factor (0.5), not a time constant
    s[t] = H(u[t] - threshold)          strict '>': u == threshold does not fire
    u[t] = (1 - s[t]) * u[t]            hard reset (soft: u[t] -= threshold * s[t])

The reset is not detached by default, so gradients flow through ``s[t]``.
"""
from __future__ import annotations

import functools
from typing import Callable, Union

import torch
from torch import nn

from .psn import PSN, SlidingPSN
from .surrogate import (SURROGATES, AtanSpike, CustomSpike, SigmoidSpike, ZIF, atan_grad, atan_spike,
                        resolve_surrogate, sigmoid_grad, sigmoid_spike, zif, zif_grad)

__all__ = [
    "ZIF", "SigmoidSpike", "AtanSpike", "CustomSpike",
    "zif", "sigmoid_spike", "atan_spike",
    "zif_grad", "sigmoid_grad", "atan_grad",
    "SURROGATES", "resolve_surrogate", "lif_loop",
    "LIF", "IF", "ReLUNeuron", "PSN", "SlidingPSN", "make_neuron", "NEURONS",
]


# --------------------------------------------------------------------------- reference dynamics

def lif_loop(x: torch.Tensor, tau: float, threshold: float, spike_fn: Callable,
             reset: str = "hard", detach_reset: bool = False) -> torch.Tensor:
    """The per-step loop over time on ``[N, T, ...]``: the semantic reference of every backend.

    float16 / bfloat16 inputs are integrated in float32; spikes come back in the input's dtype.
    """
    dtype = x.dtype
    xs = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    u = torch.zeros_like(xs[:, 0])
    spikes = []
    for t in range(xs.shape[1]):
        u = tau * u + xs[:, t]
        s = spike_fn(u - threshold)
        r = s.detach() if detach_reset else s
        u = u * (1 - r) if reset == "hard" else u - threshold * r
        spikes.append(s)
    return torch.stack(spikes, dim=1).to(dtype)


# --------------------------------------------------------------------------- modules

class LIF(nn.Module):
    """Leaky integrate-and-fire neuron over batch-first ``[N, T, ...]`` input.

    Stateless between calls: the membrane starts at 0 on every forward.

    Args:
        tau: decay factor of the membrane (u <- tau * u + x). 1.0 gives IF.
        threshold: firing threshold (a membrane exactly at it does not fire).
        gamma: half-width of the ZIF triangle surrogate.
        surrogate: "zif", "sigmoid", "atan", or a callable ``v -> ds/dv``.
        alpha (float | None): width of the sigmoid / atan surrogate (defaults 4.0 / 2.0).
        reset: "hard" (to 0) or "soft" (subtract the threshold).
        detach_reset: stop the gradient through the reset term.
        backend: "loop" (the per-step reference), "fused" (one kernel call per direction, CPU or GPU),
            "triton" (a Triton kernel; built-in surrogates only) or "auto": "triton" on CUDA when
            triton is installed and the surrogate is built in, "fused" otherwise.
    """

    backends = {"loop", "fused", "triton"}

    def __init__(self, tau: float = 0.5, threshold: float = 1.0, gamma: float = 1.0,
                 surrogate: Union[str, Callable] = "zif", alpha=None, reset: str = "hard",
                 detach_reset: bool = False, backend: str = "auto"):
        super().__init__()
        if reset not in ("hard", "soft"):
            raise ValueError(f"unknown reset {reset!r}: expected 'hard' or 'soft'")
        if backend != "auto" and backend not in self.backends:
            raise ValueError(f"unknown backend {backend!r}: expected 'auto' or one of {sorted(self.backends)}")
        self.tau = float(tau)
        self.threshold = float(threshold)
        self.reset = reset
        self.detach_reset = bool(detach_reset)
        self.backend = backend
        self.surrogate = surrogate
        self.surrogate_name, self.width, self.spike_fn, self.grad_fn = resolve_surrogate(surrogate, gamma, alpha)
        if backend == "triton" and callable(surrogate):
            raise ValueError("backend 'triton' supports the surrogates 'zif', 'sigmoid' and 'atan', not a "
                             "callable; use backend='fused' or 'loop'")

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, threshold={self.threshold}, surrogate={self.surrogate_name}, "
                f"width={self.width}, reset={self.reset}, detach_reset={self.detach_reset}, backend={self.backend}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects batch-first input [N, T, ...] with at least 2 dims, "
                             f"got shape {tuple(x.shape)}")
        backend = self.resolve_backend(x)
        if backend == "loop":
            return lif_loop(x, self.tau, self.threshold, self.spike_fn, self.reset, self.detach_reset)
        from .kernels.fused import lif_fused
        surrogate = self.surrogate if callable(self.surrogate) else self.surrogate_name
        return lif_fused(x, self.tau, self.threshold, self.reset, self.detach_reset, surrogate,
                         self.width or 1.0, kernel=backend)

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend that runs on ``x``: ``self.backend``, with "auto" made concrete."""
        if self.backend != "auto":
            return self.backend
        if x.is_cuda and not callable(self.surrogate) and _has_triton():
            return "triton"
        return "fused"


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class IF(LIF):
    """Integrate-and-fire neuron: LIF without leak (tau = 1), as used by SEW-ResNet."""

    def __init__(self, threshold: float = 1.0, gamma: float = 1.0, surrogate="zif", alpha=None,
                 reset: str = "hard", detach_reset: bool = False, backend: str = "auto"):
        super().__init__(1.0, threshold, gamma, surrogate, alpha, reset, detach_reset, backend)


class ReLUNeuron(nn.Module):
    """ReLU in the place of a spiking neuron: turns a model into its ANN twin."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


NEURONS = {"lif": LIF, "if": IF, "relu": ReLUNeuron, "psn": PSN, "sliding_psn": SlidingPSN}


def make_neuron(neuron: str = "lif", T: int = None, **kw) -> nn.Module:
    """Build a neuron by name ("lif", "if", "relu", "psn" or "sliding_psn"); keyword arguments go to the
    spiking ones. ``T``, the model's number of time steps, is read by "psn" only."""
    if neuron not in NEURONS:
        raise ValueError(f"unknown neuron {neuron!r}: expected one of {sorted(NEURONS)}")
    if neuron == "relu":
        return ReLUNeuron()
    if neuron == "if":
        kw.pop("tau", None)
    if neuron == "psn":
        if T is None:
            raise ValueError("neuron 'psn' needs the number of time steps T")
        return PSN(T, **kw)
    if neuron == "sliding_psn" and "order" not in kw:
        raise ValueError("neuron 'sliding_psn' needs its order k (model_kw {order: K})")
    return NEURONS[neuron](**kw)
