"""Surrogate spike functions: the Heaviside spike ``s = H(v)``, ``v = u - threshold``, forward, and
a smooth stand-in for its derivative ds/dv backward.

- ``zif`` (TET's triangle): ``(1/gamma)^2 * max(0, gamma - |v|)``, default gamma = 1;
- ``sigmoid``: ``alpha * sig(alpha v) * (1 - sig(alpha v))``, default alpha = 4;
- ``atan``: ``alpha / 2 / (1 + (pi/2 * alpha * v)^2)``, default alpha = 2;
- or any callable ``v -> ds/dv``.

Each built-in surrogate is written here once in each language that runs it, side by side: the torch
form (``*_grad``), the scalar form the numba kernels compile (:func:`numba_grad`) and the Triton form
(:func:`triton_grad`, built by :func:`triton_surrogate` on first use so that importing tetsnn never
imports triton). The kernels read the width ``w`` and the derived constant
``k = surrogate_constant(name, w)`` from the one constant array of :mod:`tetsnn.neuron.spec`.
The neurons (:mod:`tetsnn.neuron`) and the kernels (:mod:`tetsnn.kernels`) both read this table.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import numpy as np
import torch

__all__ = ["ZIF", "SigmoidSpike", "AtanSpike", "CustomSpike", "zif", "sigmoid_spike", "atan_spike",
           "zif_grad", "sigmoid_grad", "atan_grad", "SURROGATES", "SURROGATE_IDS", "resolve_surrogate",
           "surrogate_constant", "numba_grad", "numba_surrogate", "triton_surrogate"]

# Each surrogate is the derivative ds/dv of the spike s = H(v), v = u - threshold.

def zif_grad(v: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Triangle of height 1/gamma and half-width gamma: (1/gamma)^2 * max(0, gamma - |v|)."""
    return (gamma - v.abs()).clamp_min(0) * (1.0 / gamma) ** 2


def sigmoid_grad(v: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """alpha * sig(alpha v) * (1 - sig(alpha v))."""
    sg = torch.sigmoid(alpha * v)
    return alpha * sg * (1 - sg)


def atan_grad(v: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """alpha / 2 / (1 + (pi/2 * alpha * v)^2)."""
    return (alpha / 2) / (1 + (math.pi / 2 * alpha * v) ** 2)


class _Spike(torch.autograd.Function):
    """Heaviside forward ``(v > 0)``; backward multiplies by ``grad_fn(v, width)``."""

    grad_fn: Callable = None

    @classmethod
    def forward(cls, ctx, v, width):
        ctx.save_for_backward(v)
        ctx.width = width
        return (v > 0).to(v.dtype)

    @classmethod
    def backward(cls, ctx, grad_out):
        (v,) = ctx.saved_tensors
        return grad_out * cls.grad_fn(v, ctx.width), None


class ZIF(_Spike):
    """Spike with TET's triangle surrogate: ``ZIF.apply(v, gamma)``."""
    grad_fn = staticmethod(zif_grad)


class SigmoidSpike(_Spike):
    """Spike with the sigmoid-derivative surrogate: ``SigmoidSpike.apply(v, alpha)``."""
    grad_fn = staticmethod(sigmoid_grad)


class AtanSpike(_Spike):
    """Spike with the arctan surrogate: ``AtanSpike.apply(v, alpha)``."""
    grad_fn = staticmethod(atan_grad)


class CustomSpike(torch.autograd.Function):
    """Spike whose backward is a user callable ``fn(v) -> ds/dv``: ``CustomSpike.apply(v, fn)``."""

    @staticmethod
    def forward(ctx, v, fn):
        ctx.save_for_backward(v)
        ctx.fn = fn
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (v,) = ctx.saved_tensors
        return grad_out * ctx.fn(v), None


def zif(v: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Spikes ``(v > 0)`` with TET's triangle surrogate (:func:`zif_grad`) in backward."""
    return ZIF.apply(v, gamma)


def sigmoid_spike(v: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Spikes ``(v > 0)`` with the sigmoid-derivative surrogate (:func:`sigmoid_grad`) in backward."""
    return SigmoidSpike.apply(v, alpha)


def atan_spike(v: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Spikes ``(v > 0)`` with the arctan surrogate (:func:`atan_grad`) in backward."""
    return AtanSpike.apply(v, alpha)


# name -> (spike Function, surrogate derivative, default width)
SURROGATES = {
    "zif": (ZIF, zif_grad, 1.0),
    "sigmoid": (SigmoidSpike, sigmoid_grad, 4.0),
    "atan": (AtanSpike, atan_grad, 2.0),
}


def resolve_surrogate(surrogate: Union[str, Callable], gamma: float = 1.0, alpha=None):
    """Return ``(name, width, spike_fn, grad_fn)`` for a surrogate name or a callable.

    ``spike_fn(v)`` is the Heaviside with that surrogate backward; ``grad_fn(v)`` is ds/dv.
    For "zif" the width is ``gamma``; for "sigmoid" and "atan" it is ``alpha``.
    A callable is used as ds/dv directly (name "custom", width None).
    """
    if callable(surrogate):
        fn = surrogate
        return "custom", None, (lambda v: CustomSpike.apply(v, fn)), fn
    if surrogate not in SURROGATES:
        raise ValueError(
            f"unknown surrogate {surrogate!r}: expected one of {sorted(SURROGATES)} or a callable v -> ds/dv")
    cls, grad, default = SURROGATES[surrogate]
    if surrogate == "zif":
        width = float(gamma)
    else:
        width = float(default if alpha is None else alpha)
    if not width > 0:
        raise ValueError(f"surrogate width must be > 0, got {width} for {surrogate!r}")
    return surrogate, width, (lambda v: cls.apply(v, width)), (lambda v: grad(v, width))


# the kernels' integer code of each built-in surrogate
SURROGATE_IDS = {"zif": 0, "sigmoid": 1, "atan": 2}


def surrogate_constant(name: str, width: float) -> float:
    """The constant ``k`` the kernel forms use: ``(1/w)^2`` for zif, ``pi/2 * w`` for atan (and sigmoid,
    which does not read it), formed as the torch forms form them."""
    return (1.0 / width) ** 2 if name == "zif" else math.pi / 2 * width


# --------------------------------------------------------------------------- kernel forms
# The same three derivatives as scalar code. ``zero`` and ``one`` come from the constant array, so a
# float32 kernel computes in float32 as the torch forms do.

def numba_grad(v, kind, w, k, zero, one):
    """ds/dv of surrogate ``kind`` (SURROGATE_IDS) at ``v``: the numba kernels inline this function
    (compiled through :func:`numba_surrogate`)."""
    if kind == 0:    # zif: (1/w)^2 * max(0, w - |v|)
        a = w - abs(v)
        return (a if a > zero else zero) * k
    if kind == 1:    # sigmoid: w * sig(w v) * (1 - sig(w v))
        return numba_sigmoid(w * v, w, one)
    z = k * v        # atan: (w/2) / (1 + (pi/2 w v)^2)
    return (w / (one + one)) / (one + z * z)


def numba_sigmoid(z, w, one):
    """``w * sig(z) * (1 - sig(z))`` at ``z = w v`` in float64, as the torch form computes it. In float32
    the kernels compile :func:`_sigmoid32` instead (:func:`numba_surrogate` registers it)."""
    sg = one / (one + math.exp(-z))
    return w * sg * (one - sg)


# float32 constants of _exp32: log2(e); ln 2 in two parts (_LN2_HI has 9 significant bits, so n * _LN2_HI is
# exact); the lowest argument with a nonzero result; 1.5 * 2^23 (adding it rounds |t| < 2^22 to an
# integer, kept in the low bits); 2^-64; Cephes' expf polynomial
_LOG2E, _LN2_HI, _LN2_LO, _LOW, _ROUND, _TWO_M64 = (np.float32(c) for c in (
    1.4426950408889634, 0.693359375, -2.12194440e-4, -104.0, 12582912.0, 2.0 ** -64))
_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                   1.6666665459e-1, 5.0000001201e-1))


def _exp32(x, one):
    """``exp(x)`` of a float32 ``x <= 0`` (or nan) in operations LLVM vectorises (``math.exp`` is a scalar
    libm call): ``x = n ln2 + r``, ``|r| <= ln2 / 2``, ``exp(r)`` by a degree-7 polynomial, ``2^n`` from
    exponent bits. Within one ulp of the exact value (tests/test_surrogate_exp.py), whether or not the
    target fuses the multiply-adds (``_madd``: LLVM's ``fmuladd``); ``x < -104`` gives 0, nan stays nan."""
    x = x if not x < _LOW else _LOW                # not (x < _LOW): nan passes through
    t = _madd(x, _LOG2E, _ROUND)                   # t = _ROUND + n, n = round(x / ln2) in [-150, 0]
    fn = t - _ROUND
    r = _madd(-fn, _LN2_LO, _madd(-fn, _LN2_HI, x))
    p0, p1, p2, p3, p4, p5 = _P
    p = _madd(_madd(_madd(_madd(_madd(_madd(p0, r, p1), r, p2), r, p3), r, p4), r, p5), r * r, r) + one
    # 2^n = 2^(n + 64) * 2^-64: the first a normal float, exponent bits n + 64 + 127 (t's bits are _ROUND's
    # plus n, and _ROUND's leave the int32 in the shift), so a subnormal result rounds once
    return (p * _as_float((_as_int(t) + 191) << 23)) * _TWO_M64


def _sigmoid32(z, w, one):
    """:func:`numba_sigmoid` in float32: ``sig(-|z|) = e / (1 + e)``, ``e = exp(-|z|)`` by :func:`_exp32`
    (the derivative is even in z; on this side neither ``1 - sig`` cancels nor exp overflows)."""
    e = _exp32(-abs(z), one)
    sg = e / (one + e)
    return w * sg * (one - sg)


def _numba_intrinsics(numba):
    """The LLVM operations :func:`_exp32` needs that numba has no spelling for: ``_as_int`` / ``_as_float``
    (float32 <-> int32 bit casts) and ``_madd(a, b, c)`` (``a * b + c``, fused where the target has FMA)."""
    import llvmlite.ir
    from numba import types

    def bitcast(src, dst):
        @numba.extending.intrinsic
        def cast(typingctx, a):
            return dst(src), lambda context, builder, sig, args: builder.bitcast(args[0],
                                                                               context.get_value_type(dst))
        return cast

    @numba.extending.intrinsic
    def madd(typingctx, a, b, c):
        def codegen(context, builder, sig, args):
            ty = args[0].type
            f = builder.module.declare_intrinsic("llvm.fmuladd", [ty], llvmlite.ir.FunctionType(ty, [ty] * 3))
            return builder.call(f, args)
        return a(a, b, c), codegen
    return dict(_as_int=bitcast(types.float32, types.int32), _as_float=bitcast(types.int32, types.float32),
                _madd=madd)


_NUMBA = []


def numba_surrogate():
    """:func:`numba_grad` as an inlined ``numba.njit`` function, with :func:`numba_sigmoid` compiled as
    :func:`_sigmoid32` for float32 (imports numba on first call)."""
    if not _NUMBA:
        import numba
        from numba import types
        globals().update(_numba_intrinsics(numba))
        overload = numba.extending.overload
        overload(_exp32, inline="always")(lambda x, one: _exp32)
        overload(numba_sigmoid, inline="always")(
            lambda z, w, one: _sigmoid32 if z == types.float32 else numba_sigmoid)
        _NUMBA.append(numba.njit(inline="always")(numba_grad))
    return _NUMBA[0]


def _triton_grad(v, w, k, KIND: tl.constexpr):  # noqa: F821 - tl is bound by triton_surrogate()
    if KIND == 0:  # zif
        g = tl.maximum(w - tl.abs(v), 0.0) * k  # noqa: F821
    elif KIND == 1:  # sigmoid
        sg = 1 / (1 + tl.exp(-(w * v)))  # noqa: F821
        g = w * sg * (1 - sg)
    else:  # atan
        z = k * v
        g = (w / 2) / (1 + z * z)
    return g


_TRITON = []


def triton_surrogate():
    """:func:`_triton_grad` as a ``triton.jit`` function (imports triton on first call)."""
    if not _TRITON:
        import triton
        import triton.language
        globals()["tl"] = triton.language
        _TRITON.append(triton.jit(_triton_grad))
    return _TRITON[0]
