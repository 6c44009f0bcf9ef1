"""Bit planes of integer spike counts: what a layer fed by a sum of spikes (a transformer's residual
stream) keeps of its input for backward.

``pack_counts(x, levels)`` checks that every value of ``x`` is an integer 0..levels and returns the
planes ``[bits, ceil(numel / 8)]`` (uint8; plane b holds bit b of each count, laid out as
:func:`tetsnn.kernels.ops.pack_spikes` lays out 0/1 spikes); ``unpack_counts`` rebuilds the counts.
On the CPU (float32 / float64, numba importable) each is one parallel numba pass over the values: the
check is fused into the packing. Elsewhere the check, then a ``pack_spikes`` per plane. While
torch.compile traces, the per-plane torch ops alone (``pack_counts(checked=False)``: a data-dependent
error or a numba call would break the graph).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from . import numba_kernels as nk
from .ops import check_spikes, numba_applies, pack_spikes, unpack_spikes

__all__ = ["planes_for", "pack_counts", "unpack_counts"]

def planes_for(levels: int) -> int:
    """Bits that hold the integers 0..levels: ``ceil(log2(levels + 1))``."""
    return max(1, int(levels).bit_length())


def pack_counts(x: Tensor, levels: int, checked: bool = True) -> Tensor:
    """The bit planes ``[planes_for(levels), ceil(numel / 8)]`` of the spike counts in ``x`` (in its logical
    order), raising :func:`tetsnn.kernels.ops.check_spikes`' error where a value is no integer 0..levels;
    ``checked=False``: no check, and torch ops alone (what torch.compile traces)."""
    planes = planes_for(levels)
    flat = x.detach().contiguous().view(-1)
    if checked and numba_applies(flat):
        out = torch.empty((planes, (flat.numel() + 7) // 8), dtype=torch.uint8)
        bad = torch.zeros(1, dtype=torch.int64)
        if nk.call(("pack_counts",), flat.numpy(), int(levels), out.numpy(), bad.numpy()):
            if bad.item():
                check_spikes(x, levels)   # raises, naming a value
            return out
    if checked:
        check_spikes(x, levels)
    xi = flat.to(torch.int32)
    return torch.stack([pack_spikes(((xi >> b) & 1).to(x.dtype)) for b in range(planes)])


def unpack_counts(planes: Tensor, shape: List[int], dtype: torch.dtype) -> Tensor:
    """The spike counts of :func:`pack_counts`' planes as a ``shape`` tensor of ``dtype`` (torch ops alone
    while torch.compile traces)."""
    if planes.shape[0] > 1 and not torch.compiler.is_compiling():
        out = torch.empty(shape, dtype=dtype, device=planes.device)
        if numba_applies(out) and nk.call(("unpack_counts",), planes.contiguous().numpy(), out.view(-1).numpy()):
            return out
    x = unpack_spikes(planes[0], shape, dtype)
    for b in range(1, planes.shape[0]):
        x = x + unpack_spikes(planes[b], shape, dtype) * (1 << b)
    return x


def _pack_kernel():
    numba, np = nk.module(), __import__("numpy")
    block = nk.PACK_BLOCK

    @nk.outer_jit()
    def pack(x, levels, out, bad):
        # x: flat float array of spike counts 0..levels; out[b, j] holds bit b of x[8j .. 8j+7] (x[8j] in
        # the lowest bit); bad[0] = the number of values that are no such count (NaN included), found in
        # the same pass. The loops have no branches, so that they vectorise; the bits of a value that is no
        # count are never used (the caller raises).
        n, planes = x.shape[0], out.shape[0]
        lv = x.dtype.type(levels)
        count = 0
        for j in numba.prange((n + block - 1) // block):
            i0 = j * block
            w = min(block, n - i0)
            xs = x[i0:i0 + w]
            flags = np.empty(block, np.uint8)
            flags[w:] = 0
            f64 = flags.view(np.uint64)
            ks = np.empty(w, np.int32)
            wrong = 0
            for i in range(w):
                v = xs[i]
                wrong += (v < 0) | (v > lv) | (v != np.floor(v))
                ks[i] = numba.int32(min(max(v, 0), lv))
            count += wrong
            nb = (w + 7) // 8
            for b in range(planes):
                for i in range(w):
                    flags[i] = (ks[i] >> b) & 1
                # eight 0/1 bytes -> one byte: the multiply moves byte k to bit 56 + k (little-endian)
                o = out[b, i0 // 8:i0 // 8 + nb]
                for i in range(nb):
                    o[i] = (f64[i] * np.uint64(0x0102040810204080)) >> np.uint64(56)
        bad[0] = count
    return pack


def _unpack_kernel():
    numba, np = nk.module(), __import__("numpy")
    # byte k of spread[B] is bit k of B
    spread = np.array([sum(((b >> k) & 1) << (8 * k) for k in range(8)) for b in range(256)], np.uint64)

    @nk.outer_jit()
    def unpack(p, out):  # out[f] = sum_b bit (f % 8) of p[b, f // 8] * 2**b
        n, planes = out.shape[0], p.shape[0]
        for j in numba.prange((n + 7) // 8):
            acc = np.uint64(0)
            for b in range(planes):   # each byte of acc gathers one value's bits
                acc |= spread[p[b, j]] << np.uint64(b)
            for k in range(min(8, n - 8 * j)):
                out[8 * j + k] = (acc >> np.uint64(8 * k)) & np.uint64(0xFF)
    return unpack


nk.register("pack_counts", _pack_kernel)
nk.register("unpack_counts", _unpack_kernel)
