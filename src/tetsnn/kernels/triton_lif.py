"""The neuron recurrence as Triton kernels: one program per block of neurons, the loop over T inside.

Same recurrences as the numba kernels (:mod:`tetsnn.kernels.ops` derives the backward), and the same
saved tensor (the input). The forward reads ``x`` and writes ``s``; the backward first re-runs the
recurrence writing ``h`` into its output buffer, then walks back in time overwriting it with
``dL/dx``. Neuron ``i`` of a contiguous ``[N, T, M]`` tensor (``M`` = the product of the trailing
dims) lives at ``n*T*M + t*M + m`` with ``n = i // M, m = i % M``, so each program reads and writes
contiguous runs of ``BLOCK`` values per step. Scalars come from the constant array of
:mod:`tetsnn.neuron.spec` in the compute dtype, so float64 inputs use float64 constants exactly as
the torch ops do; the input scale (1, or ``1 - decay`` with decay_input) multiplies the input in
every case (exact for 1). ``ILIF`` (constexpr) selects the integer-count neuron. With a nonzero
``grad_decay`` the backward also writes each neuron's dL/d decay into ``gd``. On the CPU the kernels
run under ``TRITON_INTERPRET=1`` (set it before this module is imported).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..neuron.spec import C_DECAY, C_INPUT, C_K, C_LEVELS, C_ONE, C_THRESHOLD, C_WIDTH, C_ZERO
from ..surrogate import SURROGATE_IDS, triton_surrogate

__all__ = ["fire", "bptt", "input_at", "consts", "check_device", "forward", "backward", "BLOCK", "AOT_VARIANTS"]

BLOCK = 1024
surrogate_grad = triton_surrogate()

_C_DECAY, _C_THRESHOLD, _C_WIDTH, _C_K, _C_INPUT, _C_LEVELS, _C_ONE, _C_ZERO = (tl.constexpr(v) for v in (
    C_DECAY, C_THRESHOLD, C_WIDTH, C_K, C_INPUT, C_LEVELS, C_ONE, C_ZERO))


@triton.jit
def fire(h, th, levels, HARD: tl.constexpr, ILIF: tl.constexpr):
    """Spike and reset of one step: ``(s, u)`` from the pre-reset membrane ``h``."""
    if ILIF:
        q = tl.minimum(tl.maximum(h / th, 0.0), levels)
        s = _rint(q)
        u = h - th * s
    else:
        s = tl.where(h - th > 0, 1.0, 0.0).to(h.dtype)
        if HARD:
            u = h * (1 - s)
        else:
            u = h - th * s
    return s, u


@triton.jit
def _rint(q):
    """Round half to even (torch.round) of a value in [0, levels]."""
    f = tl.floor(q)
    d = q - f
    odd = (f - 2 * tl.floor(f * 0.5)) != 0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1, f).to(q.dtype)


@triton.jit
def consts(c_ptr):
    """``(decay, threshold, width, k, input scale, levels)`` from the constant array."""
    return (tl.load(c_ptr + _C_DECAY), tl.load(c_ptr + _C_THRESHOLD), tl.load(c_ptr + _C_WIDTH),
            tl.load(c_ptr + _C_K), tl.load(c_ptr + _C_INPUT), tl.load(c_ptr + _C_LEVELS))


@triton.jit
def _integrate(x_ptr, out_ptr, c_ptr, n_neurons, T, M, HARD: tl.constexpr, STORE_H: tl.constexpr,
               BLOCK: tl.constexpr, ILIF: tl.constexpr):
    """The forward recurrence; stores the spikes, or (STORE_H) the pre-reset membranes."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_neurons
    base = (i // M) * T * M + i % M
    decay, th, w, k, cin, levels = consts(c_ptr)
    u = tl.zeros([BLOCK], dtype=decay.dtype)
    for t in range(T):
        at = base + t * M
        h = decay * u + cin * tl.load(x_ptr + at, mask=mask, other=0.0)
        s, u = fire(h, th, levels, HARD, ILIF)
        if STORE_H:
            tl.store(out_ptr + at, h, mask=mask)
        else:
            tl.store(out_ptr + at, s, mask=mask)


@triton.jit
def _bptt_step(h, g, gu, th, w, k, levels, HARD: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr,
               ILIF: tl.constexpr):
    """dL/dh[t] of one reverse-time step from dL/ds[t] (``g``), dL/du[t] (``gu``) and the pre-reset
    membrane ``h``."""
    if ILIF:
        q = h / th
        if not DETACH:
            g = g - gu * th
        gh = tl.where((q >= 0) & (q <= levels), g / th, 0.0).to(h.dtype) + gu
    else:
        v = h - th
        if not DETACH:
            if HARD:
                g = g - gu * h
            else:
                g = g - gu * th
        gh = g * surrogate_grad(v, w, k, KIND)
        if HARD:
            gh = gh + gu * (1 - tl.where(v > 0, 1.0, 0.0).to(h.dtype))
        else:
            gh = gh + gu
    return gh


@triton.jit
def _lif_bwd(gs_ptr, gx_ptr, c_ptr, x_ptr, gd_ptr, n_neurons, T, M, grad_decay, HARD: tl.constexpr,
             DETACH: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr, ILIF: tl.constexpr):
    """Reverse-time BPTT reading the membranes from gx (where _integrate put them), writing dL/dx."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_neurons
    one, zero = tl.load(c_ptr + _C_ONE), tl.load(c_ptr + _C_ZERO)   # input_at(x) = fma(x, 1, 0) = x
    acc = bptt(gs_ptr, gx_ptr, c_ptr, (i // M) * T * M + i % M, mask, T, M, x_ptr, x_ptr, x_ptr, one, zero, one,
               zero, grad_decay, HARD, DETACH, KIND, 0, False, BLOCK, ILIF)
    if grad_decay != 0:
        tl.store(gd_ptr + i, acc, mask=mask)


@triton.jit
def input_at(y_ptr, y2_ptr, r_ptr, at, mask, alpha, beta, alpha2, beta2, RES: tl.constexpr, BITS: tl.constexpr):
    """The neuron's input at step offsets ``at``, in alpha's dtype: ``fma(y, alpha, beta)`` (a BatchNorm's
    output; ``y`` itself for alpha 1, beta 0), plus with RES == 1 the residual ``r`` (0/1 spikes packed
    as bits where BITS, values otherwise), or with RES == 2 a second ``fma(y2, alpha2, beta2)``. Each
    BatchNorm output and the residual sum are rounded to y's dtype first, as the unfused modules store
    them (a no-op for float32 and float64; for bfloat16 / float16 the neuron then integrates exactly
    the values the unfused path hands it)."""
    yt = y_ptr.dtype.element_ty
    z = tl.fma(tl.load(y_ptr + at, mask=mask, other=0.0).to(alpha.dtype), alpha, beta).to(yt).to(alpha.dtype)
    if RES == 1:
        if BITS:
            byte = tl.load(r_ptr + at // 8, mask=mask, other=0).to(tl.int32)
            z = z + ((byte >> (at % 8).to(tl.int32)) & 1).to(alpha.dtype)
        else:
            z = z + tl.load(r_ptr + at, mask=mask, other=0.0).to(alpha.dtype)
        z = z.to(yt).to(alpha.dtype)
    elif RES == 2:
        z2 = tl.fma(tl.load(y2_ptr + at, mask=mask, other=0.0).to(alpha.dtype), alpha2, beta2).to(yt)
        z = (z + z2.to(alpha.dtype)).to(yt).to(alpha.dtype)
    return z


@triton.jit
def bptt(gs_ptr, g_ptr, c_ptr, base, mask, T, M, y_ptr, y2_ptr, r_ptr, alpha, beta, alpha2, beta2, grad_decay,
         HARD: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr, RES: tl.constexpr, BITS: tl.constexpr,
         BLOCK: tl.constexpr, ILIF: tl.constexpr):
    """Reverse-time BPTT over the neurons at offsets ``base`` (+ t*M): reads the pre-reset membranes
    from g_ptr and overwrites them with dL/dx (the input scale applied); returns each neuron's
    dL/d decay where ``grad_decay``, zeros otherwise. With decay_input that needs the input at each
    step, formed by :func:`input_at` from the operands after ``M`` (the input itself, or a BatchNorm's
    output rebuilt from its conv output: never written)."""
    decay, th, w, k, cin, levels = consts(c_ptr)
    gu = tl.zeros([BLOCK], dtype=decay.dtype)
    acc = tl.zeros([BLOCK], dtype=decay.dtype)
    for j in range(T):
        t = T - 1 - j
        at = base + t * M
        h = tl.load(g_ptr + at, mask=mask, other=0.0)
        gh = _bptt_step(h, tl.load(gs_ptr + at, mask=mask, other=0.0).to(h.dtype), gu, th, w, k, levels, HARD,
                        DETACH, KIND, ILIF)
        if grad_decay != 0:   # dh[t]/d decay = u[t-1] (- x[t] with decay_input, i.e. cin != 1)
            up = tl.zeros([BLOCK], dtype=decay.dtype)
            if t > 0:
                hp = tl.load(g_ptr + at - M, mask=mask, other=0.0)
                sp, up = fire(hp, th, levels, HARD, ILIF)
            if cin != 1:
                up = up - input_at(y_ptr, y2_ptr, r_ptr, at, mask, alpha, beta, alpha2, beta2, RES, BITS)
            acc += gh * up
        tl.store(g_ptr + at, gh * cin, mask=mask)
        gu = decay * gh
    return acc


# Every (kernel, signature, constexprs) the functions below can launch, for ahead-of-time compile
# checks: the compute dtype (float32, or float64; half inputs arrive as float32) and every flag.
def _aot_variants():
    out = []
    for d in ("fp32", "fp64"):
        for hard, ilif in ((True, False), (False, False), (False, True)):
            for store_h in (True, False):
                sig = {"x_ptr": f"*{d}", "out_ptr": f"*{d}", "c_ptr": f"*{d}", "n_neurons": "i32", "T": "i32",
                       "M": "i32", "HARD": "constexpr", "STORE_H": "constexpr", "BLOCK": "constexpr",
                       "ILIF": "constexpr"}
                out.append((_integrate, sig, {"HARD": hard, "STORE_H": store_h, "BLOCK": BLOCK, "ILIF": ilif}))
            for detach in (True, False):
                for kind in (SURROGATE_IDS.values() if not ilif else (0,)):
                    sig = {"gs_ptr": f"*{d}", "gx_ptr": f"*{d}", "c_ptr": f"*{d}", "x_ptr": f"*{d}",
                           "gd_ptr": f"*{d}", "n_neurons": "i32", "T": "i32", "M": "i32", "grad_decay": "i32",
                           "HARD": "constexpr", "DETACH": "constexpr", "KIND": "constexpr", "BLOCK": "constexpr",
                           "ILIF": "constexpr"}
                    out.append((_lif_bwd, sig, {"HARD": hard, "DETACH": detach, "KIND": kind, "BLOCK": BLOCK,
                                                "ILIF": ilif}))
    return out


AOT_VARIANTS = _aot_variants()


def _geometry(x: Tensor):
    n, t = x.shape[:2]
    m = x.numel() // max(n * t, 1)
    return n * m, t, m, (triton.cdiv(n * m, BLOCK),)


def check_device(x: Tensor) -> None:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the 'triton' LIF backend needs a CUDA tensor (got one on {x.device}) or "
                         f"TRITON_INTERPRET=1 set before tetsnn.kernels.triton_lif is imported")


def forward(x: Tensor, c: Tensor, hard: bool, ilif: bool = False) -> Tensor:
    """Spikes of a float ``[N, T, ...]`` input; ``c`` is the constant array on x's device."""
    check_device(x)
    x = x.contiguous()
    s = torch.empty_like(x)
    if x.numel():
        neurons, t, m, grid = _geometry(x)
        _integrate[grid](x, s, c, neurons, t, m, HARD=hard, STORE_H=False, BLOCK=BLOCK, ILIF=ilif)
    return s


def backward(grad_s: Tensor, x: Tensor, c: Tensor, hard: bool, detach_reset: bool, surrogate: str,
             grad_decay: bool = False, ilif: bool = False):
    """``(dL/dx, per-neuron dL/d decay or None)`` from dL/ds and the input ``x``."""
    x = x.contiguous()
    gx = torch.empty_like(x)
    gd = torch.zeros(x.numel() // max(x.shape[1], 1) if grad_decay else 1, dtype=x.dtype, device=x.device)
    if x.numel():
        neurons, t, m, grid = _geometry(x)
        _integrate[grid](x, gx, c, neurons, t, m, HARD=hard, STORE_H=True, BLOCK=BLOCK, ILIF=ilif)
        _lif_bwd[grid](grad_s.contiguous(), gx, c, x, gd, neurons, t, m, int(grad_decay), HARD=hard,
                       DETACH=detach_reset, KIND=SURROGATE_IDS.get(surrogate, 0), BLOCK=BLOCK, ILIF=ilif)
    return gx, (gd if grad_decay else None)
