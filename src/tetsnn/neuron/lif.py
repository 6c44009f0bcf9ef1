"""Spiking neurons with a membrane recurrence: LIF, IF (their surrogate spike functions are in
``tetsnn.surrogate``), and the per-step loop that is the reference of every kernel.

Layout: every spiking tensor is batch-first ``[N, T, ...]`` (dim 1 is time).

LIF dynamics (TET's ``LIFSpike``), with the membrane starting at 0 on every call::

    u[t] = tau * u[t-1] + x[t]          tau is a decay factor (0.5), not a time constant
    s[t] = H(u[t] - threshold)          strict '>': u == threshold does not fire
    u[t] = (1 - s[t]) * u[t]            hard reset (soft: u[t] -= threshold * s[t])

The reset is not detached by default, so gradients flow through ``s[t]``. Each module describes
itself as a :class:`~tetsnn.neuron.spec.NeuronSpec` (``module.spec``); :func:`tetsnn.kernels.plan.plan`
picks the path that runs it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..kernels.ops import SpikePacking, neuron_spikes
from ..kernels.plan import BACKENDS, Path, plan, resolve_backend
from ..kernels.torch_kernels import charge, fire, reset
from ..surrogate import resolve_surrogate
from .spec import NeuronSpec

__all__ = ["lif_loop", "SpikingNeuron", "LIF", "PLIF", "IF", "ILIF", "ReLUNeuron"]


# --------------------------------------------------------------------------- reference dynamics

def lif_loop(x: torch.Tensor, spec: NeuronSpec, spike_fn: Optional[Callable] = None,
             decay: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-step loop over time on ``[N, T, ...]`` under autograd: the semantic reference of every
    kernel. ``spike_fn(v)`` is the spike with its surrogate; ``decay`` a learnable decay (0-dim tensor).

    float16 / bfloat16 inputs are integrated in float32; spikes come back in the input's dtype.
    """
    dtype = x.dtype
    xs = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    d = spec.decay if decay is None else decay
    u = torch.zeros_like(xs[:, 0])
    spikes = []
    for t in range(xs.shape[1]):
        h = charge(spec, d, u, xs[:, t])
        s = fire(spec, h, spike_fn)
        u = reset(spec, h, s)
        spikes.append(s)
    return torch.stack(spikes, dim=1).to(dtype)


# --------------------------------------------------------------------------- modules

class SpikingNeuron(nn.Module):
    """Base of the neurons that run through the kernels: subclasses describe themselves by
    :attr:`spec` (and a learnable decay by :meth:`decay_tensor`); ``forward`` asks the planner for the
    path and runs it."""

    backends = set(BACKENDS) - {"auto"}
    spike_fn: Optional[Callable] = None

    def __init__(self):
        super().__init__()
        # whether the kernel packs the spikes to bits as it writes them: on once a spike-fed layer asks
        self.packing = SpikePacking()

    def _check_backend(self, backend: str) -> None:
        if backend != "auto" and backend not in self.backends:
            raise ValueError(f"unknown backend {backend!r}: expected 'auto' or one of {sorted(self.backends)}")

    @property
    def spec(self) -> NeuronSpec:
        raise NotImplementedError

    def decay_tensor(self) -> Optional[torch.Tensor]:
        """A learnable decay as a 0-dim tensor (in the autograd graph), or None for a fixed one."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects batch-first input [N, T, ...] with at least 2 dims, "
                             f"got shape {tuple(x.shape)}")
        spec = self.spec
        path = plan(spec, x, backend=self.backend)
        if path is Path.LOOP:
            return lif_loop(x, spec, self.spike_fn, self.decay_tensor())
        return neuron_spikes(x, spec, path.kernel, self.decay_tensor(), self.packing)

    def path(self, x: torch.Tensor, bn: Optional[nn.Module] = None) -> Path:
        """The :class:`~tetsnn.kernels.plan.Path` that runs on ``x`` (with ``bn`` offered for fusion)."""
        return plan(self.spec, x, bn, self.backend)

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend that runs on ``x``: ``self.backend``, with "auto" made concrete."""
        return resolve_backend(self.spec, x, self.backend)


class LIF(SpikingNeuron):
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
        decay_input: charge ``u <- tau * u + (1 - tau) * x`` (SpikingJelly's default form, whose
            ``tau`` is ``1 / (1 - tau)`` here).
    """

    backends = set(BACKENDS) - {"auto"}

    def __init__(self, tau: float = 0.5, threshold: float = 1.0, gamma: float = 1.0,
                 surrogate: Union[str, Callable] = "zif", alpha=None, reset: str = "hard",
                 detach_reset: bool = False, backend: str = "auto", decay_input: bool = False):
        super().__init__()
        if reset not in ("hard", "soft"):
            raise ValueError(f"unknown reset {reset!r}: expected 'hard' or 'soft'")
        self._check_backend(backend)
        self.tau = float(tau)
        self.threshold = float(threshold)
        self.reset = reset
        self.detach_reset = bool(detach_reset)
        self.decay_input = bool(decay_input)
        self.backend = backend
        self.surrogate = surrogate
        self.surrogate_name, self.width, self.spike_fn, self.grad_fn = resolve_surrogate(surrogate, gamma, alpha)
        if backend == "triton" and callable(surrogate):
            raise ValueError("backend 'triton' supports the surrogates 'zif', 'sigmoid' and 'atan', not a "
                             "callable; use backend='fused' or 'loop'")

    @property
    def spec(self) -> NeuronSpec:
        return NeuronSpec(decay=self.tau, decay_input=self.decay_input, threshold=self.threshold,
                          reset=self.reset, detach_reset=self.detach_reset,
                          surrogate=self.surrogate if callable(self.surrogate) else self.surrogate_name,
                          width=self.width or 1.0)

    def extra_repr(self) -> str:
        text = (f"tau={self.tau}, threshold={self.threshold}, surrogate={self.surrogate_name}, "
                f"width={self.width}, reset={self.reset}, detach_reset={self.detach_reset}, backend={self.backend}")
        return text + (", decay_input=True" if self.decay_input else "")


class PLIF(LIF):
    """LIF with one learnable decay per layer (PLIF, Fang et al. ICCV 2021), parameterised as
    SpikingJelly's ``ParametricLIFNode``: a weight ``w`` with ``1 - decay = sigmoid(w)``.

    ``tau`` is the initial decay factor, as for :class:`LIF`: ``PLIF(tau=0.5)`` starts where
    ``ParametricLIFNode(init_tau=2.0)`` does (``w = -log(init_tau - 1)``, ``init_tau = 1 / (1 - tau)``).
    Reading ``tau`` gives the current decay; assigning it re-initialises ``w``. The default charge is
    TET's (``decay_input=False``); every other argument is :class:`LIF`'s. The kernels' backward
    accumulates dL/d decay, and autograd carries it to ``w``.
    """

    def __init__(self, tau: float = 0.5, threshold: float = 1.0, gamma: float = 1.0,
                 surrogate: Union[str, Callable] = "zif", alpha=None, reset: str = "hard",
                 detach_reset: bool = False, backend: str = "auto", decay_input: bool = False):
        super().__init__(tau, threshold, gamma, surrogate, alpha, reset, detach_reset, backend, decay_input)

    @property
    def tau(self) -> float:
        return float(1 - torch.sigmoid(self.w.detach().double()))

    @tau.setter
    def tau(self, value: float) -> None:
        value = float(value)
        if not 0 < value < 1:
            raise ValueError(f"PLIF needs an initial decay tau in (0, 1), got {value}")
        w = -math.log(1 / (1 - value) - 1)
        if "w" in self._parameters:
            with torch.no_grad():
                self.w.fill_(w)
        else:
            self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.get_default_dtype()))

    def decay_tensor(self) -> torch.Tensor:
        return 1 - torch.sigmoid(self.w)

    @property
    def spec(self) -> NeuronSpec:
        return super().spec.replace(learnable_decay=True)


class IF(LIF):
    """Integrate-and-fire neuron: LIF without leak (tau = 1), as used by SEW-ResNet."""

    def __init__(self, threshold: float = 1.0, gamma: float = 1.0, surrogate="zif", alpha=None,
                 reset: str = "hard", detach_reset: bool = False, backend: str = "auto"):
        super().__init__(1.0, threshold, gamma, surrogate, alpha, reset, detach_reset, backend)


class ILIF(SpikingNeuron):
    """Integer-valued LIF (I-LIF, the neuron of the Spike-driven Transformer v3), as SpikingJelly's
    ``ILIFNode``: per step ``h = tau * u + x``, ``s = round(clip(h / threshold, 0, max_level))`` (an
    integer count 0..max_level, ties to even), soft reset ``u = h - threshold * s``. Backward is a
    straight-through rectangle: ``ds/dh = 1 / threshold`` where ``h / threshold`` is in ``[0, max_level]``.

    ``tau`` is the decay factor (SpikingJelly's default ``tau=4/3`` is ``tau=0.25`` here).
    """

    def __init__(self, max_level: int = 4, tau: float = 0.25, threshold: float = 1.0, detach_reset: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if isinstance(max_level, bool) or not isinstance(max_level, int) or max_level < 1:
            raise ValueError(f"ILIF max_level must be an integer >= 1, got {max_level!r}")
        if not threshold > 0:
            raise ValueError(f"ILIF threshold must be > 0, got {threshold!r}")
        self._check_backend(backend)
        self.max_level = max_level
        self.tau = float(tau)
        self.threshold = float(threshold)
        self.detach_reset = bool(detach_reset)
        self.backend = backend

    @property
    def spec(self) -> NeuronSpec:
        return NeuronSpec(dynamics="ilif", decay=self.tau, threshold=self.threshold, reset="soft",
                          detach_reset=self.detach_reset, max_level=self.max_level)

    def extra_repr(self) -> str:
        return (f"max_level={self.max_level}, tau={self.tau}, threshold={self.threshold}, "
                f"detach_reset={self.detach_reset}, backend={self.backend}")


class ReLUNeuron(nn.Module):
    """ReLU in the place of a spiking neuron: turns a model into its ANN twin."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)
