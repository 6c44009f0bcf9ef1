"""numba kernels of the parallel spiking neurons (:mod:`tetsnn.neuron.psn`) on CPU float32 / float64.

``x`` is ``[N, T, F]`` (contiguous). Threads take blocks of ``_BLOCK`` neurons of one sample (split as
:mod:`tetsnn.kernels.numba_kernels` splits its work items); each block is read once per direction:

- forward: ``s[n, t, f] = H(b[t] + sum_j W[t, j] x[n, j, f])``;
- backward: ``H`` again, ``g = dL/ds * surrogate(H)``, then ``dL/dx[n, j, f] = sum_t W[t, j] g[n, t, f]``
  and the block's share of ``dL/dW = sum g x^T`` and ``dL/db = sum g``, summed over blocks after.

The surrogate is one of the built-in ones, ``c = [id, width, k]`` with its ``SURROGATE_IDS`` id and
``k = surrogate_constant(name, width)``; its derivative is :func:`tetsnn.surrogate.numba_grad`, the
form every numba kernel inlines (one compiled kernel per direction and dtype serves every surrogate).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..surrogate import SURROGATE_IDS, numba_surrogate, surrogate_constant
from . import numba_kernels as nk

__all__ = ["available", "forward", "backward"]

_BLOCK = 1024


def available() -> bool:
    """Whether the numba kernels can run (numba imports and is not switched off: see
    :func:`tetsnn.kernels.numba_kernels.available`)."""
    return nk.available()


def _constants(surrogate: str, width: float, dtype) -> Tensor:
    return torch.tensor([SURROGATE_IDS[surrogate], width, surrogate_constant(surrogate, width)], dtype=dtype)


def _build():
    """``(fwd, bwd)``, the kernel pair ``("psn",)`` of :func:`tetsnn.kernels.numba_kernels.kernel`."""
    import numba
    import numpy as np
    count, at = nk.kernel(("blocks", _BLOCK))

    @numba.njit(inline="always")
    def mix(x, n, m0, w, weight, bias, h):
        # h[t, i] = b[t] + sum_j W[t, j] x[n, j, m0 + i]
        t_ = weight.shape[0]
        for t in range(t_):
            ht = h[t]
            bt = bias[t]
            for i in range(w):
                ht[i] = bt
            for j in range(t_):
                wj = weight[t, j]
                xj = x[n, j, m0:m0 + w]
                for i in range(w):
                    ht[i] += wj * xj[i]

    grad = numba_surrogate()

    @numba.njit(inline="always")
    def surrogate(kind, h, gs, width, k):
        # h[i] <- gs[i] * dS/dH at h[i]
        one = width - width + 1
        zero = one - one
        for i in range(h.shape[0]):
            h[i] = gs[i] * grad(h[i], kind, width, k, zero, one)

    @nk.outer_jit()
    def fwd(x, weight, bias, s):
        n_, t_, m_ = x.shape
        for job in numba.prange(count(n_, m_)):
            n, m0, w = at(job, m_)
            h = np.empty((t_, w), x.dtype)
            mix(x, n, m0, w, weight, bias, h)
            for t in range(t_):
                st = s[n, t, m0:m0 + w]
                ht = h[t]
                for i in range(w):
                    st[i] = 1 if ht[i] > 0 else 0

    @nk.outer_jit(fastmath={"reassoc"})  # the sums over a block may be reordered (vectorised)
    def bwd(gs, x, weight, bias, c, gx, gw_parts, gb_parts):
        n_, t_, m_ = x.shape
        kind, width, k = int(c[0]), c[1], c[2]
        for job in numba.prange(count(n_, m_)):
            n, m0, w = at(job, m_)
            g = np.empty((t_, w), x.dtype)
            mix(x, n, m0, w, weight, bias, g)
            for t in range(t_):
                gt = g[t]
                surrogate(kind, gt, gs[n, t, m0:m0 + w], width, k)
                acc = width - width
                for i in range(w):
                    acc += gt[i]
                gb_parts[job, t] = acc
            for j in range(t_):
                xj = x[n, j, m0:m0 + w]
                gxj = gx[n, j, m0:m0 + w]
                for i in range(w):
                    gxj[i] = 0
                for t in range(t_):
                    wtj = weight[t, j]
                    gt = g[t]
                    acc = width - width
                    for i in range(w):
                        gxj[i] += wtj * gt[i]
                    for i in range(w):
                        acc += gt[i] * xj[i]
                    gw_parts[job, t, j] = acc

    return fwd, bwd


nk.register("psn", _build)


def applies(x: Tensor, surrogate) -> bool:
    """Whether the numba kernels run on ``x`` with ``surrogate`` (a name; a callable never)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and isinstance(surrogate, str)
            and surrogate in SURROGATE_IDS and available())


def _np(t: Tensor, dtype):
    """``t`` as a contiguous numpy array of ``dtype`` (sharing memory where it already is one)."""
    return t.detach().to(dtype).contiguous().numpy()


def forward(x3: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """0/1 spikes ``[N, T, F]`` of ``x3`` (contiguous) mixed by ``weight`` [T, T] and ``bias`` [T, 1]."""
    fwd, _ = nk.kernel(("psn",))
    s = torch.empty_like(x3)
    fwd(_np(x3, x3.dtype), _np(weight, x3.dtype), _np(bias.reshape(-1), x3.dtype), s.numpy())
    return s


def backward(grad_s: Tensor, x3: Tensor, weight: Tensor, bias: Tensor, surrogate: str, width: float):
    """``(dL/dx, dL/dW, dL/db)`` for the forward above; ``dL/db`` is ``[T, 1]``."""
    _, bwd = nk.kernel(("psn",))
    n, t, m = x3.shape
    jobs = nk.jobs(n, m, _BLOCK)
    gx = torch.empty_like(x3)
    gw = torch.empty(jobs, t, t, dtype=x3.dtype)
    gb = torch.empty(jobs, t, dtype=x3.dtype)
    bwd(_np(grad_s, x3.dtype), _np(x3, x3.dtype), _np(weight, x3.dtype), _np(bias.reshape(-1), x3.dtype),
        _constants(surrogate, width, x3.dtype).numpy(), gx.numpy(), gw.numpy(), gb.numpy())
    return gx, gw.sum(0), gb.sum(0).view(t, 1)
