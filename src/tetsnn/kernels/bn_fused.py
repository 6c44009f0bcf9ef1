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
    s      = LIF(z viewed as [N, T, C, ...])                      (kernels.fused: lif_spikes)
    running_mean <- (1 - m) running_mean + m mean_c
    running_var  <- (1 - m) running_var  + m var_c * n / (n - 1)  (n = elements per channel)

Saved for backward: ``y`` (and ``y2``) in the dtype it came in, ``mean`` and ``invstd`` per
channel (float32, or float64 for float64 input), ``weight``/``bias``, and the residual spikes ``r``
as bits. Nothing of the size of ``z``.

Backward::

    z  = y * a + b per channel, a = invstd * weight, b = bias - mean * a, rebuilt inside the numba
         BPTT kernel as it reads y (and y2, or the residual bits): torch's CPU batch_norm forms z
         this way, and whether it rounds the products separately or once (fused multiply-add)
         depends on the instruction set its kernel was built for, so the rounding that reproduces
         it is found once per dtype on a random probe (``_rebuild_mode``). Where neither does
         (or for half precision, or without numba), torch's kernel runs again on y instead.
    gz = LIF backward from dL/ds and z (the BPTT recurrence of kernels.fused)
    dL/dy, dL/dweight, dL/dbias = batch_norm_backward(gz, y, saved mean and invstd)
    dL/dy2, ... likewise with gz;   dL/dr = gz

so every gradient is the one autograd forms for the unfused modules, from the same values, and the
backward reads y where the unfused LIF reads z: no more memory traffic than the unfused layers.
The statistics and the running-statistics update are those of ``torch.nn.functional.batch_norm``;
the caller passes the momentum ``nn.BatchNorm`` would use (``1 / num_batches_tracked`` when its
momentum is None). Eager code calls the body through an ``autograd.Function``; torch.compile
traces the custom ops.

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
from .fused import _as3d, _call_numba, _consts, _fma, _kernel, _numba, _use_numba, lif_input_grad, lif_spikes

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


def _forward(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
             running_var: Optional[Tensor], momentum: float, eps: float,
             y2: Optional[Tensor], weight2: Optional[Tensor], bias2: Optional[Tensor],
             running_mean2: Optional[Tensor], running_var2: Optional[Tensor], momentum2: float, eps2: float,
             residual: Optional[Tensor], T: int, tau: float, threshold: float, reset: str,
             detach_reset: bool, surrogate: str, width: float, kernel: str) -> List[Tensor]:
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
    s = lif_spikes(z, tau, threshold, reset, detach_reset, surrogate, width, kernel)
    return [s, *stats, *stats2]


bn_lif_forward = torch.library.custom_op("tetsnn::bn_lif_forward", mutates_args=())(_forward)


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
    ctx.mark_non_differentiable(*output[1:])   # statistics: no gradient flows back through them
    ctx.set_materialize_grads(False)
    _save(ctx, inputs, output)


def _save(ctx, inputs, output):
    (y, weight, bias, _, _, _, eps, y2, weight2, bias2, _, _, _, eps2, residual, T,
     tau, threshold, reset, detach_reset, surrogate, width, kernel) = inputs
    _, mean, invstd, _, _, mean2, invstd2, _, _ = output
    bits = None
    ctx.bits_dtype = y.dtype
    if residual is not None and y2 is None:
        bits = _pack_once(residual)   # 0/1 spikes: one bit each
        ctx.bits_dtype = residual.dtype
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


def _input_grad(grad_s: Tensor, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                invstd: Tensor, eps: float, y2: Optional[Tensor], weight2: Optional[Tensor],
                bias2: Optional[Tensor], mean2: Optional[Tensor], invstd2: Optional[Tensor], eps2: float,
                bits: Optional[Tensor], bits_dtype: torch.dtype, T: int, tau: float, threshold: float,
                reset: str, detach_reset: bool, surrogate: str, width: float, kernel: str) -> Tensor:
    """dL/dz ``[N, T, C, ...]`` of the neuron's input ``z`` from dL/ds and what the forward saved."""
    lif = (tau, threshold, reset, detach_reset, surrogate, width)
    if kernel == "triton":
        return _triton_backward(grad_s, y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits,
                                T, *lif)
    gz = _numba_backward(grad_s, y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits,
                         bits_dtype, T, *lif)
    if gz is None:
        n = y.shape[0] // T
        z = _recompute(y, weight, bias, eps, y2, weight2, bias2, eps2, bits, ([n, T, *y.shape[1:]], bits_dtype), n, T)
        gz = lif_input_grad(grad_s, z, *lif, kernel)
    return gz


bn_lif_backward = torch.library.custom_op("tetsnn::bn_lif_backward", mutates_args=())(_input_grad)


def _z_dtype(y, y2, bits, bits_dtype, kernel):
    """The dtype of the forward's ``z`` (the sum's promoted dtype; the Triton kernels work in y's)."""
    if kernel == "triton":
        return y.dtype
    return torch.promote_types(y.dtype, y2.dtype if y2 is not None else bits_dtype if bits is not None else y.dtype)


@bn_lif_backward.register_fake
def _(grad_s, y, weight, bias, mean, invstd, eps, y2, weight2, bias2, mean2, invstd2, eps2, bits, bits_dtype, T,
      tau, threshold, reset, detach_reset, surrogate, width, kernel):
    return y.new_empty((y.shape[0] // T, T, *y.shape[1:]), dtype=_z_dtype(y, y2, bits, bits_dtype, kernel))


def _grads(ctx, grads, input_grad):
    """The gradients of every input from dL/ds, with ``input_grad`` forming dL/dz (the op or its body)."""
    y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits = ctx.saved_tensors
    if grads[0] is None:   # the spikes took no part in the loss
        return (None,) * 23
    with torch.no_grad():
        gz = input_grad(grads[0], y, weight, bias, mean, invstd, ctx.eps[0], y2, weight2, bias2, mean2, invstd2,
                        ctx.eps[1], bits, ctx.bits_dtype, ctx.T, *ctx.lif)
        ni = ctx.needs_input_grad
        gy, gw, gb = _bn_grads(gz, y, weight, mean, invstd, ctx.eps[0], (ni[0], ni[1], ni[2]))
        gy2 = gw2 = gb2 = None
        if y2 is not None:
            gy2, gw2, gb2 = _bn_grads(gz, y2, weight2, mean2, invstd2, ctx.eps[1], (ni[7], ni[8], ni[9]))
        gr = gz if bits is not None and ni[14] else None
    return (gy, gw, gb, None, None, None, None, gy2, gw2, gb2, None, None, None, None, gr) + (None,) * 8


def _backward(ctx, grads):
    return _grads(ctx, grads, bn_lif_backward)


bn_lif_forward.register_autograd(_backward, setup_context=_setup_context)


class _BNLIFFunction(torch.autograd.Function):
    """The op's eager path: the same body and backward without the dispatcher's per-call handling of
    23 arguments (a third of a small layer's time on the CPU), returning the spikes alone and updating
    the running statistics (inputs that take no gradient) in place. torch.compile traces the op."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _save(ctx, inputs, output)
        _update_running(inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_s):
        return _grads(ctx, (grad_s,), _input_grad)


def _update_running(inputs, output):
    """Copy the op's new running statistics into the buffers it was given."""
    for old, new in ((inputs[3], output[3]), (inputs[4], output[4]), (inputs[10], output[7]), (inputs[11], output[8])):
        if old is not None:
            old.copy_(new)


# --------------------------------------------------------------------------- the numba backward (CPU)
# z rebuilt as torch's CPU batch_norm forms it, rounding as it does on this machine (module docstring)

_MODES = {}  # dtype -> True (fused multiply-add), False (separate roundings) or None (neither matches)


def _scale_shift_kernel(fused_madd: bool):
    """``a = invstd * weight`` and ``b = bias - mean * a`` per channel, rounded as ``fused_madd`` says."""
    numba = _numba()
    fma = _fma()

    @numba.njit
    def scale_shift(mean, invstd, weight, bias, a, b):
        for c in range(mean.shape[0]):
            a[c] = invstd[c] * weight[c]
            b[c] = fma(-mean[c], a[c], bias[c]) if fused_madd else bias[c] - mean[c] * a[c]
    return scale_shift


_SCALE_SHIFT = {}


def _scale_shift(mean, invstd, weight, bias, neurons: int, fused_madd: bool):
    """BatchNorm's per-channel scale and shift, repeated for every neuron of a channel (numpy)."""
    if fused_madd not in _SCALE_SHIFT:
        _SCALE_SHIFT[fused_madd] = _scale_shift_kernel(fused_madd)
    w = (torch.ones_like(mean) if weight is None else weight.detach()).numpy()   # no affine: 1 and 0
    b = (torch.zeros_like(mean) if bias is None else bias.detach()).numpy()
    mean, invstd = mean.numpy(), invstd.numpy()
    a_c, b_c = mean.copy(), mean.copy()
    _SCALE_SHIFT[fused_madd](mean, invstd, w, b, a_c, b_c)
    per = neurons // mean.shape[0]
    return a_c.repeat(per), b_c.repeat(per)


def _rebuild_mode(dtype):
    """How to rebuild torch's CPU batch_norm output for ``dtype`` (module docstring): True (one rounding,
    fused multiply-add), False (separate roundings) or None (neither reproduces it, or numba cannot)."""
    if dtype not in _MODES:
        _MODES[dtype] = _probe(dtype) if _use_numba(torch.empty(0, dtype=dtype)) else None
    return _MODES[dtype]


def _probe(dtype):
    """The first rounding that reproduces torch's kernel on random conv-like and linear-like input."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in ((6, 5, 3, 7), (40, 3)):
        y = torch.randn(shape, generator=g, dtype=dtype) * 3 + 1
        w, b = (torch.randn(shape[1], generator=g, dtype=dtype) for _ in range(2))
        cases.append((y, w, b, *_aten.native_batch_norm(y, w, b, None, None, True, 0.0, 1e-5)))
    for fused_madd in (True, False):
        try:
            if all(torch.equal(_rebuilt(y, w, b, mean, invstd, fused_madd), z) for y, w, b, z, mean, invstd in cases):
                return fused_madd
        except Exception:  # a numba that cannot build these kernels: torch's kernel runs again
            return None
    return None


def _rebuilt(y, w, b, mean, invstd, fused_madd):
    """``BN(y)`` of a ``[N, C, ...]`` input as the numba kernels rebuild it."""
    y3 = y.view(1, y.shape[0], -1)
    out = torch.empty_like(y3)
    src = (y3.numpy(), *_scale_shift(mean, invstd, w, b, y3.shape[2], fused_madd))
    _kernel(("values", "bn", fused_madd))(src, out.numpy(), _consts(y.dtype, 0.0, 0.0))
    return out.view(y.shape)


def _numba_backward(grad_s, y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits, bits_dtype,
                    T, tau, threshold, reset, detach_reset, surrogate, width):
    """dL/dz ``[N, T, C, ...]`` by the numba BPTT kernel reading ``z`` rebuilt from ``y`` (and ``y2`` or the
    residual bits) as it goes, or None where that kernel does not apply (the caller re-runs batch_norm)."""
    if not _use_numba(y) or _z_dtype(y, y2, bits, bits_dtype, "fused") != y.dtype:
        return None
    fused_madd = _rebuild_mode(y.dtype)
    if fused_madd is None:
        return None
    n = y.shape[0] // T
    shape = (n, T, *y.shape[1:])

    def operand(x, w, b, m, i):
        x3 = _as3d(x.view(shape))
        return (x3.numpy(), *_scale_shift(m, i, w, b, x3.shape[2], fused_madd))
    src = operand(y, weight, bias, mean, invstd)
    source = "bn"
    if y2 is not None:
        src, source = src + operand(y2, weight2, bias2, mean2, invstd2), "bn+bn"
    elif bits is not None:
        src, source = src + (bits.numpy(),), "bn+bits"
    gz = torch.empty(shape, dtype=y.dtype)
    gs = _as3d(grad_s.to(y.dtype))
    c = _consts(y.dtype, tau, threshold, surrogate, width)
    key = ("bwd", reset == "hard", detach_reset, surrogate, source, fused_madd)
    return gz if _call_numba(key, gs.numpy(), src, _as3d(gz).numpy(), c) else None


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
    inputs = (y, *_bn_args(bn), y2, *second, residual, T, neuron.tau, neuron.threshold, neuron.reset,
              neuron.detach_reset, neuron.surrogate_name, neuron.width or 1.0, kernel)
    if not torch.compiler.is_compiling():
        return _BNLIFFunction.apply(*inputs)
    output = bn_lif_forward(*inputs)
    with torch.no_grad():
        _update_running(inputs, output)
    return output[0]
