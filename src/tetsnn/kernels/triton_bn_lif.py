"""BatchNorm + (residual) + neuron (LIF, or ILIF's counts) as Triton kernels: the normalised input is
never written to memory.

The math is that of :mod:`tetsnn.kernels.ops` (see its BatchNorm section) with the normalisation done
inside the LIF loop. With per-channel ``alpha = invstd * weight`` and ``beta = bias - mean * alpha``
(computed once from the batch statistics, in the compute dtype)::

    z[t] = fma(y[t], alpha, beta)                          the normalised conv output (triton_lif.input_at)
         (+ r[t])                   RES == 1: residual spikes (floats forward, packed bits backward;
                                    ILIF's counts stay floats)
         (+ fma(y2[t], alpha2, beta2))  RES == 2: a downsample branch's normalised conv output
    forward:   the neuron recurrence of :mod:`tetsnn.kernels.triton_lif` on z, spikes out
    backward:  the same recurrence again for h, then reverse-time BPTT (:func:`triton_lif.bptt`),
               dL/dz out; a learnable decay with decay_input forms z once more at each step for
               dL/d decay (``- z[t]`` in dh[t]/d decay)

Forward and backward form ``z`` with the same explicit fused multiply-add, so backward rebuilds
exactly the ``z`` the forward integrated. (It may differ by an ulp from torch's batch_norm kernel;
the CPU path takes the forward's ``z`` from that kernel and rebuilds it with its rounding.) Neuron ``i`` of a contiguous ``[N, T, C, H, W]`` tensor
(``M = C*H*W`` per step) lives at ``n*T*M + t*M + m`` with ``n = i // M, m = i % M``, and its
channel is ``m // HW``. Scalars come in the constant array of :mod:`tetsnn.neuron.spec`, in the compute
dtype; ``ab`` holds ``[alpha, beta, alpha2, beta2]`` (``4 * C`` values, the last two unused unless
RES == 2). On the CPU the kernels run under ``TRITON_INTERPRET=1``.

``AOT_VARIANTS`` lists every kernel configuration the Python side can launch, as
``(kernel, signature, constexprs)`` for ``triton.compile(ASTSource(kernel, signature, constexprs))``.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..surrogate import SURROGATE_IDS
from .triton_lif import bptt, check_device, consts, fire, input_at

BLOCK = 1024
_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


@triton.jit
def _neurons(ab_ptr, n_neurons, T, M, HW, C, BLOCK: tl.constexpr):
    """This program's neurons: their mask, their offsets at t = 0, and their channels' alpha, beta,
    alpha2 and beta2."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_neurons
    m = i % M
    ch = m // HW
    alpha = tl.load(ab_ptr + ch, mask=mask, other=0.0)
    beta = tl.load(ab_ptr + C + ch, mask=mask, other=0.0)
    alpha2 = tl.load(ab_ptr + 2 * C + ch, mask=mask, other=0.0)
    beta2 = tl.load(ab_ptr + 3 * C + ch, mask=mask, other=0.0)
    return mask, (i // M) * T * M + m, alpha, beta, alpha2, beta2


@triton.jit
def _bn_integrate(y_ptr, y2_ptr, r_ptr, c_ptr, out_ptr, mask, base, alpha, beta, alpha2, beta2, T, M,
                  HARD: tl.constexpr, RES: tl.constexpr, BACKWARD: tl.constexpr, BITS: tl.constexpr,
                  BLOCK: tl.constexpr, ILIF: tl.constexpr):
    """The forward recurrence on z: stores the spikes (in out_ptr's dtype), or for BACKWARD the
    pre-reset membranes (the residual then comes as packed bits where BITS)."""
    decay, th, w, k, cin, levels = consts(c_ptr)
    u = tl.zeros([BLOCK], dtype=decay.dtype)
    for t in range(T):
        at = base + t * M
        h = decay * u + cin * input_at(y_ptr, y2_ptr, r_ptr, at, mask, alpha, beta, alpha2, beta2, RES, BITS)
        s, u = fire(h, th, levels, HARD, ILIF)
        if BACKWARD:
            tl.store(out_ptr + at, h, mask=mask)
        else:
            tl.store(out_ptr + at, s.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_lif_fwd(y_ptr, y2_ptr, r_ptr, ab_ptr, c_ptr, s_ptr, n_neurons, T, M, HW, C,
                HARD: tl.constexpr, RES: tl.constexpr, BLOCK: tl.constexpr, ILIF: tl.constexpr):
    """Spikes (counts with ILIF) of neuron(BN(y) [+ r | + BN2(y2)]), in s_ptr's dtype."""
    mask, base, alpha, beta, alpha2, beta2 = _neurons(ab_ptr, n_neurons, T, M, HW, C, BLOCK)
    _bn_integrate(y_ptr, y2_ptr, r_ptr, c_ptr, s_ptr, mask, base, alpha, beta, alpha2, beta2, T, M,
                  HARD, RES, False, False, BLOCK, ILIF)


@triton.jit
def _bn_lif_bwd(gs_ptr, y_ptr, y2_ptr, r_ptr, ab_ptr, c_ptr, gz_ptr, gd_ptr, n_neurons, T, M, HW, C, grad_decay,
                HARD: tl.constexpr, DETACH: tl.constexpr, KIND: tl.constexpr, RES: tl.constexpr,
                BLOCK: tl.constexpr, ILIF: tl.constexpr):
    """dL/dz from dL/ds: the recurrence for h (kept in gz), then BPTT back in time over it; with
    ``grad_decay`` each neuron's dL/d decay into gd (with decay_input it forms z again at each step).
    A residual (RES == 1) comes as packed bits, or for ILIF's counts as floats in y's dtype."""
    mask, base, alpha, beta, alpha2, beta2 = _neurons(ab_ptr, n_neurons, T, M, HW, C, BLOCK)
    _bn_integrate(y_ptr, y2_ptr, r_ptr, c_ptr, gz_ptr, mask, base, alpha, beta, alpha2, beta2, T, M,
                  HARD, RES, True, not ILIF, BLOCK, ILIF)
    acc = bptt(gs_ptr, gz_ptr, c_ptr, base, mask, T, M, y_ptr, y2_ptr, r_ptr, alpha, beta, alpha2, beta2,
               grad_decay, HARD, DETACH, KIND, RES, not ILIF, BLOCK, ILIF)
    if grad_decay != 0:
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(gd_ptr + i, acc, mask=mask)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def affine(mean: Tensor, invstd: Tensor, weight, bias, dtype) -> Tensor:
    """``[alpha, beta]`` per channel in ``dtype``: ``alpha = invstd * weight``, ``beta = bias - mean * alpha``."""
    alpha = invstd.to(dtype) * (1 if weight is None else weight.to(dtype))
    beta = (0 if bias is None else bias.to(dtype)) - mean.to(dtype) * alpha
    return torch.cat([alpha, beta])


def _geometry(y: Tensor, T: int):
    n = y.shape[0] // T
    c = y.shape[1]
    m = y[0].numel()
    return n * m, m, m // max(c, 1), c, (triton.cdiv(n * m, BLOCK),)


def forward(y: Tensor, ab: Tensor, y2, r, T: int, consts_: Tensor, hard: bool, ilif: bool = False) -> Tensor:
    """Spikes ``[N, T, C, ...]`` (in y's dtype; counts with ``ilif``) of a ``[N*T, C, ...]`` conv output
    ``y``; ``ab`` is :func:`affine` of one or (with ``y2``) two BatchNorms; ``r`` residual spikes
    ``[N, T, C, ...]``; ``c`` the constant array in ab's dtype."""
    check_device(y)
    y = y.contiguous()
    s = torch.empty((y.shape[0] // T, T, *y.shape[1:]), dtype=y.dtype, device=y.device)
    if y.numel():
        res = 2 if y2 is not None else 1 if r is not None else 0
        other = y2.contiguous() if res == 2 else y
        rr = r.contiguous() if res == 1 else y
        neurons, m, hw, c, grid = _geometry(y, T)
        _bn_lif_fwd[grid](y, other, rr, _pad(ab, c), consts_, s, neurons, T, m, hw, c, HARD=hard, RES=res, BLOCK=BLOCK,
                          ILIF=ilif)
    return s


def backward(grad_s: Tensor, y: Tensor, ab: Tensor, y2, bits, T: int, consts_: Tensor, hard: bool,
             detach_reset: bool, surrogate: str, grad_decay: bool = False, ilif: bool = False):
    """``(dL/dz [N, T, C, ...] in the compute dtype, per-neuron dL/d decay or None)``; ``bits`` are the
    residual spikes packed (with ``ilif``: the residual counts themselves, in y's dtype)."""
    y = y.contiguous()
    gz = torch.empty((y.shape[0] // T, T, *y.shape[1:]), dtype=ab.dtype, device=y.device)
    gd = torch.zeros(gz.numel() // T if grad_decay else 1, dtype=ab.dtype, device=y.device)
    if y.numel():
        res = 2 if y2 is not None else 1 if bits is not None else 0
        other = y2.contiguous() if res == 2 else y
        rr = bits if res == 1 else y
        neurons, m, hw, c, grid = _geometry(y, T)
        _bn_lif_bwd[grid](grad_s.contiguous(), y, other, rr, _pad(ab, c), consts_, gz, gd, neurons, T, m, hw, c,
                          int(grad_decay), HARD=hard, DETACH=detach_reset, KIND=SURROGATE_IDS.get(surrogate, 0),
                          RES=res, BLOCK=BLOCK, ILIF=ilif)
    return gz, (gd if grad_decay else None)


def _pad(ab: Tensor, c: int) -> Tensor:
    """``[alpha, beta, alpha2, beta2]``: zeros for a missing second BatchNorm."""
    return ab if ab.numel() == 4 * c else torch.cat([ab, ab.new_zeros(2 * c)])


# --------------------------------------------------------------------------- ahead-of-time variants

def _aot_variants():
    """LIF (hard or soft reset, every surrogate) and ILIF (soft reset; its straight-through window is
    no surrogate kind, so 0), each with no residual, residual spikes (bits backward; ILIF's counts as
    floats) and a downsample branch."""
    scalars = {"n_neurons": "i32", "T": "i32", "M": "i32", "HW": "i32", "C": "i32"}
    neurons = [(hard, detach, kind, False) for hard, detach, kind in
               itertools.product((True, False), (False, True), sorted(SURROGATE_IDS.values()))]
    neurons += [(False, detach, 0, True) for detach in (False, True)]
    out = []
    for ydt, res in itertools.product(_TYPES, (0, 1, 2)):
        y, cd = _TYPES[ydt], _TYPES[compute_dtype(ydt)]
        for hard, ilif in sorted({(hard, ilif) for hard, _, _, ilif in neurons}):
            sig = dict(y_ptr=y, y2_ptr=y, r_ptr=y, ab_ptr=cd, c_ptr=cd, s_ptr=y, **scalars,
                       HARD="constexpr", RES="constexpr", BLOCK="constexpr", ILIF="constexpr")
            out.append((_bn_lif_fwd, sig, dict(HARD=hard, RES=res, BLOCK=BLOCK, ILIF=ilif)))
        for hard, detach, kind, ilif in neurons:
            sig = dict(gs_ptr=y, y_ptr=y, y2_ptr=y, r_ptr="*u8" if res == 1 and not ilif else y, ab_ptr=cd,
                       c_ptr=cd, gz_ptr=cd, gd_ptr=cd, **scalars, grad_decay="i32", HARD="constexpr",
                       DETACH="constexpr", KIND="constexpr", RES="constexpr", BLOCK="constexpr", ILIF="constexpr")
            out.append((_bn_lif_bwd, sig, dict(HARD=hard, DETACH=detach, KIND=kind, RES=res, BLOCK=BLOCK,
                                               ILIF=ilif)))
    return out


AOT_VARIANTS = _aot_variants()
