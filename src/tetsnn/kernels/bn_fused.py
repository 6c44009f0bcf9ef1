"""BatchNorm fused into the spiking neuron: the normalised input is recomputed in backward, not kept.

A conv-BN-LIF layer run module by module keeps two float tensors per step for backward: the
BatchNorm keeps its input ``y`` (the conv output) and the LIF keeps its input ``z = BN(y)``. ``z``
is an elementwise function of ``y`` and four per-channel vectors, so the fused op keeps ``y``
alone and rebuilds ``z`` in backward. With the residual add of a ResNet block before the neuron,
the second operand is either the block input (0/1 spikes: kept as packed bits) or a downsample
branch ``BN2(y2)`` (its conv output ``y2`` is kept, as its BatchNorm would keep it anyway).

Forward, on the per-step batch ``y`` of shape ``[N*T, C, ...]`` (statistics pooled over batch, time
and space, as ``SeqToANNContainer`` pools them)::

    mean_c, var_c = mean and biased variance of y[:, c]          invstd_c = 1 / sqrt(var_c + eps)
    z      = (y - mean) * invstd * weight + bias                  (torch's own batch_norm kernel)
    z      = z + BN2(y2)   or   z + r                             (optional residual)
    s      = LIF(z viewed as [N, T, C, ...])                      (kernels.fused: lif_forward)
    running_mean <- (1 - m) running_mean + m mean_c
    running_var  <- (1 - m) running_var  + m var_c * n / (n - 1)  (n = elements per channel)

Saved for backward: ``y`` (and ``y2``) in the dtype it came in, ``mean`` and ``invstd`` per
channel (float32, or float64 for float64 input), ``weight``/``bias``, and the residual spikes ``r``
as bits. Nothing of the size of ``z``.

Backward::

    z  = the same batch_norm kernel on y (and y2) in training mode, no running statistics;
         this reproduces the forward's statistics and ``z`` bit for bit (same kernel, same input)
    gz = LIF backward from dL/ds and z (the BPTT recurrence of kernels.fused)
    dL/dy, dL/dweight, dL/dbias = batch_norm_backward(gz, y, saved mean and invstd)
    dL/dy2, ... likewise with gz;   dL/dr = gz

so every gradient is the one autograd forms for the unfused modules, from the same values.
The extra work is one more pass of BatchNorm's forward over ``y`` in backward. The statistics and
the running-statistics update are those of ``torch.nn.functional.batch_norm``; the caller passes
the momentum ``nn.BatchNorm`` would use (``1 / num_batches_tracked`` when its momentum is None).

With ``kernel="triton"`` (CUDA) the normalisation runs inside the Triton LIF kernels of
:mod:`tetsnn.kernels.triton_bn_lif` instead: ``z`` is never written, forward or backward, and the
statistics come from ``torch.batch_norm_update_stats``; forward and backward form ``z`` by the same
fused multiply-add, so the backward rebuilds the forward's ``z`` exactly, which may differ from
torch's batch_norm kernel by an ulp.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .compact import _pack_once, unpack_spikes
from .fused import lif_backward, lif_forward

__all__ = ["bn_lif", "bn_lif_forward"]

_aten = torch.ops.aten


def _normalise(y, weight, bias, running_mean, running_var, momentum, eps):
    """torch's training-mode batch_norm on copies of the running statistics:
    ``(z, mean, invstd, new_running_mean, new_running_var)`` (the last two empty without them)."""
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    z, mean, invstd = _aten.native_batch_norm(y, weight, bias, rm, rv, True, momentum, eps)
    return z, mean, invstd, mean.new_empty(0) if rm is None else rm, mean.new_empty(0) if rv is None else rv


def _recompute(y, weight, bias, eps, y2, weight2, bias2, eps2, bits, bits_meta, n, t):
    """``z`` as the forward made it, viewed ``[N, T, C, ...]``."""
    z = _aten.native_batch_norm(y, weight, bias, None, None, True, 0.0, eps)[0]
    z = z.view(n, t, *z.shape[1:])
    if y2 is not None:
        z2 = _aten.native_batch_norm(y2, weight2, bias2, None, None, True, 0.0, eps2)[0]
        z = z + z2.view(n, t, *z2.shape[1:])
    elif bits is not None:
        z = z + unpack_spikes(bits, *bits_meta)
    return z


@torch.library.custom_op("tetsnn::bn_lif_forward", mutates_args=())
def bn_lif_forward(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], momentum: float, eps: float,
                   y2: Optional[Tensor], weight2: Optional[Tensor], bias2: Optional[Tensor],
                   running_mean2: Optional[Tensor], running_var2: Optional[Tensor], momentum2: float, eps2: float,
                   residual: Optional[Tensor], T: int, tau: float, threshold: float, reset: str,
                   detach_reset: bool, surrogate: str, width: float, kernel: str
                   ) -> List[Tensor]:
    """Spikes ``[N, T, C, ...]`` of ``LIF(BN(y) [+ BN2(y2) | + residual])`` for ``y`` of shape
    ``[N*T, C, ...]``, then per BatchNorm ``mean, invstd, new_running_mean, new_running_var`` (the running
    statistics after this batch's update, for the caller to copy into the buffers; empty where absent).
    The op is functional (autograd needs that), so it updates copies of the running statistics."""
    if kernel == "triton":
        return _triton_forward(y, weight, bias, running_mean, running_var, momentum, eps, y2, weight2, bias2,
                               running_mean2, running_var2, momentum2, eps2, residual, T, tau, threshold, reset)
    n = y.shape[0] // T
    z, *stats = _normalise(y, weight, bias, running_mean, running_var, momentum, eps)
    z = z.view(n, T, *z.shape[1:])
    stats2 = [stats[0].new_empty(0) for _ in range(4)]
    if y2 is not None:
        z2, *stats2 = _normalise(y2, weight2, bias2, running_mean2, running_var2, momentum2, eps2)
        z = z + z2.view(n, T, *z2.shape[1:])
    elif residual is not None:
        z = z + residual
    s = lif_forward(z, tau, threshold, reset, detach_reset, surrogate, width, kernel)
    return [s, *stats, *stats2]


@bn_lif_forward.register_fake
def _(y, weight, bias, running_mean, running_var, momentum, eps, y2, weight2, bias2, running_mean2, running_var2,
      momentum2, eps2, residual, T, tau, threshold, reset, detach_reset, surrogate, width, kernel):
    s = y.new_empty((y.shape[0] // T, T, *y.shape[1:]))

    def stats(x, rm, rv):
        if x is None:
            return [y.new_empty(0) for _ in range(4)]
        st = torch.float64 if x.dtype == torch.float64 else torch.float32
        run = lambda r: x.new_empty(0) if r is None else torch.empty_like(r)  # noqa: E731
        return [x.new_empty((x.shape[1],), dtype=st) for _ in range(2)] + [run(rm), run(rv)]
    return [s, *stats(y, running_mean, running_var), *stats(y2, running_mean2, running_var2)]


def _setup_context(ctx, inputs, output):
    (y, weight, bias, _, _, _, eps, y2, weight2, bias2, _, _, _, eps2, residual, T,
     tau, threshold, reset, detach_reset, surrogate, width, kernel) = inputs
    _, mean, invstd, _, _, mean2, invstd2, _, _ = output
    bits = None
    if residual is not None and y2 is None:
        bits = _pack_once(residual)   # 0/1 spikes: one bit each
        ctx.bits_meta = (list(residual.shape), residual.dtype)
    ctx.save_for_backward(y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits)
    ctx.eps = (eps, eps2)
    ctx.T = T
    ctx.lif = (tau, threshold, reset, detach_reset, surrogate, width, kernel)


def _bn_grads(gz, y, weight, mean, invstd, eps, needs):
    """dL/dy, dL/dweight, dL/dbias of batch_norm from dL/dz (``None`` where not needed)."""
    if not any(needs):
        return None, None, None
    gz = gz.reshape(y.shape)
    gy, gw, gb = _aten.native_batch_norm_backward(gz, y, weight, None, None, mean, invstd, True, eps,
                                                  [needs[0], weight is not None and needs[1],
                                                   weight is not None and needs[2]])
    return gy, gw, gb


def _backward(ctx, grads):
    grad_s = grads[0]
    y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits = ctx.saved_tensors
    n = y.shape[0] // ctx.T
    with torch.no_grad():
        if ctx.lif[-1] == "triton":
            gz = _triton_backward(grad_s, y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits,
                                  ctx.T, *ctx.lif[:-1])
        else:
            z = _recompute(y, weight, bias, ctx.eps[0], y2, weight2, bias2, ctx.eps[1], bits,
                           getattr(ctx, "bits_meta", None), n, ctx.T)
            gz = lif_backward(grad_s, z, *ctx.lif)
            del z
        ni = ctx.needs_input_grad
        gy, gw, gb = _bn_grads(gz, y, weight, mean, invstd, ctx.eps[0], (ni[0], ni[1], ni[2]))
        gy2 = gw2 = gb2 = None
        if y2 is not None:
            gy2, gw2, gb2 = _bn_grads(gz, y2, weight2, mean2, invstd2, ctx.eps[1], (ni[7], ni[8], ni[9]))
        gr = gz if bits is not None and ni[14] else None
    return (gy, gw, gb, None, None, None, None, gy2, gw2, gb2, None, None, None, None, gr) + (None,) * 8


bn_lif_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- the Triton kernels

def _batch_stats(y, running_mean, running_var, momentum, eps):
    """``[mean, invstd, new_running_mean, new_running_var]`` without normalising (Triton path)."""
    rm = None if running_mean is None else running_mean.clone()
    rv = None if running_var is None else running_var.clone()
    mean, var = torch.batch_norm_update_stats(y, rm, rv, momentum)
    return [mean, torch.rsqrt(var + eps), mean.new_empty(0) if rm is None else rm,
            mean.new_empty(0) if rv is None else rv]


def _triton_forward(y, weight, bias, running_mean, running_var, momentum, eps, y2, weight2, bias2, running_mean2,
                    running_var2, momentum2, eps2, residual, T, tau, threshold, reset):
    from . import triton_bn_lif as k
    cd = k.compute_dtype(y.dtype)
    stats = _batch_stats(y, running_mean, running_var, momentum, eps)
    ab = k.affine(stats[0], stats[1], weight, bias, cd)
    stats2 = [stats[0].new_empty(0) for _ in range(4)]
    if y2 is not None:
        stats2 = _batch_stats(y2, running_mean2, running_var2, momentum2, eps2)
        ab = torch.cat([ab, k.affine(stats2[0], stats2[1], weight2, bias2, cd)])
        y2 = y2.to(y.dtype)
    r = None if residual is None else residual.to(y.dtype)
    s = k.forward(y, ab, y2, r, T, tau, threshold, reset == "hard")
    return [s, *stats, *stats2]


def _triton_backward(grad_s, y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits, T,
                     tau, threshold, reset, detach_reset, surrogate, width):
    from . import triton_bn_lif as k
    cd = k.compute_dtype(y.dtype)
    ab = k.affine(mean, invstd, weight, bias, cd)
    if y2 is not None:
        ab = torch.cat([ab, k.affine(mean2, invstd2, weight2, bias2, cd)])
        y2 = y2.to(y.dtype)
    gz = k.backward(grad_s.to(y.dtype), y, ab, y2, bits, T, tau, threshold, reset == "hard", detach_reset,
                    surrogate, width)
    return gz.to(y.dtype)


def _bn_args(bn) -> list:
    """``[weight, bias, running_mean, running_var, momentum, eps]`` of a training-mode ``nn.BatchNorm``,
    with ``num_batches_tracked`` advanced and the momentum chosen exactly as its ``forward`` does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    track = bn.track_running_stats
    return [bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None,
            momentum, bn.eps]


def bn_lif(y: Tensor, bn, neuron, T: int, residual: Optional[Tensor] = None, y2: Optional[Tensor] = None,
           bn2=None) -> Tensor:
    """Spikes of ``neuron(BN(y).view(N, T, ...) [+ BN2(y2) | + residual])`` for ``y = conv(x)`` of shape
    ``[N*T, C, ...]``, with ``bn`` / ``bn2`` training-mode ``nn.BatchNorm`` modules (their running statistics
    and ``num_batches_tracked`` are updated) and ``neuron`` a :class:`tetsnn.LIF` with a built-in
    surrogate and a fused backend. ``residual`` must be 0/1 spikes ``[N, T, C, ...]``."""
    second: List = _bn_args(bn2) if y2 is not None else [None, None, None, None, 0.0, 0.0]
    kernel = neuron.resolve_backend(y)
    s, _, _, rm, rv, _, _, rm2, rv2 = bn_lif_forward(
        y, *_bn_args(bn), y2, *second, residual, T, neuron.tau, neuron.threshold, neuron.reset,
        neuron.detach_reset, neuron.surrogate_name, neuron.width or 1.0, kernel)
    with torch.no_grad():
        for m, new_mean, new_var in ((bn, rm, rv), (bn2, rm2, rv2)):
            if m is not None and m.track_running_stats:
                m.running_mean.copy_(new_mean)
                m.running_var.copy_(new_var)
    return s
