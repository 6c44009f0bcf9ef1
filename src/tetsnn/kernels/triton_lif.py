"""The fused LIF as Triton kernels: one program per block of neurons, the loop over T inside.

Same recurrences as :mod:`tetsnn.kernels.fused` (see its docstring), and the same saved tensor (the
input). The forward reads ``x`` and writes ``s``; the backward first re-runs the recurrence writing
``h`` into its output buffer, then walks back in time overwriting it with ``dL/dx``. Neuron ``i`` of a contiguous
``[N, T, M]`` tensor (``M`` = the product of the trailing dims) lives at ``n*T*M + t*M + m`` with
``n = i // M, m = i % M``, so each program reads and writes contiguous runs of ``BLOCK`` values per
step. Scalars come from a small tensor in the compute dtype (``[tau, threshold, width, k]``), so
float64 inputs use float64 constants exactly as the torch ops do. On the CPU the kernels run under
``TRITON_INTERPRET=1`` (set it before this module is imported).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..surrogate import SURROGATE_IDS

BLOCK = 1024


@triton.jit
def _fire(h, th, HARD: tl.constexpr):
    """Spike and reset of one step: ``(s, u)`` from the pre-reset membrane ``h``."""
    s = tl.where(h - th > 0, 1.0, 0.0).to(h.dtype)
    if HARD:
        u = h * (1 - s)
    else:
        u = h - th * s
    return s, u


@triton.jit
def _integrate(x_ptr, out_ptr, c_ptr, n_neurons, T, M, HARD: tl.constexpr, STORE_H: tl.constexpr,
               BLOCK: tl.constexpr):
    """The forward recurrence; stores the spikes, or (STORE_H) the pre-reset membranes."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_neurons
    base = (i // M) * T * M + i % M
    tau = tl.load(c_ptr)
    th = tl.load(c_ptr + 1)
    u = tl.zeros([BLOCK], dtype=tau.dtype)
    for t in range(T):
        at = base + t * M
        h = tau * u + tl.load(x_ptr + at, mask=mask, other=0.0)
        s, u = _fire(h, th, HARD)
        if STORE_H:
            tl.store(out_ptr + at, h, mask=mask)
        else:
            tl.store(out_ptr + at, s, mask=mask)


@triton.jit
def _surrogate(v, w, k, KIND: tl.constexpr):
    if KIND == 0:  # zif: (1/w)^2 * max(0, w - |v|), k = (1/w)^2
        g = tl.maximum(w - tl.abs(v), 0.0) * k
    elif KIND == 1:  # sigmoid: w * sig(w v) * (1 - sig(w v))
        sg = 1 / (1 + tl.exp(-(w * v)))
        g = w * sg * (1 - sg)
    else:  # atan: (w/2) / (1 + (k v)^2), k = pi/2 * w
        z = k * v
        g = (w / 2) / (1 + z * z)
    return g


@triton.jit
def _bptt_step(h, g, gu, th, w, k, HARD: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr):
    """dL/dh[t] of one reverse-time step from dL/ds[t] (``g``), dL/du[t] (``gu``) and the pre-reset
    membrane ``h`` (the recurrence derived in :mod:`tetsnn.kernels.fused`)."""
    v = h - th
    if not DETACH:
        if HARD:
            g = g - gu * h
        else:
            g = g - gu * th
    gh = g * _surrogate(v, w, k, KIND)
    if HARD:
        gh = gh + gu * (1 - tl.where(v > 0, 1.0, 0.0).to(h.dtype))
    else:
        gh = gh + gu
    return gh


@triton.jit
def _lif_bwd(gs_ptr, gx_ptr, c_ptr, n_neurons, T, M, HARD: tl.constexpr, DETACH: tl.constexpr,
             KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Reverse-time BPTT reading the membranes from gx (where _integrate put them), writing dL/dx."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_neurons
    _bptt(gs_ptr, gx_ptr, c_ptr, (i // M) * T * M + i % M, mask, T, M, HARD, DETACH, KIND, BLOCK)


@triton.jit
def _bptt(gs_ptr, g_ptr, c_ptr, base, mask, T, M, HARD: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr,
          BLOCK: tl.constexpr):
    """Reverse-time BPTT over the neurons at offsets ``base`` (+ t*M): reads the pre-reset membranes
    from g_ptr and overwrites them with dL/dh."""
    tau = tl.load(c_ptr)
    th = tl.load(c_ptr + 1)
    w = tl.load(c_ptr + 2)
    k = tl.load(c_ptr + 3)
    gu = tl.zeros([BLOCK], dtype=tau.dtype)
    for j in range(T):
        at = base + (T - 1 - j) * M
        h = tl.load(g_ptr + at, mask=mask, other=0.0)
        gh = _bptt_step(h, tl.load(gs_ptr + at, mask=mask, other=0.0).to(h.dtype), gu, th, w, k, HARD, DETACH, KIND)
        tl.store(g_ptr + at, gh, mask=mask)
        gu = tau * gh


# Every (kernel, signature, constexprs) the functions below can launch, for ahead-of-time compile
# checks: the compute dtype (float32, or float64; half inputs arrive as float32) and every flag.
AOT_VARIANTS = [
    (_integrate, {"x_ptr": f"*{d}", "out_ptr": f"*{d}", "c_ptr": f"*{d}", "n_neurons": "i32", "T": "i32", "M": "i32",
                  "HARD": "constexpr", "STORE_H": "constexpr", "BLOCK": "constexpr"},
     {"HARD": hard, "STORE_H": store_h, "BLOCK": BLOCK})
    for d in ("fp32", "fp64") for hard in (True, False) for store_h in (True, False)
] + [
    (_lif_bwd, {"gs_ptr": f"*{d}", "gx_ptr": f"*{d}", "c_ptr": f"*{d}", "n_neurons": "i32", "T": "i32", "M": "i32",
                "HARD": "constexpr", "DETACH": "constexpr", "KIND": "constexpr", "BLOCK": "constexpr"},
     {"HARD": hard, "DETACH": detach, "KIND": kind, "BLOCK": BLOCK})
    for d in ("fp32", "fp64") for hard in (True, False) for detach in (True, False) for kind in SURROGATE_IDS.values()
]


def _consts(dtype, device, tau, threshold, surrogate="zif", width=1.0) -> Tensor:
    k = (1.0 / width) ** 2 if surrogate == "zif" else math.pi / 2 * width
    return torch.tensor([tau, threshold, width, k], dtype=dtype, device=device)


def _geometry(x: Tensor):
    n, t = x.shape[:2]
    m = x.numel() // max(n * t, 1)
    return n * m, t, m, (triton.cdiv(n * m, BLOCK),)


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the 'triton' LIF backend needs a CUDA tensor (got one on {x.device}) or "
                         f"TRITON_INTERPRET=1 set before tetsnn.kernels.triton_lif is imported")


def _run_integrate(x: Tensor, out: Tensor, c: Tensor, hard: bool, store_h: bool) -> None:
    neurons, t, m, grid = _geometry(x)
    _integrate[grid](x, out, c, neurons, t, m, HARD=hard, STORE_H=store_h, BLOCK=BLOCK)


def forward(x: Tensor, tau: float, threshold: float, hard: bool) -> Tensor:
    """Spikes of a contiguous-able float ``[N, T, ...]`` input."""
    _check_device(x)
    x = x.contiguous()
    s = torch.empty_like(x)
    if x.numel():
        _run_integrate(x, s, _consts(x.dtype, x.device, tau, threshold), hard, False)
    return s


def backward(grad_s: Tensor, x: Tensor, tau: float, threshold: float, hard: bool, detach_reset: bool,
             surrogate: str, width: float) -> Tensor:
    """dL/dx from dL/ds and the input ``x``."""
    x = x.contiguous()
    gx = torch.empty_like(x)
    if x.numel():
        c = _consts(x.dtype, x.device, tau, threshold, surrogate, width)
        _run_integrate(x, gx, c, hard, True)
        neurons, t, m, grid = _geometry(x)
        _lif_bwd[grid](grad_s.contiguous(), gx, c, neurons, t, m, HARD=hard, DETACH=detach_reset,
                       KIND=SURROGATE_IDS[surrogate], BLOCK=BLOCK)
    return gx
