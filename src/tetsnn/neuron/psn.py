"""Parallel spiking neurons (Fang et al., NeurIPS 2023): a learnable mix over time, then a spike.

Layout: batch-first ``[N, T, ...]``. With ``X[n]`` the ``[T, F]`` matrix of one sample (F = all
dims after time)::

    H[n] = W @ X[n] + b           W: [T, T], b: [T, 1]
    S[n] = H(H[n])                strict '>': H == 0 does not fire; the surrogate gives dS/dH

There is no membrane state and no reset, so every step is computed at once.

- :class:`PSN` learns the whole ``[T, T]`` matrix (Kaiming-uniform, ``a = sqrt(5)``) and a bias per
  step (initialised to -1), as SpikingJelly's ``PSN``.
- :class:`SlidingPSN` learns ``order`` = k weights shared by every step: row t of ``W`` holds the
  last ``min(t + 1, k)`` of them on columns ``t + 1 - len .. t`` (so ``H[t]`` mixes the last k
  inputs), and one scalar bias (-1); ``exp_init`` starts the weights at ``..., 1/4, 1/2, 1``.

Paths (``backend``):

- ``"loop"``: step by step in plain torch ops (autograd keeps every intermediate): the reference.
- ``"fused"``: the mix over time in one pass forward; backward rebuilds ``H`` from ``X``, so the only
  activation kept is ``X`` itself, or ``X`` as packed bits with ``spikes=True`` (the input is declared
  0/1). On CPU float32 / float64 with a built-in surrogate each direction is one numba kernel
  (:mod:`tetsnn.kernels.psn_numba`: one read of the input per direction); elsewhere (a GPU, other
  dtypes, a callable surrogate) it is a batched matmul and torch ops.
- ``"auto"``: ``"fused"``.

The module's ``spec`` (``dynamics="psn"``) goes to :func:`tetsnn.kernels.plan.plan`, which names the
path: ``LOOP``, ``PSN_NUMBA`` or ``PSN_TORCH``.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ..kernels.plan import Path, plan
from ..surrogate import resolve_surrogate
from .spec import NeuronSpec

__all__ = ["PSN", "SlidingPSN", "Surrogate", "psn_loop", "psn_fused"]


class Surrogate(NamedTuple):
    """The surrogate of a neuron: its name ("zif", "sigmoid", "atan" or "custom"), width and ``grad_fn(v)``."""
    name: str
    width: Optional[float]
    grad_fn: Callable


# --------------------------------------------------------------------------- the two paths

def psn_loop(x: Tensor, weight: Tensor, bias: Tensor, spike_fn: Callable) -> Tensor:
    """The per-step reference on ``[N, T, ...]``: ``s[:, t] = spike_fn(sum_j W[t, j] x[:, j] + b[t])``,
    mixed in the parameters' dtype; the spikes come back in the input's dtype."""
    T = x.shape[1]
    xs = x.to(weight.dtype)
    out = []
    for t in range(T):
        h = bias[t]
        for j in range(T):
            h = h + weight[t, j] * xs[:, j]
        out.append(spike_fn(h))
    return torch.stack(out, dim=1).to(x.dtype)


def _mix(weight: Tensor, bias: Tensor, x3: Tensor) -> Tensor:
    """``W @ x3[n] + b`` for every sample of ``x3 = [N, T, F]`` (one batched matmul), in the parameters'
    dtype (a float16 / bfloat16 input is mixed in float32)."""
    return torch.baddbmm(bias, weight.expand(x3.shape[0], -1, -1), x3.to(weight.dtype))


def _numba_kernels(x3: Tensor, weight: Tensor, path: Path):
    """:mod:`tetsnn.kernels.psn_numba` on the ``PSN_NUMBA`` path (the input in the weights' dtype), else None."""
    from ..kernels import psn_numba
    return psn_numba if path is Path.PSN_NUMBA and x3.dtype == weight.dtype else None


class _PSNFn(torch.autograd.Function):
    """``S = H(W X + b)`` keeping only ``X`` (or its bits) for backward, where ``H`` is rebuilt."""

    @staticmethod
    def forward(ctx, x3, weight, bias, surrogate, spikes, path):
        kernels = _numba_kernels(x3, weight, path)
        s = kernels.forward(x3, weight, bias) if kernels else _mix(weight, bias, x3).gt_(0)
        if spikes:
            from ..kernels.ops import pack_spikes
            ctx.save_for_backward(pack_spikes(x3), weight, bias)
        else:
            ctx.save_for_backward(x3, weight, bias)
        ctx.meta = (surrogate, spikes, x3.shape, x3.dtype, path)
        return s

    @staticmethod
    def backward(ctx, grad_s):
        saved, weight, bias = ctx.saved_tensors
        surrogate, spikes, shape, dtype, path = ctx.meta
        if spikes:
            from ..kernels.ops import unpack_spikes
            x3 = unpack_spikes(saved, list(shape), dtype)
        else:
            x3 = saved
        kernels = _numba_kernels(x3, weight, path)
        if kernels:
            return (*kernels.backward(grad_s.to(dtype), x3, weight, bias, surrogate.name, surrogate.width),
                    None, None, None)
        x3 = x3.to(weight.dtype)
        g = surrogate.grad_fn(_mix(weight, bias, x3)) * grad_s  # dL/dH
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(weight.t(), g).to(dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(g, x3.transpose(1, 2)).sum(0)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2)).view_as(bias)
        return grad_x, grad_w, grad_b, None, None, None


def psn_fused(x: Tensor, weight: Tensor, bias: Tensor, surrogate: Surrogate, spikes: bool = False,
              path: Optional[Path] = None) -> Tensor:
    """``H(W X + b)`` on ``[N, T, ...]`` in one pass over time, with ``surrogate`` giving dS/dH.

    ``bias`` is ``[T, 1]``; ``spikes=True`` keeps ``x`` (which must be 0/1) as packed bits for backward;
    ``path`` is the planner's (``PSN_NUMBA`` or ``PSN_TORCH``; None: asked here).
    """
    if path is None:
        path = plan(NeuronSpec(dynamics="psn", surrogate=surrogate.name), x, backend="fused")
    shape = x.shape
    x3 = x.reshape(shape[0], shape[1], -1)
    with torch.autocast(x.device.type, enabled=False):  # H in the parameters' dtype, forward as backward
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)):
            return _mix(weight, bias, x3).gt_(0).to(x.dtype).view(shape)  # nothing to keep
        if not x3.is_contiguous():
            x3 = x3.contiguous()
        return _PSNFn.apply(x3, weight, bias, surrogate, bool(spikes), path).to(x.dtype).view(shape)


# --------------------------------------------------------------------------- modules

class _ParallelNeuron(nn.Module):
    """What :class:`PSN` and :class:`SlidingPSN` share: the surrogate, the path and the input checks."""

    backends = {"loop", "fused"}

    def __init__(self, surrogate, gamma, alpha, backend, spikes):
        super().__init__()
        if backend != "auto" and backend not in self.backends:
            raise ValueError(f"unknown backend {backend!r}: expected 'auto' or one of {sorted(self.backends)}")
        self.backend = backend
        self.spikes = bool(spikes)
        self.surrogate = surrogate
        self.surrogate_name, self.width, self.spike_fn, self.grad_fn = resolve_surrogate(surrogate, gamma, alpha)
        self._surrogate = Surrogate(self.surrogate_name, self.width, self.grad_fn)
        self.spec = NeuronSpec(dynamics="psn", surrogate=surrogate if callable(surrogate) else self.surrogate_name,
                               width=1.0 if self.width is None else float(self.width))

    def path(self, x: Tensor) -> Path:
        """The :class:`~tetsnn.kernels.plan.Path` that runs on ``x``: ``LOOP``, ``PSN_NUMBA`` or ``PSN_TORCH``."""
        return plan(self.spec, x, backend=self.backend)

    def resolve_backend(self, x: Tensor) -> str:
        """``self.backend`` with "auto" made concrete: "loop" or "fused"."""
        return "loop" if self.path(x) is Path.LOOP else "fused"

    def mixing(self, T: int):
        """``(W [T, T], b [T, 1])`` for ``T`` steps (differentiable in the parameters)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects batch-first input [N, T, ...] with at least 2 dims, "
                             f"got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        weight, bias = self.mixing(x.shape[1])
        path = self.path(x)
        if path is Path.LOOP:
            return psn_loop(x, weight, bias, self.spike_fn)
        return psn_fused(x, weight, bias, self._surrogate, self.spikes, path)

    def extra_repr(self) -> str:
        return f"surrogate={self.surrogate_name}, width={self.width}, backend={self.backend}, spikes={self.spikes}"


class PSN(_ParallelNeuron):
    """Parallel spiking neuron over ``T`` steps: ``S = H(W X + b)`` with a learnable ``[T, T]`` ``weight``
    and ``[T, 1]`` ``bias`` (SpikingJelly's ``PSN``, same parameters and initialisation).

    Args:
        T: number of time steps (the input's dim 1 must equal it).
        surrogate: "zif" (the default), "sigmoid", "atan", or a callable ``v -> ds/dv``, as in
            :class:`tetsnn.LIF`.
        gamma: half-width of the ZIF triangle surrogate.
        alpha: width of the sigmoid / atan surrogate (defaults 4.0 / 2.0).
        backend: "loop", "fused" or "auto" (= "fused").
        spikes: the input is 0/1 spikes: the fused path keeps it as packed bits for backward.
    """

    def __init__(self, T: int, surrogate: Union[str, Callable] = "zif", gamma: float = 1.0,
                 alpha: Optional[float] = None, backend: str = "auto", spikes: bool = False):
        super().__init__(surrogate, gamma, alpha, backend, spikes)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"PSN needs the number of time steps T as an integer >= 1, got {T!r}")
        self.T = T
        self.weight = nn.Parameter(torch.empty(T, T))
        self.bias = nn.Parameter(torch.empty(T, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.constant_(self.bias, -1.0)

    def mixing(self, T: int):
        return self.weight, self.bias

    def _check(self, x: Tensor) -> None:
        super()._check(x)
        if x.shape[1] != self.T:
            raise ValueError(f"PSN was built for T={self.T} steps, got input with {x.shape[1]} steps "
                             f"(shape {tuple(x.shape)})")

    def extra_repr(self) -> str:
        return f"T={self.T}, " + super().extra_repr()


def sliding_index(T: int, order: int) -> Tensor:
    """``[T, T]`` indices into ``[0, *weight]``: entry (t, j) picks ``weight[order - 1 - (t - j)]`` where
    ``0 <= t - j < order`` and the 0 in front elsewhere."""
    t = torch.arange(T).view(-1, 1)
    lag = t - torch.arange(T).view(1, -1)
    return torch.where((lag >= 0) & (lag < order), order - lag, torch.zeros_like(lag))


class SlidingPSN(_ParallelNeuron):
    """Sliding parallel spiking neuron of ``order`` k: ``H[t] = sum_i w[k-1-i] X[t-i] + b`` over the last k
    steps, any number of steps (SpikingJelly's ``SlidingPSN``, multi-step, same parameters).

    Args:
        order: k, the number of past steps (the current one included) each step mixes.
        exp_init: start the weights at ``..., 1/4, 1/2, 1``; otherwise Kaiming-uniform (``a = sqrt(5)``).
        surrogate: as in :class:`PSN`.
        gamma: as in :class:`PSN`.
        alpha: as in :class:`PSN`.
        backend: as in :class:`PSN`.
        spikes: as in :class:`PSN`.
    """

    def __init__(self, order: int, exp_init: bool = True, surrogate: Union[str, Callable] = "zif",
                 gamma: float = 1.0, alpha: Optional[float] = None, backend: str = "auto",
                 spikes: bool = False):
        super().__init__(surrogate, gamma, alpha, backend, spikes)
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"SlidingPSN needs order as an integer >= 1, got {order!r}")
        self.order = order
        self.exp_init = bool(exp_init)
        self.weight = nn.Parameter(torch.empty(order))
        self.bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.exp_init:
                self.weight.copy_(0.5 ** torch.arange(self.order - 1, -1, -1, dtype=torch.float64))
            else:
                nn.init.kaiming_uniform_(self.weight.view(1, -1), a=math.sqrt(5))
            self.bias.fill_(-1.0)

    def mixing(self, T: int):
        padded = torch.cat([self.weight.new_zeros(1), self.weight])
        weight = padded[sliding_index(T, self.order).to(self.weight.device)]
        return weight, self.bias.expand(T, 1)

    def extra_repr(self) -> str:
        return f"order={self.order}, exp_init={self.exp_init}, " + super().extra_repr()
