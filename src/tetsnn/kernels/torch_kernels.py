"""The neuron recurrence in torch ops: one step (:func:`charge`, :func:`fire`, :func:`reset`) shared by
the per-step loop reference (:func:`tetsnn.neuron.lif.lif_loop`, which runs it under autograd) and the
graph-free forward / backward below (the CPU path without numba, half precision off the CPU, and
callable surrogates), plus the torch-op fallback of the bit packing.

``decay`` is a float (a fixed decay) or a 0-dim tensor (a learnable one); the recurrences are those of
:mod:`tetsnn.neuron.spec`, and the BPTT step that of :mod:`tetsnn.kernels.ops`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..neuron.spec import NeuronSpec

__all__ = ["charge", "fire", "reset", "forward", "backward", "pack", "unpack"]


def charge(spec: NeuronSpec, decay, u: Tensor, x: Tensor) -> Tensor:
    """The pre-reset membrane ``h = decay * u + x`` (``decay * u + (1 - decay) * x`` with decay_input)."""
    if spec.decay_input:
        return decay * u + (1 - decay) * x
    return decay * u + x


def fire(spec: NeuronSpec, h: Tensor, spike_fn: Optional[Callable] = None) -> Tensor:
    """Spikes of the pre-reset membrane: ``spike_fn(h - threshold)`` (a plain Heaviside without it), or
    ILIF's integer counts (straight-through rectangle gradient)."""
    if spec.dynamics == "ilif":
        return _ILIFSpike.apply(h, spec.threshold, spec.max_level)
    v = h - spec.threshold
    return (v > 0).to(h.dtype) if spike_fn is None else spike_fn(v)


def reset(spec: NeuronSpec, h: Tensor, s: Tensor) -> Tensor:
    """The membrane after the reset; the reset term is detached with ``detach_reset``."""
    r = s.detach() if spec.detach_reset else s
    return h * (1 - r) if spec.hard and spec.dynamics == "lif" else h - spec.threshold * r


class _ILIFSpike(torch.autograd.Function):
    """``round(clip(h / threshold, 0, D))``; backward ``1 / threshold`` where ``h / threshold`` is in [0, D]."""

    @staticmethod
    def forward(ctx, h, threshold, levels):
        ctx.save_for_backward(h)
        ctx.args = (threshold, levels)
        return torch.round(torch.clamp(h / threshold, 0, levels))

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        threshold, levels = ctx.args
        q = h / threshold
        return grad * ((q >= 0) & (q <= levels)).to(h.dtype) / threshold, None, None


@torch.no_grad()
def forward(x: Tensor, spec: NeuronSpec, decay) -> Tuple[Tensor, Tensor]:
    """The forward recurrence without a graph: ``(s, h)``."""
    s, h = torch.empty_like(x), torch.empty_like(x)
    u = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        ht = charge(spec, decay, u, x[:, t])
        st = fire(spec, ht)
        u = reset(spec, ht, st)
        h[:, t], s[:, t] = ht, st
    return s, h


@torch.no_grad()
def backward(grad_s: Tensor, x: Tensor, spec: NeuronSpec, decay, grad_fn: Callable,
             grad_decay: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """The reverse-time BPTT loop from the input ``x``: ``(dL/dx, dL/d decay or None)``; ``grad_fn(v)``
    is the surrogate ds/dv (unused by ILIF)."""
    s, h = forward(x, spec, decay)
    gx = torch.empty_like(h)
    gu = torch.zeros_like(h[:, 0])
    gd = torch.zeros((), dtype=h.dtype) if grad_decay else None
    ilif = spec.dynamics == "ilif"
    for t in reversed(range(h.shape[1])):
        ht = h[:, t]
        g = grad_s[:, t]
        if ilif:
            q = ht / spec.threshold
            if not spec.detach_reset:
                g = g - gu * spec.threshold
            gh = g * ((q >= 0) & (q <= spec.max_level)).to(h.dtype) / spec.threshold + gu
        else:
            v = ht - spec.threshold
            if not spec.detach_reset:
                g = g - gu * ht if spec.hard else g - gu * spec.threshold
            gh = g * grad_fn(v)
            gh = gh + gu * (1 - (v > 0).to(h.dtype)) if spec.hard else gh + gu
        gx[:, t] = gh * (1 - decay) if spec.decay_input else gh
        if grad_decay:
            up = reset(spec, h[:, t - 1], s[:, t - 1]) if t > 0 else torch.zeros_like(ht)
            gd = gd + (gh * (up - x[:, t]) if spec.decay_input else gh * up).sum()
        gu = decay * gh
    return gx, gd


def pack(x: Tensor, out: Tensor) -> Tensor:
    """Bit k of ``out[j]`` = ``x[8j + k] != 0`` for a flat ``x``."""
    bits = torch.zeros(out.numel() * 8, dtype=torch.uint8, device=x.device)
    bits[: x.numel()] = x != 0
    bits = bits.view(-1, 8) << torch.arange(8, dtype=torch.uint8, device=x.device)
    return torch.sum(bits, dim=1, dtype=torch.uint8, out=out)


def unpack(packed: Tensor, out: Tensor) -> Tensor:
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return out.copy_(bits.view(-1)[: out.numel()].view(out.shape))
