"""The fused LIF as Triton kernels: one program per block of neurons, the loop over T inside.

Same recurrences as :mod:`tetsnn.kernels.fused` (see its docstring). Neuron ``i`` of a contiguous
``[N, T, M]`` tensor (``M`` = the product of the trailing dims) lives at ``n*T*M + t*M + m`` with
``n = i // M, m = i % M``, so each program reads and writes contiguous runs of ``BLOCK`` values per
step. Scalars come from a small tensor in the compute dtype (``[tau, threshold, width, k]``), so
float64 inputs use float64 constants exactly as the torch ops do. On the CPU the kernels run under
``TRITON_INTERPRET=1`` (set it before this module is imported).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fused import SURROGATE_IDS

BLOCK = 1024


@triton.jit
def _lif_fwd(x_ptr, s_ptr, h_ptr, c_ptr, n_neurons, T, M, HARD: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_neurons
    base = (i // M) * T * M + i % M
    tau = tl.load(c_ptr)
    th = tl.load(c_ptr + 1)
    u = tl.zeros([BLOCK], dtype=tau.dtype)
    for t in range(T):
        at = base + t * M
        h = tau * u + tl.load(x_ptr + at, mask=mask, other=0.0)
        s = tl.where(h - th > 0, 1.0, 0.0).to(h.dtype)
        tl.store(h_ptr + at, h, mask=mask)
        tl.store(s_ptr + at, s, mask=mask)
        if HARD:
            u = h * (1 - s)
        else:
            u = h - th * s


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
def _lif_bwd(gs_ptr, h_ptr, gx_ptr, c_ptr, n_neurons, T, M, HARD: tl.constexpr, DETACH: tl.constexpr,
             KIND: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_neurons
    base = (i // M) * T * M + i % M
    tau = tl.load(c_ptr)
    th = tl.load(c_ptr + 1)
    w = tl.load(c_ptr + 2)
    k = tl.load(c_ptr + 3)
    gu = tl.zeros([BLOCK], dtype=tau.dtype)
    for j in range(T):
        at = base + (T - 1 - j) * M
        h = tl.load(h_ptr + at, mask=mask, other=0.0)
        g = tl.load(gs_ptr + at, mask=mask, other=0.0).to(h.dtype)
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
        tl.store(gx_ptr + at, gh, mask=mask)
        gu = tau * gh


def _consts(dtype, device, tau, threshold, surrogate="zif", width=1.0) -> Tensor:
    k = (1.0 / width) ** 2 if surrogate == "zif" else math.pi / 2 * width
    return torch.tensor([tau, threshold, width, k], dtype=dtype, device=device)


def _geometry(x: Tensor):
    n, t = x.shape[:2]
    m = x.numel() // max(n * t, 1)
    return n * m, t, m, (triton.cdiv(n * m, BLOCK),)


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(f"the 'triton' LIF backend needs a CUDA tensor (got one on {x.device}) or "
                         f"TRITON_INTERPRET=1 set before tetsnn.kernels.triton_lif is imported")


def forward(x: Tensor, tau: float, threshold: float, hard: bool) -> Tuple[Tensor, Tensor]:
    _check_device(x)
    x = x.contiguous()
    s, h = torch.empty_like(x), torch.empty_like(x)
    if x.numel():
        neurons, t, m, grid = _geometry(x)
        _lif_fwd[grid](x, s, h, _consts(x.dtype, x.device, tau, threshold), neurons, t, m,
                       HARD=hard, BLOCK=BLOCK)
    return s, h


def backward(grad_s: Tensor, h: Tensor, tau: float, threshold: float, hard: bool, detach_reset: bool,
             surrogate: str, width: float) -> Tensor:
    gx = torch.empty_like(h)
    if h.numel():
        neurons, t, m, grid = _geometry(h)
        _lif_bwd[grid](grad_s.contiguous(), h, gx, _consts(h.dtype, h.device, tau, threshold, surrogate, width),
                       neurons, t, m, HARD=hard, DETACH=detach_reset, KIND=SURROGATE_IDS[surrogate],
                       BLOCK=BLOCK)
    return gx
