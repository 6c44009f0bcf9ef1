"""Spike-fed Conv2d / Linear that keep their input for backward as packed bits (1 bit per element).

A conv or linear layer saves its input for the weight gradient. When that input is spikes (exactly
0 or 1), 31 of every 32 bits it keeps are redundant: :class:`SpikeConv2d` and :class:`SpikeLinear`
save ``pack_spikes(x)`` instead and rebuild ``x`` bit for bit in backward, then call the same
gradient kernels autograd would, so every gradient is bit-identical to the plain layer's.

Use them only where the input is truly 0/1 (right after a spiking neuron, or a max pool of
spikes); average pooling or a SEW "ADD" join produce other values. ``compact=False`` turns a layer
back into its plain parent class. Parameters and state_dict keys are those of ``nn.Conv2d`` /
``nn.Linear``. The bit packing itself (``pack_spikes`` / ``unpack_spikes``) is a custom op of
:mod:`tetsnn.kernels.ops`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels.levels import pack_counts, unpack_counts
from .kernels.ops import pack_once, pack_spikes, unpack_spikes

__all__ = ["pack_spikes", "unpack_spikes", "pack_levels", "unpack_levels", "SpikeConv2d", "SpikeConv1d", "SpikeLinear", "spike_conv2d", "spike_conv1d",
           "spike_linear",
           "ShapeOnlyAvgPool2d", "ShapeOnlyAdaptiveAvgPool2d", "SpikeMaxPool2d", "spike_avg_pool2d",
           "spike_adaptive_avg_pool2d", "spike_max_pool2d"]

def pack_levels(x: Tensor, levels: int):
    """Bit planes of integer spikes 0..levels (one plane, bit 0, for 0/1 spikes), checked to be such
    counts (a ValueError names a value that is not)."""
    if levels <= 1:
        return (pack_once(x),)
    # one pass checks and packs on the CPU; the check is data-dependent: eager only, as pack_once's
    return tuple(pack_counts(x, levels, checked=not torch.compiler.is_compiling()).unbind(0))


def unpack_levels(planes, shape, dtype) -> Tensor:
    """The integer spikes of :func:`pack_levels`' bit planes, as a ``shape`` tensor of ``dtype``."""
    if len(planes) == 1:
        return unpack_spikes(planes[0], shape, dtype)
    return unpack_counts(torch.stack(planes) if torch.compiler.is_compiling() else _stacked(planes), shape, dtype)


def _stacked(planes) -> Tensor:
    """The planes as one ``[bits, bytes]`` tensor: the tensor they are the rows of (what
    :func:`pack_levels` returns), else a stacked copy."""
    base = planes[0]._base
    if base is not None and base.dim() == 2 and base.shape[0] == len(planes) and base.is_contiguous() and all(
            p._base is base and p.data_ptr() == base[i].data_ptr() and p.shape == base[i].shape
            for i, p in enumerate(planes)):
        return base
    return torch.stack(planes)


class _SpikeConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, levels=1):
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_meta = (list(x.shape), x.dtype)
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, *pack_levels(x, levels))
        conv = F.conv1d if x.dim() == 3 else F.conv2d   # SpikeConv1d shares this function
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        weight, *packed = ctx.saved_tensors
        x = unpack_levels(packed, *ctx.x_meta)
        if ctx.channels_last:   # the layout the plain convolution's backward would see
            x = x.contiguous(memory_format=torch.channels_last)
        stride, padding, dilation, groups = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(stride), list(padding),
            list(dilation), False, [0] * (x.dim() - 2), groups, mask)
        return gx, gw, gb, None, None, None, None, None


class _SpikeLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, levels=1):
        ctx.x_meta = (list(x.shape), x.dtype)
        ctx.save_for_backward(weight, bias, *pack_levels(x, levels))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        # the products autograd forms for F.linear (addmm on the flattened input)
        weight, bias, *packed = ctx.saved_tensors
        x = unpack_levels(packed, *ctx.x_meta).view(-1, weight.shape[1])
        g = grad.reshape(-1, weight.shape[0])
        gx = g.mm(weight).view(ctx.x_meta[0]) if ctx.needs_input_grad[0] else None
        gw = g.t().mm(x) if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _apply_autocast(fn, x, weight, bias, *args):
    """Run ``fn.apply`` with autocast's casts made outside it, so its backward sees the same dtypes."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return fn.apply(x, weight, bias, *args)
    dtype = torch.get_autocast_dtype(device)
    x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
    with torch.autocast(device, enabled=False):
        return fn.apply(x, weight, bias, *args)


def _compact_applies(layer: nn.Module, x: Tensor) -> bool:
    return layer.compact and torch.is_grad_enabled() and x.dtype in (torch.float32, torch.float64, torch.float16,
                                                                        torch.bfloat16)


class SpikeConv2d(nn.Conv2d):
    """``nn.Conv2d`` for spike input: saves the input as packed bits (``compact=True``, zero padding);
    ``levels`` is the largest spike value (integer spikes 0..levels keep ``ceil(log2(levels+1))`` bits)."""

    def __init__(self, *args, compact: bool = True, levels: int = 1, **kw):
        super().__init__(*args, **kw)
        self.compact = compact
        self.levels = int(levels)

    def forward(self, x: Tensor) -> Tensor:
        if not _compact_applies(self, x) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return _apply_autocast(_SpikeConv2dFn, x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                               self.groups, self.levels)


class SpikeConv1d(nn.Conv1d):
    """``nn.Conv1d`` for spike input (the token projections of the spiking transformers): saves the input
    as packed bits, as :class:`SpikeConv2d` does."""

    def __init__(self, *args, compact: bool = True, levels: int = 1, **kw):
        super().__init__(*args, **kw)
        self.compact = compact
        self.levels = int(levels)

    def forward(self, x: Tensor) -> Tensor:
        if not _compact_applies(self, x) or self.padding_mode != "zeros" or isinstance(self.padding, str) \
                or x.dim() != 3:
            return super().forward(x)
        return _apply_autocast(_SpikeConv2dFn, x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                               self.groups, self.levels)


class SpikeLinear(nn.Linear):
    """``nn.Linear`` for spike input: saves the input as packed bits (``compact=True``; ``levels`` as for
    :class:`SpikeConv2d`)."""

    def __init__(self, *args, compact: bool = True, levels: int = 1, **kw):
        super().__init__(*args, **kw)
        self.compact = compact
        self.levels = int(levels)

    def forward(self, x: Tensor) -> Tensor:
        if not _compact_applies(self, x):
            return super().forward(x)
        return _apply_autocast(_SpikeLinearFn, x, self.weight, self.bias, self.levels)


def spike_conv2d(*args, spikes, **kw) -> nn.Conv2d:
    """A :class:`SpikeConv2d` where the input is spikes (``spikes``: True for 0/1, or the largest integer
    spike value), else a plain ``nn.Conv2d``."""
    return SpikeConv2d(*args, levels=int(spikes), **kw) if spikes else nn.Conv2d(*args, **kw)


def spike_conv1d(*args, spikes, **kw) -> nn.Conv1d:
    """A :class:`SpikeConv1d` where the input is spikes (``spikes`` as for :func:`spike_conv2d`), else a plain
    ``nn.Conv1d``."""
    return SpikeConv1d(*args, levels=int(spikes), **kw) if spikes else nn.Conv1d(*args, **kw)


def spike_linear(*args, spikes, **kw) -> nn.Linear:
    """A :class:`SpikeLinear` where the input is spikes (``spikes`` as for :func:`spike_conv2d`), else a plain
    ``nn.Linear``."""
    return SpikeLinear(*args, levels=int(spikes), **kw) if spikes else nn.Linear(*args, **kw)


# --------------------------------------------------------------------------- pooling

class _ShapeOnlyPool(torch.autograd.Function):
    """Average pooling whose backward needs the input's shape and strides only: keeps no tensor."""

    @staticmethod
    def forward(ctx, x, fn, grad_fn):
        ctx.meta = (x.shape, x.stride(), x.dtype, x.device)
        ctx.grad_fn = grad_fn
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        shape, stride, dtype, device = ctx.meta
        like = torch.empty_strided(shape, stride, dtype=dtype, device=device)  # never read: its shape only
        return ctx.grad_fn(grad, like), None, None


class ShapeOnlyAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` that keeps nothing for backward (the gradient of an average needs no values)."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        args = (list(_pair(self.kernel_size)), list(_pair(stride)), list(_pair(self.padding)), self.ceil_mode,
                self.count_include_pad, self.divisor_override)
        return _ShapeOnlyPool.apply(x, lambda v: torch.ops.aten.avg_pool2d(v, *args),
                                    lambda g, like: torch.ops.aten.avg_pool2d_backward(g, like, *args))


class ShapeOnlyAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` that keeps nothing for backward."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return _ShapeOnlyPool.apply(x, lambda v: F.adaptive_avg_pool2d(v, self.output_size),
                                    lambda g, like: torch.ops.aten._adaptive_avg_pool2d_backward(g, like))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class _SpikeMaxPool2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, args, levels=1):
        ctx.args = args
        ctx.x_meta = (list(x.shape), x.dtype)
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(*pack_levels(x, levels))
        return torch.ops.aten.max_pool2d_with_indices(x, *args)[0]

    @staticmethod
    def backward(ctx, grad):
        x = unpack_levels(ctx.saved_tensors, *ctx.x_meta)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        indices = torch.ops.aten.max_pool2d_with_indices(x, *ctx.args)[1]  # the forward's, from the same 0/1 values
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.args, indices), None, None


class SpikeMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` for spike input: keeps the input as packed bits and no indices (recomputed in backward);
    ``levels`` as for :class:`SpikeConv2d`."""

    def __init__(self, *args, levels: int = 1, **kw):
        super().__init__(*args, **kw)
        self.levels = int(levels)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad or self.return_indices or \
                x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        args = (list(_pair(self.kernel_size)), list(_pair(stride)), list(_pair(self.padding)),
                list(_pair(self.dilation)), self.ceil_mode)
        return _SpikeMaxPool2dFn.apply(x, args, self.levels)


def spike_avg_pool2d(*args, spikes: bool, **kw) -> nn.AvgPool2d:
    """A :class:`ShapeOnlyAvgPool2d` in a spiking network (``spikes=True``), else a plain ``nn.AvgPool2d``."""
    return ShapeOnlyAvgPool2d(*args, **kw) if spikes else nn.AvgPool2d(*args, **kw)


def spike_adaptive_avg_pool2d(*args, spikes: bool) -> nn.AdaptiveAvgPool2d:
    return ShapeOnlyAdaptiveAvgPool2d(*args) if spikes else nn.AdaptiveAvgPool2d(*args)


def spike_max_pool2d(*args, spikes: bool, **kw) -> nn.MaxPool2d:
    """A :class:`SpikeMaxPool2d` where the input is 0/1 spikes, else a plain ``nn.MaxPool2d``."""
    return SpikeMaxPool2d(*args, levels=int(spikes), **kw) if spikes else nn.MaxPool2d(*args, **kw)
