"""The fused LIF: the whole time loop in one call, no autograd graph, BPTT in one reverse loop.

Forward, per step t (``h`` is the pre-reset membrane)::

    h[t] = tau * u[t-1] + x[t]                  u[-1] = 0
    s[t] = H(h[t] - threshold)                  strict '>'
    u[t] = h[t] * (1 - s[t])                    hard reset
    u[t] = h[t] - threshold * s[t]              soft reset

Backward, with ``sg[t] = surrogate'(h[t] - threshold)``, ``gs[t] = dL/ds[t]`` from the output and
``gu[t] = dL/du[t]`` coming back from step t+1 (``gu[T-1] = 0``)::

    hard, attached:  gh[t] = (gs[t] - gu[t] * h[t]) * sg[t] + gu[t] * (1 - s[t])
    hard, detached:  gh[t] = gs[t] * sg[t] + gu[t] * (1 - s[t])
    soft, attached:  gh[t] = (gs[t] - gu[t] * threshold) * sg[t] + gu[t]
    soft, detached:  gh[t] = gs[t] * sg[t] + gu[t]
    dL/dx[t] = gh[t],   gu[t-1] = tau * gh[t]

The only tensor kept for backward is the input ``x``: the same bytes as one membrane per step
(half as many for float16 / bfloat16 inputs, which are integrated in float32), and it is in memory
already, so the forward writes nothing but spikes. Backward re-runs the forward recurrence block by
block (in cache) to get ``h``, then ``s[t]`` as ``h[t] - threshold > 0``. Each operation is the one
the per-step loop's autograd performs, in the same dtype and order, so the results agree bit for
bit wherever no fused multiply-add intervenes.

Kernels: ``"fused"`` runs a numba kernel (one pass over memory per direction, threads over
neurons) on CPU float32/float64 and the same loop in torch ops elsewhere (the numba kernels read
their input through a *source*, :func:`_load_kernel`: the input itself, or a BatchNorm output they
rebuild from its input as they go, for :mod:`tetsnn.kernels.bn_fused`); ``"triton"`` runs
:mod:`tetsnn.kernels.triton_lif`. Both are ``torch.library`` custom ops, so torch.compile can trace
models that use them (eager code calls their bodies through an ``autograd.Function``, which skips the
dispatcher's per-call argument handling). A user-callable surrogate goes through
:class:`FusedLIFCustom` instead.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Tuple

import torch
from torch import Tensor

from ..surrogate import SURROGATE_IDS, SURROGATES

__all__ = ["lif_fused", "FusedLIFCustom", "forward_torch", "backward_torch", "SURROGATE_IDS",
           "numba_available"]


def half_to_float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------- torch-op kernels

@torch.no_grad()
def forward_torch(x: Tensor, tau: float, threshold: float, hard: bool) -> Tuple[Tensor, Tensor]:
    """The forward recurrence in torch ops, without a graph: returns ``(s, h)``."""
    s, h = torch.empty_like(x), torch.empty_like(x)
    u = torch.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        ht = tau * u + x[:, t]
        st = (ht - threshold > 0).to(x.dtype)
        u = ht * (1 - st) if hard else ht - threshold * st
        h[:, t], s[:, t] = ht, st
    return s, h


@torch.no_grad()
def backward_torch(grad_s: Tensor, x: Tensor, tau: float, threshold: float, hard: bool,
                   detach_reset: bool, grad_fn: Callable) -> Tensor:
    """The reverse-time BPTT loop in torch ops, from the input ``x``; ``grad_fn(v)`` is ds/dv."""
    _, h = forward_torch(x, tau, threshold, hard)
    gx = torch.empty_like(h)
    gu = torch.zeros_like(h[:, 0])
    for t in reversed(range(h.shape[1])):
        ht = h[:, t]
        v = ht - threshold
        g = grad_s[:, t]
        if not detach_reset:
            g = g - gu * ht if hard else g - gu * threshold
        gh = g * grad_fn(v)
        gh = gh + gu * (1 - (v > 0).to(h.dtype)) if hard else gh + gu
        gx[:, t] = gh
        gu = tau * gh
    return gx


# --------------------------------------------------------------------------- numba kernels

_NUMBA = None  # the numba module once imported, False when numba is unusable
_KERNELS = {}  # (kind, *flags) -> numba kernel
_BLOCK = 2048  # neurons per numba work item


def _numba():
    global _NUMBA
    if _NUMBA is None:
        try:
            import numba
            _NUMBA = numba
        except ImportError:
            warnings.warn("numba is not installed: the 'fused' LIF backend runs its loop in torch ops "
                          "(about 2x slower)", RuntimeWarning, stacklevel=3)
            _NUMBA = False
    return _NUMBA


def _fma():
    """``fma(a, b, c)``: ``a * b + c`` rounded once, as a numba function (LLVM's ``llvm.fma``)."""
    numba = _numba()

    @numba.extending.intrinsic
    def fma(typingctx, a, b, c):
        return a(a, b, c), lambda context, builder, sig, args: builder.fma(*args)
    return fma


def _load_kernel(source: str, fused_madd: bool):
    """How a kernel reads its input ``x[n, t, m]`` from the arrays ``src`` (a tuple): ``rows(src, n, t,
    m0, w, c)`` takes the rows of step t for neurons ``m0 .. m0+w``, ``value(rows, i)`` gives neuron
    ``m0 + i``'s input from them. The sources:

    - ``"x"``: ``src = (x,)``, the input itself;
    - ``"bn"``: ``src = (y, a, b)``, BatchNorm's output ``y * a[m] + b[m]`` rebuilt from its input
      ``y`` and the per-neuron scale ``a`` and shift ``b`` (``fused_madd``: rounded once, by fma);
    - ``"bn+bn"``: ``src = (y, a, b, y2, a2, b2)``, the sum of two such outputs;
    - ``"bn+bits"``: ``src = (y, a, b, bits)``, one such output plus 0/1 spikes packed as bits
      (bit ``f % 8`` of byte ``f // 8`` for the flat index ``f`` of ``[n, t, m]``).
    """
    numba = _numba()
    fma = _fma()
    njit = numba.njit(inline="always")

    @njit
    def bn(y, a, b, i):
        return fma(y[i], a[i], b[i]) if fused_madd else y[i] * a[i] + b[i]

    if source == "x":
        @njit
        def rows(src, n, t, m0, w, c):
            return (src[0][n, t, m0:m0 + w],)

        @njit
        def value(r, i):
            return r[0][i]
    elif source == "bn":
        @njit
        def rows(src, n, t, m0, w, c):
            return src[0][n, t, m0:m0 + w], src[1][m0:m0 + w], src[2][m0:m0 + w]

        @njit
        def value(r, i):
            return bn(r[0], r[1], r[2], i)
    elif source == "bn+bn":
        @njit
        def rows(src, n, t, m0, w, c):
            return (src[0][n, t, m0:m0 + w], src[1][m0:m0 + w], src[2][m0:m0 + w],
                    src[3][n, t, m0:m0 + w], src[4][m0:m0 + w], src[5][m0:m0 + w])

        @njit
        def value(r, i):
            return bn(r[0], r[1], r[2], i) + bn(r[3], r[4], r[5], i)
    else:  # "bn+bits"
        @njit
        def rows(src, n, t, m0, w, c):
            f0 = (n * src[0].shape[1] + t) * src[0].shape[2] + m0   # the flat index of neuron m0
            return (src[0][n, t, m0:m0 + w], src[1][m0:m0 + w], src[2][m0:m0 + w], src[3][f0 >> 3:],
                    f0 & 7, c[2], c[3])

        @njit
        def value(r, i):
            k = r[4] + i
            return bn(r[0], r[1], r[2], i) + (r[6] if (r[3][k >> 3] >> (k & 7)) & 1 else r[5])
    return rows, value


def _values_kernel(source: str, fused_madd: bool):
    """``out[n, t, :]`` = the input a kernel reads through :func:`_load_kernel` (for checks)."""
    numba, np = _numba(), __import__("numpy")
    rows, value = _kernel(("load", source, fused_madd))

    @numba.njit
    def values(src, out, c):
        for n in range(out.shape[0]):
            for t in range(out.shape[1]):
                r = rows(src, n, t, 0, out.shape[2], c)
                for i in range(out.shape[2]):
                    out[n, t, i] = value(r, i)
    return values


def _integrate_kernel(hard: bool, source: str, fused_madd: bool):
    """The forward recurrence of one reset mode, for one block of neurons (inlined below), reading
    its input through :func:`_load_kernel`; ``c = [tau, threshold, 0, 1, ...]`` in the input's dtype."""
    numba, np = _numba(), __import__("numpy")
    rows, value = _kernel(("load", source, fused_madd))

    @numba.njit(inline="always")
    def integrate(src, n, m0, w, c, out, to_h):
        # the recurrence for neurons m0 .. m0+w of sample n: spikes into out[n, t, m0 + i], or
        # (to_h) pre-reset membranes into out[t, i]
        tau, th, zero, one = c[0], c[1], c[2], c[3]  # locals, so the loop vectorises
        u = np.zeros(w, c.dtype)
        for t in range(src[0].shape[1]):
            xt = rows(src, n, t, m0, w, c)
            ot = out[t] if to_h else out[n, t, m0:m0 + w]
            for i in range(w):
                ht = tau * u[i] + value(xt, i)
                st = one if ht - th > zero else zero
                ot[i] = ht if to_h else st
                u[i] = ht * (one - st) if hard else ht - th * st
    return integrate


def _forward_kernel(hard: bool):
    """The numba forward: spikes only, threads over blocks of neurons."""
    numba = _numba()
    integrate = _kernel(("integrate", hard, "x", False))

    @numba.njit(parallel=True)
    def fwd(src, s, c):
        n_, t_, m_ = src[0].shape
        nb = (m_ + _BLOCK - 1) // _BLOCK
        for job in numba.prange(n_ * nb):
            n, m0 = job // nb, (job % nb) * _BLOCK
            integrate(src, n, m0, min(_BLOCK, m_ - m0), c, s, False)
    return fwd


def _backward_kernel(hard: bool, detach: bool, surrogate: str, source: str = "x", fused_madd: bool = False):
    """The numba BPTT loop; ``c = [tau, threshold, 0, 1, width, k]`` in the membrane's dtype, with
    ``k = (1/width)^2`` for zif and ``pi/2 * width`` for atan (the constants the torch ops use)."""
    numba, np = _numba(), __import__("numpy")
    kind = SURROGATE_IDS[surrogate]
    integrate = _kernel(("integrate", hard, source, fused_madd))

    @numba.njit(inline="always")
    def grad(v, zero, one, width, k):
        if kind == 0:
            a = width - abs(v)
            return (a if a > zero else zero) * k
        if kind == 1:
            sg = one / (one + np.exp(-(width * v)))
            return width * sg * (one - sg)
        z = k * v
        return (width / (one + one)) / (one + z * z)

    @numba.njit(parallel=True)
    def bwd(gs, src, gx, c):
        n_, t_, m_ = src[0].shape
        nb = (m_ + _BLOCK - 1) // _BLOCK
        for job in numba.prange(n_ * nb):
            n, m0 = job // nb, (job % nb) * _BLOCK
            w = min(_BLOCK, m_ - m0)
            h = np.empty((t_, w), c.dtype)
            integrate(src, n, m0, w, c, h, True)
            tau, th, zero, one, width, k = c[0], c[1], c[2], c[3], c[4], c[5]
            gu = np.zeros(w, c.dtype)
            for t in range(t_ - 1, -1, -1):
                ht_, gs_, gx_ = h[t], gs[n, t, m0:m0 + w], gx[n, t, m0:m0 + w]
                for i in range(w):
                    ht = ht_[i]
                    v = ht - th
                    g = gs_[i]
                    if not detach:
                        g = g - gu[i] * ht if hard else g - gu[i] * th
                    gh = g * grad(v, zero, one, width, k)
                    gh = gh + gu[i] * (one - (one if v > zero else zero)) if hard else gh + gu[i]
                    gx_[i] = gh
                    gu[i] = tau * gh
    return bwd


def _kernel(key):
    """The numba kernel ``key = (kind, *flags)``, built on first use (compiled on its first call)."""
    if key not in _KERNELS:
        build = {"load": _load_kernel, "values": _values_kernel, "integrate": _integrate_kernel,
                 "fwd": _forward_kernel, "bwd": _backward_kernel}[key[0]]
        _KERNELS[key] = build(*key[1:])
    return _KERNELS[key]


def numba_available() -> bool:
    return bool(_numba())


def _use_numba(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and numba_available()


def _consts(dtype, tau, threshold, surrogate="zif", width=1.0):
    k = (1.0 / width) ** 2 if surrogate == "zif" else math.pi / 2 * width
    return torch.tensor([tau, threshold, 0.0, 1.0, width, k], dtype=dtype).numpy()


def _as3d(t: Tensor) -> Tensor:
    return t.contiguous().view(t.shape[0], t.shape[1], -1)


def _call_numba(key, *args):
    try:
        _kernel(key)(*args)
    except Exception as e:  # a failed compile leaves the torch-op kernels in charge
        global _NUMBA
        _NUMBA = False
        warnings.warn(f"the numba LIF kernel failed ({type(e).__name__}: {e}); falling back to torch ops",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


# --------------------------------------------------------------------------- custom ops

def _spikes(x: Tensor, tau: float, threshold: float, hard: bool, kernel: str) -> Tensor:
    """Spikes of a float32/float64 input, by ``kernel``."""
    if kernel == "triton":
        from . import triton_lif
        return triton_lif.forward(x, tau, threshold, hard)
    if _use_numba(x):
        x3 = _as3d(x)
        s = torch.empty_like(x3)
        if _call_numba(("fwd", hard), (x3.numpy(),), s.numpy(), _consts(x.dtype, tau, threshold)):
            return s.view(x.shape)
    return forward_torch(x, tau, threshold, hard)[0]


def _input_grad(grad_s: Tensor, x: Tensor, tau: float, threshold: float, hard: bool, detach_reset: bool,
                surrogate: str, width: float, kernel: str) -> Tensor:
    """dL/dx of a float32/float64 input, by ``kernel``."""
    if kernel == "triton":
        from . import triton_lif
        return triton_lif.backward(grad_s, x, tau, threshold, hard, detach_reset, surrogate, width)
    if _use_numba(x):
        gx = torch.empty(x.shape, dtype=x.dtype)
        c = _consts(x.dtype, tau, threshold, surrogate, width)
        args = (_as3d(grad_s).numpy(), (_as3d(x).numpy(),), _as3d(gx).numpy(), c)
        if _call_numba(("bwd", hard, detach_reset, surrogate, "x", False), *args):
            return gx
    grad = SURROGATES[surrogate][1]          # the built-in ds/dv of that name
    return backward_torch(grad_s, x, tau, threshold, hard, detach_reset, lambda v: grad(v, width))


def lif_spikes(x: Tensor, tau: float, threshold: float, reset: str, detach_reset: bool,
               surrogate: str, width: float, kernel: str) -> Tensor:
    """Spikes of an ``[N, T, ...]`` input, in its dtype (half inputs are integrated in float32)."""
    # the kernels work on a contiguous copy of a strided input (channels_last, a time slice, ...)
    return _spikes(half_to_float(x).contiguous(), tau, threshold, reset == "hard", kernel).to(x.dtype)


lif_forward = torch.library.custom_op("tetsnn::lif_forward", mutates_args=())(lif_spikes)


@lif_forward.register_fake
def _(x, tau, threshold, reset, detach_reset, surrogate, width, kernel):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)   # contiguous, as the kernels return


def lif_input_grad(grad_s: Tensor, x: Tensor, tau: float, threshold: float, reset: str, detach_reset: bool,
                   surrogate: str, width: float, kernel: str) -> Tensor:
    """dL/dx from dL/ds and the saved input ``x``, in x's dtype (BPTT in float32 for half inputs)."""
    xs = half_to_float(x).contiguous()
    gs = grad_s.to(xs.dtype).contiguous()
    gx = _input_grad(gs, xs, tau, threshold, reset == "hard", detach_reset, surrogate, width, kernel)
    return gx.to(x.dtype)


lif_backward = torch.library.custom_op("tetsnn::lif_backward", mutates_args=())(lif_input_grad)


@lif_backward.register_fake
def _(grad_s, x, tau, threshold, reset, detach_reset, surrogate, width, kernel):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)   # contiguous, as the kernels return


def _setup_context(ctx, inputs, output):
    x, tau, threshold, reset, detach_reset, surrogate, width, kernel = inputs
    ctx.save_for_backward(x)
    ctx.args = (tau, threshold, reset, detach_reset, surrogate, width, kernel)


def _backward(ctx, grad_s):
    (x,) = ctx.saved_tensors
    return (lif_backward(grad_s, x, *ctx.args),) + (None,) * 7


lif_forward.register_autograd(_backward, setup_context=_setup_context)


class _LIFFunction(torch.autograd.Function):
    """The op's eager path: the same body and context without the dispatcher's per-call argument
    handling (about 50 us a call on the CPU); torch.compile traces the op itself."""

    @staticmethod
    def forward(ctx, *inputs):
        _setup_context(ctx, inputs, None)
        return lif_spikes(*inputs)

    @staticmethod
    def backward(ctx, grad_s):
        (x,) = ctx.saved_tensors
        return (lif_input_grad(grad_s, x, *ctx.args),) + (None,) * 7


class FusedLIFCustom(torch.autograd.Function):
    """The fused LIF with a user-callable surrogate ``fn(v) -> ds/dv`` (torch-op kernels)."""

    @staticmethod
    def forward(ctx, x, tau, threshold, hard, detach_reset, fn):
        ctx.save_for_backward(x)
        ctx.args = (tau, threshold, hard, detach_reset, fn)
        return forward_torch(half_to_float(x), tau, threshold, hard)[0].to(x.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        (x,) = ctx.saved_tensors
        xs = half_to_float(x)
        gx = backward_torch(grad_s.to(xs.dtype).contiguous(), xs, *ctx.args)
        return (gx.to(x.dtype),) + (None,) * 5


def lif_fused(x: Tensor, tau: float, threshold: float, reset: str = "hard", detach_reset: bool = False,
              surrogate="zif", width: float = 1.0, kernel: str = "fused") -> Tensor:
    """Spikes of ``[N, T, ...]`` input ``x`` by the fused kernels (``kernel`` "fused" or "triton").

    ``surrogate`` is a built-in name (with its ``width``) or a callable ``v -> ds/dv`` ("fused" only).
    float16 / bfloat16 inputs are integrated in float32 and kept for backward as they are; spikes
    and gradients come back in the input's dtype.
    """
    if not callable(surrogate):
        op = lif_forward if torch.compiler.is_compiling() else _LIFFunction.apply
        return op(x, tau, threshold, reset, detach_reset, surrogate, width, kernel)
    if kernel != "fused":
        raise ValueError(f"the {kernel!r} LIF backend supports the surrogates {sorted(SURROGATE_IDS)}, "
                         f"not a callable; use backend='fused' or 'loop'")
    return FusedLIFCustom.apply(x, tau, threshold, reset == "hard", detach_reset, surrogate)
