"""The custom-op boundary: the neuron and BatchNorm-neuron ops (``torch.library``), their autograd,
and the one place a :class:`~tetsnn.neuron.spec.NeuronSpec` and a :class:`BNOperand` are flattened to
the ops' scalar arguments (:func:`flatten_neuron`, :func:`unflatten_neuron`).

The neuron (``tetsnn::lif_forward`` / ``lif_backward``), forward per step t (``h`` is the pre-reset
membrane, ``c_in`` 1 or ``1 - decay`` with decay_input)::

    h[t] = decay * u[t-1] + c_in * x[t]          u[-1] = 0
    s[t] = H(h[t] - threshold)                   strict '>'
    u[t] = h[t] * (1 - s[t])  (hard)   or   h[t] - threshold * s[t]  (soft)

Backward, with ``sg[t] = surrogate'(h[t] - threshold)``, ``gs[t] = dL/ds[t]`` and ``gu[t] = dL/du[t]``
coming back from step t+1 (``gu[T-1] = 0``)::

    hard, attached:  gh[t] = (gs[t] - gu[t] * h[t]) * sg[t] + gu[t] * (1 - s[t])
    hard, detached:  gh[t] = gs[t] * sg[t] + gu[t] * (1 - s[t])
    soft, attached:  gh[t] = (gs[t] - gu[t] * threshold) * sg[t] + gu[t]
    soft, detached:  gh[t] = gs[t] * sg[t] + gu[t]
    dL/dx[t] = c_in * gh[t],   gu[t-1] = decay * gh[t]
    dL/d decay = sum_t gh[t] * u[t-1]   (- sum_t gh[t] * x[t] with decay_input)    learnable decay only

ILIF (integer counts ``s = round(clip(h / threshold, 0, D))``, soft reset): ``gh[t] = (gs[t] -
gu[t] * threshold) * [0 <= h/threshold <= D] / threshold + gu[t]`` (``gs[t]`` alone when detached).

The only tensor kept for backward is the input ``x`` (and a learnable decay): backward re-runs the
forward recurrence block by block to get ``h``. The kernels: numba (:mod:`.numba_kernels`), torch ops
(:mod:`.torch_kernels`) and Triton (:mod:`.triton_lif`, :mod:`.triton_bn_lif`); which one runs is
decided by :func:`tetsnn.kernels.plan.plan`, passed here as ``kernel`` ("fused" or "triton"; "fused"
runs numba where it applies and torch ops elsewhere). Eager code calls the op bodies through an
``autograd.Function`` (no dispatcher argument handling per call); torch.compile traces the ops.

The BatchNorm-neuron ops (``tetsnn::bn_lif_forward`` / ``bn_lif_backward``) keep the conv output ``y``
instead of the normalised ``z = BN(y)`` and rebuild ``z`` in backward; see :func:`bn_neuron`.
"""
from __future__ import annotations

import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..neuron.spec import C_DECAY, C_INPUT, NeuronSpec
from ..surrogate import SURROGATE_IDS, SURROGATES
from . import numba_kernels as nk
from . import torch_kernels as tk

__all__ = ["neuron_spikes", "bn_neuron", "BNOperand", "NO_BN", "flatten_neuron", "unflatten_neuron", "constants",
           "half_to_float", "numba_applies", "pack_spikes", "unpack_spikes", "pack_once", "check_spikes",
           "remember_packing", "SpikePacking",
           "lif_forward", "lif_backward", "bn_lif_forward", "bn_lif_backward"]

_aten = torch.ops.aten


def half_to_float(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def numba_applies(t: Tensor) -> bool:
    """Whether the numba kernels run on ``t`` (CPU float32 / float64, numba importable)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and nk.available()


# --------------------------------------------------------------------------- the boundary

def flatten_neuron(spec: NeuronSpec, kernel: str, decay: Optional[Tensor] = None) -> tuple:
    """The ops' neuron arguments: ``(tau, threshold, reset, detach_reset, surrogate, width, kernel,
    decay_input, dynamics, max_level, decay)``; ``decay`` is a learnable decay's 0-dim tensor."""
    return (spec.decay, spec.threshold, spec.reset, spec.detach_reset, spec.surrogate, spec.width, kernel,
            spec.decay_input, spec.dynamics, spec.max_level, decay)


def unflatten_neuron(tau, threshold, reset, detach_reset, surrogate, width, kernel, decay_input=False,
                     dynamics="lif", max_level=1, decay=None) -> Tuple[NeuronSpec, str, Optional[Tensor]]:
    """The inverse of :func:`flatten_neuron`: ``(spec, kernel, decay)``."""
    spec = NeuronSpec(dynamics=dynamics, decay=tau, learnable_decay=decay is not None, decay_input=decay_input,
                      threshold=threshold, reset=reset, detach_reset=detach_reset, surrogate=surrogate, width=width,
                      max_level=max_level)
    return spec, kernel, decay


N_NEURON_ARGS = 11


def constants(spec: NeuronSpec, dtype, device="cpu", decay: Optional[Tensor] = None) -> Tensor:
    """The kernels' constant array (layout of :mod:`tetsnn.neuron.spec`) in ``dtype``; a learnable
    ``decay`` enters as the loop forms it (``1 - decay`` in its own dtype, then cast)."""
    c = torch.tensor(spec.constants(), dtype=dtype, device=device)
    if decay is not None:
        d = decay.detach()
        c[C_DECAY] = d
        if spec.decay_input:
            c[C_INPUT] = 1 - d
    return c


def _decay_value(spec: NeuronSpec, decay: Optional[Tensor], dtype):
    """The decay as the torch-op kernels use it: the spec's float, or the learnable tensor in ``dtype``."""
    return spec.decay if decay is None else decay.detach().to(dtype)


# --------------------------------------------------------------------------- neuron kernels by path

def _as3d(t: Tensor) -> Tensor:
    return t.contiguous().view(t.shape[0], t.shape[1], -1)


def _spikes(x: Tensor, spec: NeuronSpec, kernel: str, decay: Optional[Tensor],
            packing: Optional["SpikePacking"] = None) -> Tensor:
    """Spikes of a contiguous float32 / float64 input (``packing``: see :func:`_numba_spikes`)."""
    if kernel == "triton":
        from . import triton_lif
        c = constants(spec, x.dtype, x.device, decay)
        return triton_lif.forward(x, c, _triton_hard(spec), spec.dynamics == "ilif")
    if numba_applies(x):
        s = _numba_spikes((x,), spec, decay, packing)
        if s is not None:
            return s
    return tk.forward(x, spec, _decay_value(spec, decay, x.dtype))[0]


class SpikePacking:
    """Whether a neuron's numba kernel packs its spikes to bits as it writes them (``on``).

    Each spiking neuron module holds one, off at first. The spikes its kernel makes carry a link to it,
    and :func:`pack_once` turns it on when a spike-fed layer (a :mod:`tetsnn.compact` layer, a residual
    kept as bits) asks for the bits of those spikes. From then on the kernel packs as it writes, and
    :func:`pack_once` hands those bits out instead of reading the spikes again. A neuron whose spikes no
    such layer packs (a network's last, one feeding a loss or a non-spiking layer) never packs them. The
    bits are only a cache of ``pack_spikes(spikes)``: outputs and gradients are the same either way."""

    __slots__ = ("on",)

    def __init__(self):
        self.on = False


class _Made(NamedTuple):
    """What a neuron's numba kernel leaves on the spikes it makes (``spikes._tetsnn_bits``)."""
    bits: Optional[Tensor]     # the spikes packed as the kernel wrote them, or None (packing off)
    version: int               # the spikes' version counter then: the bits hold while it is unchanged
    packing: SpikePacking      # the neuron's switch, turned on by pack_once


def _asking(packing: Optional[SpikePacking]) -> Optional[SpikePacking]:
    """``packing`` where a spike-fed layer may pack this call's spikes (eager, gradients on), else None."""
    return packing if torch.is_grad_enabled() and not torch.compiler.is_compiling() else None


def _numba_spikes(terms: Tuple[Tensor, ...], spec: NeuronSpec, decay: Optional[Tensor],
                  packing: Optional[SpikePacking] = None) -> Optional[Tensor]:
    """Spikes (shaped as ``terms[0]``) of the sum of ``terms`` (one or two float32 / float64 tensors of one
    shape and dtype; the kernel adds them as it reads them) by the numba kernel, or None where it cannot
    run. With a neuron's ``packing`` (eager calls with gradients on), the spikes of a 0/1 neuron whose
    steps start at a byte (``[N, T, M]`` with ``M % 8 == 0``) carry a :class:`_Made`, and with
    ``packing.on`` the kernel packs them to bits as it writes them (see :class:`SpikePacking`)."""
    src = tuple(_as3d(t).numpy() for t in terms)
    return _numba_fire(src, "x" if len(terms) == 1 else "x+x", terms[0].shape, terms[0].dtype, spec, decay,
                       packing)


def _numba_fire(src: tuple, source: str, shape, dtype, spec: NeuronSpec, decay: Optional[Tensor],
                packing: Optional[SpikePacking], fused_madd: bool = False) -> Optional[Tensor]:
    """The spikes ``[N, T, ...]`` (``shape``) of the input the numba kernel reads from the arrays ``src`` as
    ``source`` says (``numba_kernels._load_kernel``), or None where it cannot run; ``packing`` as for
    :func:`_numba_spikes`."""
    s = torch.empty(shape, dtype=dtype)
    s3 = s.view(s.shape[0], s.shape[1], -1)
    packable = packing is not None and spec.dynamics == "lif" and s3.shape[2] % 8 == 0
    pack = packable and packing.on
    bits = torch.empty(s.numel() // 8, dtype=torch.uint8) if pack else None
    key = ("fwd", spec.dynamics, spec.hard, spec.decay_input, source, pack, fused_madd)
    if not nk.call(key, src, s3.numpy(), constants(spec, dtype, decay=decay).numpy(),
                   _no_flag() if bits is None else bits.numpy()):
        return None
    if packable:
        s._tetsnn_bits = _Made(bits, s._version, packing)
    return s


def _triton_hard(spec: NeuronSpec) -> bool:
    """The Triton kernels' HARD flag (ILIF resets softly whatever ``reset`` says)."""
    return spec.hard and spec.dynamics == "lif"


def _jobs(x3: Tensor) -> int:
    return nk.jobs(x3.shape[0], x3.shape[2])


def _input_grad(grad_s: Tensor, x: Tensor, spec: NeuronSpec, kernel: str,
                decay: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """``(dL/dx, dL/d decay or None)`` of a contiguous float32 / float64 input."""
    grad_decay = decay is not None
    if kernel == "triton":
        from . import triton_lif
        c = constants(spec, x.dtype, x.device, decay)
        gx, gd = triton_lif.backward(grad_s, x, c, _triton_hard(spec), spec.detach_reset,
                                     spec.surrogate, grad_decay, spec.dynamics == "ilif")
        return gx, None if gd is None else gd.sum()
    if numba_applies(x):
        x3 = _as3d(x)
        gx = torch.empty(x.shape, dtype=x.dtype)
        gd = torch.zeros(_jobs(x3) if grad_decay else 1, dtype=x.dtype)
        args = (_as3d(grad_s).numpy(), (x3.numpy(),), _as3d(gx).numpy(), gd.numpy(),
                constants(spec, x.dtype, decay=decay).numpy())
        key = ("bwd", spec.dynamics, spec.hard, spec.detach_reset, spec.surrogate, spec.decay_input, grad_decay,
               "x", False)
        if nk.call(key, *args):
            return gx, gd.sum() if grad_decay else None
    return tk.backward(grad_s, x, spec, _decay_value(spec, decay, x.dtype), _grad_fn(spec), grad_decay)


def _grad_fn(spec: NeuronSpec):
    if callable(spec.surrogate):
        return spec.surrogate
    grad, width = SURROGATES[spec.surrogate][1] if spec.surrogate in SURROGATES else None, spec.width
    return None if grad is None else (lambda v: grad(v, width))


def neuron_forward_body(x: Tensor, spec: NeuronSpec, kernel: str, decay: Optional[Tensor],
                        packing: Optional[SpikePacking] = None) -> Tensor:
    """Spikes of an ``[N, T, ...]`` input, in its dtype (half inputs are integrated in float32);
    ``packing``: see :func:`_numba_spikes`."""
    # the kernels work on a contiguous copy of a strided input (channels_last, a time slice, ...)
    return _spikes(half_to_float(x).contiguous(), spec, kernel, decay, packing).to(x.dtype)


def neuron_backward_body(grad_s: Tensor, x: Tensor, spec: NeuronSpec, kernel: str,
                         decay: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """dL/dx (in x's dtype) and dL/d decay (in the decay's dtype) from dL/ds and the saved input."""
    xs = half_to_float(x).contiguous()
    gx, gd = _input_grad(grad_s.to(xs.dtype).contiguous(), xs, spec, kernel, decay)
    return gx.to(x.dtype), None if gd is None else gd.to(decay.dtype)


@torch.library.custom_op("tetsnn::lif_forward", mutates_args=())
def lif_forward(x: Tensor, tau: float, threshold: float, reset: str, detach_reset: bool, surrogate: str,
                width: float, kernel: str, decay_input: bool = False, dynamics: str = "lif", max_level: int = 1,
                decay: Optional[Tensor] = None) -> Tensor:
    """Spikes of ``[N, T, ...]`` input ``x`` (the neuron flattened by :func:`flatten_neuron`)."""
    spec, kernel, decay = unflatten_neuron(tau, threshold, reset, detach_reset, surrogate, width, kernel,
                                           decay_input, dynamics, max_level, decay)
    return neuron_forward_body(x, spec, kernel, decay)


@lif_forward.register_fake
def _(x, *args):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)   # contiguous, as the kernels return


@torch.library.custom_op("tetsnn::lif_backward", mutates_args=())
def lif_backward(grad_s: Tensor, x: Tensor, tau: float, threshold: float, reset: str, detach_reset: bool,
                 surrogate: str, width: float, kernel: str, decay_input: bool = False, dynamics: str = "lif",
                 max_level: int = 1, decay: Optional[Tensor] = None) -> List[Tensor]:
    """``[dL/dx, dL/d decay]`` (the second empty for a fixed decay)."""
    spec, kernel, decay = unflatten_neuron(tau, threshold, reset, detach_reset, surrogate, width, kernel,
                                           decay_input, dynamics, max_level, decay)
    gx, gd = neuron_backward_body(grad_s, x, spec, kernel, decay)
    return [gx, x.new_empty(0) if gd is None else gd]


@lif_backward.register_fake
def _(grad_s, x, *args):
    decay = args[-1] if len(args) == N_NEURON_ARGS else None
    return [torch.empty(x.shape, dtype=x.dtype, device=x.device),
            x.new_empty(0) if decay is None else torch.empty_like(decay)]


_NEURON_DEFAULTS = (False, "lif", 1, None)   # decay_input, dynamics, max_level, decay: the ops' defaults


def _lif_setup_context(ctx, inputs, output):
    x, args = inputs[0], list(inputs[1:])
    args += _NEURON_DEFAULTS[len(args) - N_NEURON_ARGS:] if len(args) < N_NEURON_ARGS else []
    ctx.save_for_backward(x, args[-1])
    ctx.args = tuple(args[:-1])
    ctx.n_inputs = len(inputs)


def _lif_grads(ctx, gx, gd):
    grads = [gx] + [None] * (ctx.n_inputs - 1)
    if ctx.n_inputs == 1 + N_NEURON_ARGS:
        grads[-1] = gd
    return tuple(grads)


def _lif_backward(ctx, grad_s):
    x, decay = ctx.saved_tensors
    gx, gd = lif_backward(grad_s, x, *ctx.args, decay)
    return _lif_grads(ctx, gx, gd if decay is not None else None)


lif_forward.register_autograd(_lif_backward, setup_context=_lif_setup_context)


class _NeuronFunction(torch.autograd.Function):
    """The op's eager path: the same body and context without the dispatcher's per-call argument
    handling (about 50 us a call on the CPU); torch.compile traces the op itself."""

    @staticmethod
    def forward(ctx, x, *args_packing):
        *args, packing = args_packing   # the op's arguments, then the neuron's SpikePacking (or None)
        _lif_setup_context(ctx, (x, *args), None)
        decay = args[N_NEURON_ARGS - 1] if len(args) == N_NEURON_ARGS else None
        spec, kernel, decay = unflatten_neuron(*ctx.args, decay)
        return neuron_forward_body(x, spec, kernel, decay, packing)

    @staticmethod
    def backward(ctx, grad_s):
        x, decay = ctx.saved_tensors
        spec, kernel, _ = unflatten_neuron(*ctx.args, decay)
        gx, gd = neuron_backward_body(grad_s, x, spec, kernel, decay)
        return (*_lif_grads(ctx, gx, gd), None)


class _CustomNeuronFunction(torch.autograd.Function):
    """The graph-free neuron with a user-callable surrogate ``fn(v) -> ds/dv`` (torch-op kernels)."""

    @staticmethod
    def forward(ctx, x, decay, spec):
        ctx.save_for_backward(x, decay)
        ctx.spec = spec
        xs = half_to_float(x)
        return tk.forward(xs, spec, _decay_value(spec, decay, xs.dtype))[0].to(x.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        x, decay = ctx.saved_tensors
        spec = ctx.spec
        xs = half_to_float(x)
        gx, gd = tk.backward(grad_s.to(xs.dtype).contiguous(), xs, spec, _decay_value(spec, decay, xs.dtype),
                             spec.surrogate, decay is not None)
        return gx.to(x.dtype), None if gd is None else gd.to(decay.dtype), None


def neuron_spikes(x: Tensor, spec: NeuronSpec, kernel: str = "fused", decay: Optional[Tensor] = None,
                  packing: Optional[SpikePacking] = None) -> Tensor:
    """Spikes of ``[N, T, ...]`` input ``x`` by the fused kernels (``kernel`` "fused" or "triton");
    ``decay`` is a learnable decay (0-dim tensor) or None for the spec's fixed one; ``packing`` the
    neuron module's :class:`SpikePacking` (None: the kernel never packs the spikes).

    float16 / bfloat16 inputs are integrated in float32 and kept for backward as they are; spikes
    and gradients come back in the input's dtype.
    """
    if callable(spec.surrogate):
        if kernel != "fused":
            raise ValueError(f"the {kernel!r} LIF backend supports the surrogates {sorted(SURROGATE_IDS)}, "
                             f"not a callable; use backend='fused' or 'loop'")
        return _CustomNeuronFunction.apply(x, decay, spec)
    args = flatten_neuron(spec, kernel, decay)
    if decay is None:
        args = args[:-1]
        if spec.dynamics == "lif" and spec.max_level == 1:
            args = args[:-2]
            if not spec.decay_input:
                args = args[:-1]
    if torch.compiler.is_compiling():
        return lif_forward(x, *args)
    return _NeuronFunction.apply(x, *args, _asking(packing))


# --------------------------------------------------------------------------- bit packing of spikes

def _cpu_fast(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and nk.available()


@torch.library.custom_op("tetsnn::pack_spikes", mutates_args=())
def pack_spikes(x: Tensor) -> Tensor:
    """uint8 tensor of ``ceil(numel / 8)`` bytes; bit k of byte j is ``x.flatten()[8j + k] != 0``."""
    x = x.contiguous().view(-1)
    out = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
    if _cpu_fast(x) and nk.call(("pack", False), x.numpy(), out.numpy(), _no_flag()):
        return out
    return tk.pack(x, out)


_NO_FLAG = []


def _no_flag():
    """A small uint8 array the kernels take where they write no flag or bit."""
    if not _NO_FLAG:
        _NO_FLAG.append(torch.zeros(8, dtype=torch.uint8).numpy())
    return _NO_FLAG[0]


def _pack_checked(x: Tensor) -> Tensor:
    """:func:`pack_spikes` of ``x`` after :func:`check_spikes` (on the CPU in one pass over ``x``)."""
    if _cpu_fast(x):
        flat = x.detach().contiguous().view(-1)
        out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8)
        bad = torch.zeros(1, dtype=torch.uint8)
        if nk.call(("pack", True), flat.numpy(), out.numpy(), bad.numpy()):
            if bad.item():
                check_spikes(x)   # raises, naming a value
            return out
    check_spikes(x)
    return pack_spikes(x)


@pack_spikes.register_fake
def _(x):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.custom_op("tetsnn::unpack_spikes", mutates_args=())
def unpack_spikes(packed: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    """The 0/1 tensor of ``shape`` and ``dtype`` that :func:`pack_spikes` packed."""
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if _cpu_fast(out) and nk.call(("unpack",), packed.numpy(), out.view(-1).numpy(), _bit_table(dtype)):
        return out
    return tk.unpack(packed, out)


@unpack_spikes.register_fake
def _(packed, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


_BIT_TABLES = {}


def _bit_table(dtype):
    """``[256, 8]`` numpy array in ``dtype``: row b holds the bits of b, lowest first (the unpacking's table)."""
    if dtype not in _BIT_TABLES:
        b = torch.arange(256, dtype=torch.int32).unsqueeze(1)
        _BIT_TABLES[dtype] = ((b >> torch.arange(8, dtype=torch.int32)) & 1).to(dtype).numpy()
    return _BIT_TABLES[dtype]


_RECENT = []  # the latest packings, newest last: (key, weak ref to the owner of the input's memory, weak ref to the bits)
_RECENT_SIZE = 4


def check_spikes(x: Tensor, levels: int = 1) -> None:
    """ValueError unless every value of ``x`` is a spike count 0..levels (0 or 1 for binary spikes):
    the bits saved for the weight gradient would not rebuild anything else."""
    bad = (x != 0) & (x != 1) if levels <= 1 else (x != x.round()) | (x < 0) | (x > levels)
    if bad.any():
        kind = "0/1 spikes" if levels <= 1 else f"spike counts 0..{levels}"
        raise ValueError(f"a layer built for spike input (spikes=True) got the value {x[bad][0].item():g}; "
                         f"build layers whose input is not {kind} with spikes=False")


def pack_once(x: Tensor, checked: bool = True) -> Tensor:
    """``pack_spikes(x)``: the bits the neuron kernel that made ``x`` packed as it wrote it (see
    :class:`SpikePacking`), else those of one of the last few calls that packed the same, unmodified
    tensor (a block's input feeds conv1, the downsample and the residual add), else packed now, after
    :func:`check_spikes` unless ``checked`` is False (``x`` is known to be 0/1)."""
    if torch.compiler.is_compiling():
        return pack_spikes(x)
    bits = _made_bits(x)
    if bits is not None:
        return bits
    key = _packing_key(x)
    for k, alive, bits in _RECENT:
        if k == key and alive() is not None and bits() is not None:
            return bits()
    return remember_packing(x, _pack_checked(x) if checked else pack_spikes(x))


def _made_bits(x: Tensor) -> Optional[Tensor]:
    """The bits the neuron kernel packed ``x`` to as it wrote it, where ``x`` is all of a neuron's spikes,
    unmodified since (None where the kernel did not pack them); turns that neuron's packing on, so that
    its next spikes are packed as they are written."""
    owner = x if x._base is None else x._base
    made = getattr(owner, "_tetsnn_bits", None)
    if made is None or made.version != owner._version or x.dtype != owner.dtype or x.numel() != owner.numel() \
            or x.data_ptr() != owner.data_ptr() or not x.is_contiguous():
        return None
    made.packing.on = True
    return made.bits


def _packing_key(x: Tensor):
    # a contiguous tensor's bits follow its memory, whatever its shape (x and x.flatten(0, 1) share them)
    layout = ("contiguous", x.numel()) if x.is_contiguous() else (x.shape, x.stride())
    return (x.data_ptr(), layout, x.dtype, x.device, x._version)


def remember_packing(x: Tensor, bits: Tensor) -> Tensor:
    """Record ``bits`` as ``pack_spikes(x)`` of the 0/1 tensor ``x`` (made by a neuron, or unpacked from
    ``bits``), so that :func:`pack_once` returns them for ``x`` without checking or packing it again;
    returns ``bits``."""
    owner = x if x._base is None else x._base  # alive => its memory cannot hold another tensor
    _RECENT.append((_packing_key(x), weakref.ref(owner), weakref.ref(bits)))
    del _RECENT[:-_RECENT_SIZE]
    return bits


# --------------------------------------------------------------------------- BatchNorm fused into the neuron
# A conv-BN-neuron layer run module by module keeps two float tensors per step for backward: the
# BatchNorm keeps its input ``y`` (the conv output) and the neuron its input ``z = BN(y)``. ``z`` is an
# elementwise function of ``y`` and four per-channel vectors, so the fused op keeps ``y`` alone and
# rebuilds ``z`` in backward. With the residual add of a ResNet block before the neuron, the second
# operand is either the block input (0/1 spikes: kept as packed bits; ILIF's counts: kept as they are) or a downsample branch
# ``BN2(y2)`` (its conv output ``y2`` is kept, as its BatchNorm would keep it anyway).
#
# Forward, on the per-step batch ``y`` of shape ``[N*T, C, ...]`` (statistics pooled over batch, time
# and space, as ``SeqToANNContainer`` pools them)::
#
#     mean_c, var_c = mean and biased variance of y[:, c]          invstd_c = 1 / sqrt(var_c + eps)
#     z      = (y - mean) * invstd * weight + bias                  (torch's own batch_norm kernel)
#     z      = z + BN2(y2)   or   z + r                             (optional residual)
#     s      = neuron(z viewed as [N, T, C, ...])
#     running_mean <- (1 - m) running_mean + m mean_c
#     running_var  <- (1 - m) running_var  + m var_c * n / (n - 1)  (n = elements per channel)
#
# Backward::
#
#     z  = y * a + b per channel, a = invstd * weight, b = bias - mean * a, rebuilt inside the numba
#          BPTT kernel as it reads y (and y2, or the residual bits): torch's CPU batch_norm forms z
#          this way, and whether it rounds the products separately or once (fused multiply-add)
#          depends on the instruction set its kernel was built for, so the rounding that reproduces
#          it is found once per dtype on a random probe (``_rebuild_mode``). Where neither does
#          (or for half precision, or without numba), torch's kernel runs again on y instead.
#     gz = neuron backward from dL/ds and z (and dL/d decay for a learnable decay)
#     dL/dy, dL/dweight, dL/dbias = batch_norm_backward(gz, y, saved mean and invstd)
#     dL/dy2, ... likewise with gz;   dL/dr = gz
#
# With ``kernel="triton"`` (CUDA) the normalisation runs inside the Triton kernels of
# :mod:`tetsnn.kernels.triton_bn_lif` instead: ``z`` is never written, forward or backward, and the
# statistics come from ``torch.batch_norm_update_stats``; forward and backward form ``z`` by the same
# fused multiply-add, so the backward rebuilds the forward's ``z`` exactly, which may differ from
# torch's batch_norm kernel by an ulp.

class BNOperand(NamedTuple):
    """A training-mode BatchNorm as the fused op reads it."""
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    momentum: float
    eps: float

    @classmethod
    def of(cls, bn) -> "BNOperand":
        """The operand of an ``nn.BatchNorm`` in training mode, with ``num_batches_tracked`` advanced and
        the momentum chosen exactly as its ``forward`` does."""
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(bn.num_batches_tracked)
        track = bn.track_running_stats
        return cls(bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None,
                   momentum, bn.eps)


NO_BN = BNOperand(None, None, None, None, 0.0, 0.0)


class SavedBN(NamedTuple):
    """What backward keeps of one BatchNorm: its input, affine and batch statistics."""
    y: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    mean: Tensor
    invstd: Tensor
    eps: float


def _normalise(y, bn: BNOperand):
    """torch's training-mode batch_norm on copies of the running statistics:
    ``(z, mean, invstd, new_running_mean, new_running_var)`` (the last two empty without them)."""
    rm = None if bn.running_mean is None else bn.running_mean.clone()
    rv = None if bn.running_var is None else bn.running_var.clone()
    z, mean, invstd = _aten.native_batch_norm(y, bn.weight, bn.bias, rm, rv, True, bn.momentum, bn.eps)
    return z, mean, invstd, mean.new_empty(0) if rm is None else rm, mean.new_empty(0) if rv is None else rv


_STATS = {}   # dtype -> how _batch_stats_cpu reproduces native_batch_norm's statistics: "numba", "torch" or None


def _invstd_cpu(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)`` formed in float64 and rounded to var's dtype, as torch's CPU kernel forms it."""
    return (1 / torch.sqrt(var.double() + eps)).to(var.dtype)


def _numba_stats(y, bn: BNOperand) -> Optional[List[Tensor]]:
    """:func:`_batch_stats_cpu`'s "numba" way, or None where it does not apply (only contiguous float32
    input with more than one value per sample and channel: torch's loop for that layout is what the
    kernel ``bn_stats`` reproduces) or numba cannot run. The running statistics follow torch's
    float32/float64 steps."""
    if not (y.dtype == torch.float32 and y.dim() > 2 and y.numel() > y.shape[0] * y.shape[1] > 0
            and y.is_contiguous()):
        return None
    c = y.shape[1]
    y3 = y.view(y.shape[0], c, -1)
    mean, var_sum = y.new_empty(c), y.new_empty(c)
    if not nk.call(("bn_stats",), y3.numpy(), mean.numpy(), var_sum.numpy()):
        return None
    n = y3.shape[0] * y3.shape[2]
    m = torch.tensor(bn.momentum, dtype=torch.float32)   # torch casts the momentum to the statistics' dtype
    rm = rv = mean.new_empty(0)
    if bn.running_mean is not None:
        rm = m * mean + (1 - m) * bn.running_mean
    if bn.running_var is not None:   # the unbiased variance in float32, the sum in float64
        rv = (m.double() * (var_sum / (n - 1)).double() + ((1 - m) * bn.running_var).double()).float()
    return [mean, _invstd_cpu(var_sum / n, bn.eps), rm, rv]


def _batch_stats_cpu(y, bn: BNOperand, how: Optional[str] = None):
    """:func:`_batch_stats` as torch's CPU training-mode batch_norm gives them, bit for bit (``how``:
    :func:`_stats_mode`'s choice). "numba": :func:`_numba_stats` where it applies (its sums vectorised,
    about 3x faster). Otherwise "torch": ``batch_norm_update_stats`` runs the same statistics code.
    Either way ``invstd`` comes from :func:`_invstd_cpu`."""
    if (how or _stats_mode(y.dtype)) == "numba":
        out = _numba_stats(y, bn)
        if out is not None:
            return out
    return _batch_stats(y, bn, lambda var: _invstd_cpu(var, bn.eps))


def _stats_mode(dtype) -> Optional[str]:
    """How :func:`_batch_stats_cpu` gives what :func:`_normalise` gives, bit for bit, on random conv-like
    and linear-like input of ``dtype`` with running statistics: "numba" if its kernel does, else "torch"
    if ``batch_norm_update_stats`` does, else None (float32 only; checked once per process)."""
    if dtype not in _STATS:
        _STATS[dtype] = None
        g = torch.Generator().manual_seed(0)
        cases = []
        for shape in ((6, 5, 3, 7), (4, 3, 50), (40, 3)) if dtype == torch.float32 else ():
            y = torch.randn(shape, generator=g, dtype=dtype) * 3 + 1
            c = shape[1]
            cases.append((y, BNOperand(None, None, torch.randn(c, generator=g, dtype=dtype),
                                       torch.rand(c, generator=g, dtype=dtype), 0.1, 1e-5)))
        for how in ("numba", "torch") if cases else ():
            if how == "numba" and not nk.available():
                continue
            if all(torch.equal(p, q) for y, bn in cases for p, q in zip(_batch_stats_cpu(y, bn, how),
                                                                         _normalise(y, bn)[1:])):
                _STATS[dtype] = how
                break
    return _STATS[dtype]


def _stats_exact(dtype) -> bool:
    """Whether :func:`_batch_stats_cpu` reproduces torch's statistics for ``dtype`` (:func:`_stats_mode`)."""
    return _stats_mode(dtype) is not None


def _numba_bn_forward(y, bn: BNOperand, y2, bn2: BNOperand, residual, T, spec: NeuronSpec, decay,
                      packing) -> Optional[List[Tensor]]:
    """:func:`_bn_forward`'s output with BatchNorm's output never written: the batch statistics alone
    (:func:`_batch_stats_cpu`), then the numba kernel rebuilding ``BN(y)`` as it reads ``y``, as the
    backward does; None where that does not reproduce torch's batch_norm bit for bit (the caller
    normalises with torch, then runs the neuron)."""
    terms = (y,) if y2 is None else (y, y2)
    if not all(numba_applies(t) and t.dtype == y.dtype and t.is_contiguous() for t in terms) or bn.eps == 0 \
            or (y2 is not None and bn2.eps == 0) or not _stats_exact(y.dtype):
        return None
    fused_madd = _rebuild_mode(y.dtype)
    if fused_madd is None or (residual is not None and (residual.dtype != y.dtype or y2 is not None)):
        return None
    n = y.shape[0] // T
    shape = (n, T, *y.shape[1:])
    stats = _batch_stats_cpu(y, bn)
    src, source = _bn_operand(SavedBN(y, bn.weight, bn.bias, stats[0], stats[1], bn.eps), shape, fused_madd), "bn"
    stats2 = [stats[0].new_empty(0) for _ in range(4)]
    if y2 is not None:
        stats2 = _batch_stats_cpu(y2, bn2)
        src += _bn_operand(SavedBN(y2, bn2.weight, bn2.bias, stats2[0], stats2[1], bn2.eps), shape, fused_madd)
        source = "bn+bn"
    elif residual is not None:
        src, source = src + (_as3d(residual.view(shape)).numpy(),), "bn+x"
    s = _numba_fire(src, source, shape, y.dtype, spec, decay, packing, fused_madd)
    return None if s is None else [s, *stats, *stats2]


def _recompute(a: SavedBN, b: Optional[SavedBN], bits, bits_meta, n, t):
    """``z`` as the forward made it, viewed ``[N, T, C, ...]``."""
    z = _aten.native_batch_norm(a.y, a.weight, a.bias, None, None, True, 0.0, a.eps)[0]
    z = z.view(n, t, *z.shape[1:])
    if b is not None:
        z2 = _aten.native_batch_norm(b.y, b.weight, b.bias, None, None, True, 0.0, b.eps)[0]
        z = z + z2.view(n, t, *z2.shape[1:])
    elif bits is not None:
        z = z + (unpack_spikes(bits, *bits_meta) if bits.dtype == torch.uint8 else bits)
    return z


def _bn_forward(y: Tensor, bn: BNOperand, y2: Optional[Tensor], bn2: BNOperand, residual: Optional[Tensor], T: int,
                spec: NeuronSpec, kernel: str, decay: Optional[Tensor],
                packing: Optional[SpikePacking] = None) -> List[Tensor]:
    """Spikes ``[N, T, C, ...]`` of ``neuron(BN(y) [+ BN2(y2) | + residual])`` for ``y`` of shape
    ``[N*T, C, ...]``, then per BatchNorm ``mean, invstd, new_running_mean, new_running_var`` (the running
    statistics after this batch's update, for the caller to copy into the buffers; empty where absent).
    The op is functional (autograd needs that), so it updates copies of the running statistics.
    ``packing``: see :func:`_numba_spikes`."""
    if kernel == "triton":
        return _triton_forward(y, bn, y2, bn2, residual, T, spec, decay)
    out = _numba_bn_forward(y, bn, y2, bn2, residual, T, spec, decay, packing)
    if out is not None:
        return out
    n = y.shape[0] // T
    z, *stats = _normalise(y, bn)
    z = z.view(n, T, *z.shape[1:])
    stats2 = [stats[0].new_empty(0) for _ in range(4)]
    other = residual
    if y2 is not None:
        z2, *stats2 = _normalise(y2, bn2)
        other = z2.view(n, T, *z2.shape[1:])
    s = None
    if numba_applies(z) and (other is None or (other.dtype == z.dtype and other.shape == z.shape)):
        # the kernel adds the residual as it reads z: the sum is never written
        s = _numba_spikes((z,) if other is None else (z, other), spec, decay, packing)
    if s is None:
        s = neuron_forward_body(z if other is None else z + other, spec, kernel, decay, packing)
    return [s, *stats, *stats2]


def _bn_unflatten(y, weight, bias, running_mean, running_var, momentum, eps, y2, weight2, bias2, running_mean2,
                  running_var2, momentum2, eps2, residual, T, *neuron):
    spec, kernel, decay = unflatten_neuron(*neuron)
    return (y, BNOperand(weight, bias, running_mean, running_var, momentum, eps), y2,
            BNOperand(weight2, bias2, running_mean2, running_var2, momentum2, eps2), residual, T, spec, kernel, decay)


def bn_flatten(y, bn: BNOperand, y2, bn2: BNOperand, residual, T, spec: NeuronSpec, kernel: str, decay) -> tuple:
    """The BatchNorm-neuron op's arguments: y, the first BatchNorm, y2, the second, residual, T, then the
    neuron as :func:`flatten_neuron` flattens it."""
    return (y, *bn, y2, *bn2, residual, T, *flatten_neuron(spec, kernel, decay))


# argument positions in the flattened op (for autograd's per-input gradients)
_Y, _W, _B, _Y2, _W2, _B2, _RES, _DECAY = 0, 1, 2, 7, 8, 9, 14, 26
N_BN_ARGS = 27


@torch.library.custom_op("tetsnn::bn_lif_forward", mutates_args=())
def bn_lif_forward(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], momentum: float, eps: float,
                   y2: Optional[Tensor], weight2: Optional[Tensor], bias2: Optional[Tensor],
                   running_mean2: Optional[Tensor], running_var2: Optional[Tensor], momentum2: float, eps2: float,
                   residual: Optional[Tensor], T: int, tau: float, threshold: float, reset: str,
                   detach_reset: bool, surrogate: str, width: float, kernel: str, decay_input: bool = False,
                   dynamics: str = "lif", max_level: int = 1, decay: Optional[Tensor] = None) -> List[Tensor]:
    """The flattened :func:`_bn_forward` (see :func:`bn_flatten`)."""
    return _bn_forward(*_bn_unflatten(y, weight, bias, running_mean, running_var, momentum, eps, y2, weight2,
                                      bias2, running_mean2, running_var2, momentum2, eps2, residual, T, tau,
                                      threshold, reset, detach_reset, surrogate, width, kernel, decay_input,
                                      dynamics, max_level, decay))


@bn_lif_forward.register_fake
def _(y, weight, bias, running_mean, running_var, momentum, eps, y2, weight2, bias2, running_mean2, running_var2,
      momentum2, eps2, residual, T, *neuron):
    s = y.new_empty((y.shape[0] // T, T, *y.shape[1:]))

    def stats(x, rm, rv):
        if x is None:
            return [y.new_empty(0) for _ in range(4)]
        st = torch.float64 if x.dtype == torch.float64 else torch.float32
        run = lambda r: x.new_empty(0) if r is None else torch.empty_like(r)  # noqa: E731
        return [x.new_empty((x.shape[1],), dtype=st) for _ in range(2)] + [run(rm), run(rv)]
    return [s, *stats(y, running_mean, running_var), *stats(y2, running_mean2, running_var2)]


def _bn_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])   # statistics: no gradient flows back through them
    ctx.set_materialize_grads(False)
    _bn_save(ctx, inputs, output)


def _bn_save(ctx, inputs, output):
    y, bn, y2, bn2, residual, T, spec, kernel, decay = _bn_unflatten(*inputs)
    _, mean, invstd, _, _, mean2, invstd2, _, _ = output
    bits = None
    ctx.bits_dtype = y.dtype
    if residual is not None and y2 is None:
        # 0/1 spikes: one bit each; ILIF's counts are kept as they are
        bits = residual if spec.dynamics == "ilif" else pack_once(residual)
        ctx.bits_dtype = residual.dtype
    ctx.save_for_backward(y, bn.weight, bn.bias, mean, invstd, y2, bn2.weight, bn2.bias, mean2, invstd2, bits, decay)
    ctx.eps = (bn.eps, bn2.eps)
    ctx.T = T
    ctx.neuron = (spec, kernel)
    ctx.n_inputs = len(inputs)


def _bn_grads(gz, a: SavedBN, needs):
    """dL/dy, dL/dweight, dL/dbias of batch_norm from dL/dz (``None`` where not needed)."""
    if not any(needs):
        return None, None, None
    gz = gz.reshape(a.y.shape)
    w = a.weight
    return _aten.native_batch_norm_backward(gz, a.y, w, None, None, a.mean, a.invstd, True, a.eps,
                                            [needs[0], w is not None and needs[1], w is not None and needs[2]])


def _bn_input_grad(grad_s: Tensor, a: SavedBN, b: Optional[SavedBN], bits: Optional[Tensor], bits_dtype, T: int,
                   spec: NeuronSpec, kernel: str, decay: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """dL/dz ``[N, T, C, ...]`` of the neuron's input ``z`` (and dL/d decay) from dL/ds and what the
    forward saved."""
    if kernel == "triton":
        return _triton_backward(grad_s, a, b, bits, T, spec, decay)
    out = _numba_backward(grad_s, a, b, bits, bits_dtype, T, spec, decay)
    if out is None:
        n = a.y.shape[0] // T
        z = _recompute(a, b, bits, ([n, T, *a.y.shape[1:]], bits_dtype), n, T)
        out = neuron_backward_body(grad_s, z, spec, kernel, decay)
    return out


@torch.library.custom_op("tetsnn::bn_lif_backward", mutates_args=())
def bn_lif_backward(grad_s: Tensor, y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                    invstd: Tensor, eps: float, y2: Optional[Tensor], weight2: Optional[Tensor],
                    bias2: Optional[Tensor], mean2: Optional[Tensor], invstd2: Optional[Tensor], eps2: float,
                    bits: Optional[Tensor], bits_dtype: torch.dtype, T: int, tau: float, threshold: float,
                    reset: str, detach_reset: bool, surrogate: str, width: float, kernel: str,
                    decay_input: bool = False, dynamics: str = "lif", max_level: int = 1,
                    decay: Optional[Tensor] = None) -> List[Tensor]:
    """``[dL/dz, dL/d decay]`` (the second empty for a fixed decay) of the flattened BatchNorm-neuron."""
    spec, kernel, decay = unflatten_neuron(tau, threshold, reset, detach_reset, surrogate, width, kernel,
                                           decay_input, dynamics, max_level, decay)
    a = SavedBN(y, weight, bias, mean, invstd, eps)
    b = None if y2 is None else SavedBN(y2, weight2, bias2, mean2, invstd2, eps2)
    gz, gd = _bn_input_grad(grad_s, a, b, bits, bits_dtype, T, spec, kernel, decay)
    return [gz, y.new_empty(0) if gd is None else gd]


def _z_dtype(y, y2, bits, bits_dtype, kernel):
    """The dtype of the forward's ``z`` (the sum's promoted dtype; the Triton kernels work in y's)."""
    if kernel == "triton":
        return y.dtype
    return torch.promote_types(y.dtype, y2.dtype if y2 is not None else bits_dtype if bits is not None else y.dtype)


@bn_lif_backward.register_fake
def _(grad_s, y, weight, bias, mean, invstd, eps, y2, weight2, bias2, mean2, invstd2, eps2, bits, bits_dtype, T,
      *neuron):
    spec, kernel, decay = unflatten_neuron(*neuron)
    gz = y.new_empty((y.shape[0] // T, T, *y.shape[1:]), dtype=_z_dtype(y, y2, bits, bits_dtype, kernel))
    return [gz, y.new_empty(0) if decay is None else torch.empty_like(decay)]


def _bn_all_grads(ctx, grads, input_grad):
    """The gradients of every input from dL/ds, with ``input_grad`` forming dL/dz (the op or its body)."""
    y, weight, bias, mean, invstd, y2, weight2, bias2, mean2, invstd2, bits, decay = ctx.saved_tensors
    out = [None] * ctx.n_inputs
    if grads[0] is None:   # the spikes took no part in the loss
        return tuple(out)
    spec, kernel = ctx.neuron
    a = SavedBN(y, weight, bias, mean, invstd, ctx.eps[0])
    b = None if y2 is None else SavedBN(y2, weight2, bias2, mean2, invstd2, ctx.eps[1])
    with torch.no_grad():
        gz, gd = input_grad(grads[0], a, b, bits, ctx.bits_dtype, ctx.T, spec, kernel, decay)
        ni = ctx.needs_input_grad
        out[_Y], out[_W], out[_B] = _bn_grads(gz, a, (ni[_Y], ni[_W], ni[_B]))
        if b is not None:
            out[_Y2], out[_W2], out[_B2] = _bn_grads(gz, b, (ni[_Y2], ni[_W2], ni[_B2]))
        if bits is not None and ni[_RES]:
            out[_RES] = gz
        if decay is not None and ctx.n_inputs == N_BN_ARGS:
            out[_DECAY] = gd
    return tuple(out)


def _op_input_grad(grad_s, a, b, bits, bits_dtype, T, spec, kernel, decay):
    b = b or SavedBN(None, None, None, None, None, 0.0)
    gz, gd = bn_lif_backward(grad_s, *a, *b, bits, bits_dtype, T, *flatten_neuron(spec, kernel, decay))
    return gz, gd if decay is not None else None


def _bn_backward(ctx, grads):
    return _bn_all_grads(ctx, grads, _op_input_grad)


bn_lif_forward.register_autograd(_bn_backward, setup_context=_bn_setup_context)


class _BNNeuronFunction(torch.autograd.Function):
    """The op's eager path: the same body and backward without the dispatcher's per-call handling of
    its arguments (a third of a small layer's time on the CPU), returning the spikes alone and updating
    the running statistics (inputs that take no gradient) in place. torch.compile traces the op."""

    @staticmethod
    def forward(ctx, *inputs_packing):
        *inputs, packing = inputs_packing   # the op's arguments, then the neuron's SpikePacking (or None)
        output = _bn_forward(*_bn_unflatten(*inputs), packing)
        _bn_save(ctx, inputs, output)
        _update_running(inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_s):
        return (*_bn_all_grads(ctx, (grad_s,), _bn_input_grad), None)


class _BNNeuronSaved(torch.autograd.Function):
    """:class:`_BNNeuronFunction`'s saved tensors without its computation (``bn_neuron(saved_only=True)``):
    the statistics it saves and the spikes it returns are uninitialised tensors of their shapes."""

    @staticmethod
    def forward(ctx, *inputs):
        y, bn, y2, bn2, residual, T, spec, kernel, decay = _bn_unflatten(*inputs)
        st = torch.float64 if y.dtype == torch.float64 else torch.float32

        def stats(x):
            empty = y.new_empty(0)
            return [empty] * 4 if x is None else [x.new_empty((x.shape[1],), dtype=st)] * 2 + [empty] * 2
        _bn_save(ctx, inputs, [None, *stats(y), *stats(y2)])
        return y.new_empty((y.shape[0] // T, T, *y.shape[1:]))

    @staticmethod
    def backward(ctx, grad_s):
        return _bn_all_grads(ctx, (grad_s,), _bn_input_grad)


def _update_running(inputs, output):
    """Copy the op's new running statistics into the buffers it was given."""
    for old, new in ((inputs[3], output[3]), (inputs[4], output[4]), (inputs[10], output[7]), (inputs[11], output[8])):
        if old is not None:
            old.copy_(new)


# --------------------------------------------------------------------------- the numba backward (CPU)
# z rebuilt as torch's CPU batch_norm forms it, rounding as it does on this machine

_MODES = {}  # dtype -> True (fused multiply-add), False (separate roundings) or None (neither matches)


def _scale_shift(mean, invstd, weight, bias, neurons: int, fused_madd: bool):
    """BatchNorm's per-channel scale and shift, repeated for every neuron of a channel (numpy)."""
    w = (torch.ones_like(mean) if weight is None else weight.detach()).numpy()   # no affine: 1 and 0
    b = (torch.zeros_like(mean) if bias is None else bias.detach()).numpy()
    mean, invstd = mean.numpy(), invstd.numpy()
    a_c, b_c = mean.copy(), mean.copy()
    nk.kernel(("scale_shift", fused_madd))(mean, invstd, w, b, a_c, b_c)
    per = neurons // mean.shape[0]
    return a_c.repeat(per), b_c.repeat(per)


def _bn_operand(s: SavedBN, shape, fused_madd: bool) -> tuple:
    """The arrays a numba kernel rebuilds ``BN(y)`` from (source "bn"): ``y`` as ``[N, T, M]`` (``shape`` is
    ``[N, T, C, ...]``), its per-neuron scale and shift."""
    x3 = _as3d(s.y.view(shape))
    return (x3.numpy(), *_scale_shift(s.mean, s.invstd, s.weight, s.bias, x3.shape[2], fused_madd))


def _rebuild_mode(dtype):
    """How to rebuild torch's CPU batch_norm output for ``dtype``: True (one rounding, fused
    multiply-add), False (separate roundings) or None (neither reproduces it, or numba cannot)."""
    if dtype not in _MODES:
        _MODES[dtype] = _probe(dtype) if numba_applies(torch.empty(0, dtype=dtype)) else None
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
    nk.kernel(("values", "bn", fused_madd))(src, out.numpy(), constants(NeuronSpec(), y.dtype).numpy())
    return out.view(y.shape)


def _numba_backward(grad_s, a: SavedBN, b: Optional[SavedBN], bits, bits_dtype, T, spec: NeuronSpec,
                    decay: Optional[Tensor]):
    """``(dL/dz [N, T, C, ...], dL/d decay)`` by the numba BPTT kernel reading ``z`` rebuilt from ``y``
    (and ``y2`` or the residual bits) as it goes, or None where that kernel does not apply (the caller
    re-runs batch_norm)."""
    y = a.y
    if not numba_applies(y) or _z_dtype(y, None if b is None else b.y, bits, bits_dtype, "fused") != y.dtype:
        return None
    fused_madd = _rebuild_mode(y.dtype)
    if fused_madd is None:
        return None
    n = y.shape[0] // T
    shape = (n, T, *y.shape[1:])

    src = _bn_operand(a, shape, fused_madd)
    source = "bn"
    if b is not None:
        src, source = src + _bn_operand(b, shape, fused_madd), "bn+bn"
    elif bits is not None and bits.dtype == torch.uint8:
        src, source = src + (bits.numpy(),), "bn+bits"
    elif bits is not None:   # ILIF's residual counts, kept as floats
        src, source = src + (_as3d(bits).numpy(),), "bn+x"
    gz = torch.empty(shape, dtype=y.dtype)
    gs = _as3d(grad_s.to(y.dtype))
    grad_decay = decay is not None
    gd = torch.zeros(_jobs(gs) if grad_decay else 1, dtype=y.dtype)
    c = constants(spec, y.dtype, decay=decay).numpy()
    key = ("bwd", spec.dynamics, spec.hard, spec.detach_reset, spec.surrogate, spec.decay_input, grad_decay, source,
           fused_madd)
    if not nk.call(key, gs.numpy(), src, _as3d(gz).numpy(), gd.numpy(), c):
        return None
    return gz, (gd.sum().to(decay.dtype) if grad_decay else None)


# --------------------------------------------------------------------------- the Triton kernels

def _batch_stats(y, bn: BNOperand, invstd=None):
    """``[mean, invstd, new_running_mean, new_running_var]`` without normalising, on copies of the running
    statistics (the last two empty without them); ``invstd(var)`` forms invstd (default, the Triton
    path's: ``rsqrt(var + eps)``)."""
    rm = None if bn.running_mean is None else bn.running_mean.clone()
    rv = None if bn.running_var is None else bn.running_var.clone()
    mean, var = torch.batch_norm_update_stats(y, rm, rv, bn.momentum)
    return [mean, torch.rsqrt(var + bn.eps) if invstd is None else invstd(var),
            mean.new_empty(0) if rm is None else rm, mean.new_empty(0) if rv is None else rv]


def _triton_forward(y, bn: BNOperand, y2, bn2: BNOperand, residual, T, spec: NeuronSpec, decay):
    from . import triton_bn_lif as k
    cd = k.compute_dtype(y.dtype)
    stats = _batch_stats(y, bn)
    ab = k.affine(stats[0], stats[1], bn.weight, bn.bias, cd)
    stats2 = [stats[0].new_empty(0) for _ in range(4)]
    if y2 is not None:
        stats2 = _batch_stats(y2, bn2)
        ab = torch.cat([ab, k.affine(stats2[0], stats2[1], bn2.weight, bn2.bias, cd)])
        y2 = y2.to(y.dtype)
    r = None if residual is None else residual.to(y.dtype)
    s = k.forward(y, ab, y2, r, T, constants(spec, cd, y.device, decay), _triton_hard(spec), spec.dynamics == "ilif")
    return [s, *stats, *stats2]


def _triton_backward(grad_s, a: SavedBN, b: Optional[SavedBN], bits, T, spec: NeuronSpec, decay):
    from . import triton_bn_lif as k
    y = a.y
    cd = k.compute_dtype(y.dtype)
    ab = k.affine(a.mean, a.invstd, a.weight, a.bias, cd)
    y2 = None
    if b is not None:
        ab = torch.cat([ab, k.affine(b.mean, b.invstd, b.weight, b.bias, cd)])
        y2 = b.y.to(y.dtype)
    if bits is not None and bits.dtype != torch.uint8:   # ILIF's residual counts
        bits = bits.to(y.dtype)
    gz, gd = k.backward(grad_s.to(y.dtype), y, ab, y2, bits, T, constants(spec, cd, y.device, decay),
                        _triton_hard(spec), spec.detach_reset, spec.surrogate, decay is not None,
                        spec.dynamics == "ilif")
    return gz.to(y.dtype), None if gd is None else gd.sum().to(decay.dtype)


def bn_neuron(y: Tensor, bn, spec: NeuronSpec, kernel: str, T: int, decay: Optional[Tensor] = None,
              residual: Optional[Tensor] = None, y2: Optional[Tensor] = None, bn2=None,
              saved_only: bool = False, packing: Optional[SpikePacking] = None) -> Tensor:
    """Spikes of ``neuron(BN(y).view(N, T, ...) [+ BN2(y2) | + residual])`` for ``y = conv(x)`` of shape
    ``[N*T, C, ...]``, with ``bn`` / ``bn2`` training-mode ``nn.BatchNorm`` modules (their running statistics
    and ``num_batches_tracked`` are updated), the neuron described by ``spec`` (with its learnable ``decay``)
    and run by ``kernel`` ("fused" or "triton"). ``residual`` must be 0/1 spikes ``[N, T, C, ...]`` (kept as
    bits), or for an ILIF neuron its counts (kept as they are). ``packing``: the neuron module's
    :class:`SpikePacking` (None: the kernel never packs the spikes).

    ``saved_only`` (a ``memory="min"`` recompute, which reads the tensors the op saves for backward and
    nothing else, in eager mode): save what the op saves, with the batch statistics uninitialised (the
    recompute keeps the first forward's), and return uninitialised spikes; nothing is computed."""
    second = BNOperand.of(bn2) if y2 is not None else NO_BN
    inputs = bn_flatten(y, BNOperand.of(bn), y2, second, residual, T, spec, kernel, decay)
    if decay is None:   # the ops' defaults for what a fixed-decay LIF does not use
        inputs = inputs[:-1]
    if saved_only and not torch.compiler.is_compiling():
        return _BNNeuronSaved.apply(*inputs)
    if not torch.compiler.is_compiling():
        return _BNNeuronFunction.apply(*inputs, _asking(packing))
    output = bn_lif_forward(*inputs)
    with torch.no_grad():
        _update_running(inputs, output)
    return output[0]
