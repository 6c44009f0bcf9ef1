"""Pieces shared by the spiking transformers (:mod:`tetsnn.models.spikformer`,
:mod:`tetsnn.models.spike_driven`, :mod:`tetsnn.models.qkformer`).

Layout: token tensors are batch-first ``[N, T, C, L]`` (``L = H * W`` tokens, channels before tokens, as
the papers' code keeps them). The attention products multiply spikes by spikes: :func:`spike_attention`
(Spikformer's ``Q K^T V``) and :func:`spike_mul` (the masks of the Spike-driven Transformer and QKFormer)
keep their 0/1 operands for backward as packed bits (one bit per element) and rebuild them exactly.

Neurons follow the papers' code (SpikingJelly's ``MultiStepLIFNode(tau=2.0, detach_reset=True)``, whose
charge is ``v + (x - v) / tau`` and whose surrogate is a sigmoid of width 4): :func:`transformer_neuron`
builds ``LIF(tau=0.5, decay_input=True, detach_reset=True, surrogate="sigmoid", alpha=4.0)``. Their
attention neurons fire at ``v >= 0.5`` on inputs that are multiples of ``2**-3`` (sums of spikes times the
scale 0.125), so membranes land on 0.5 exactly; tetsnn's neurons fire on ``v > threshold``, and
:data:`ATTENTION_THRESHOLD` (``0.5 - 2**-24``) gives the same spikes for up to 20 time steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .compact import spike_conv1d
from .kernels.ops import pack_once, pack_spikes, unpack_spikes
from .layers import ConvBN, conv_bn_spike
from .memory import check_memory, run_block
from .neuron import make_neuron, spike_levels

__all__ = ["ATTENTION_THRESHOLD", "TRANSFORMER_LIF", "transformer_neuron", "spike_attention", "spike_mul",
           "ConvBNNeuron", "Neurons", "TokenMLP", "SpikingSelfAttention", "TransformerBlock",
           "trunc_normal_init", "check_norm", "resolve_preset", "SpikeProduct", "QKVProduct", "MaskedTokenSum",
           "ChannelSum"]

# The papers' attention neurons fire at v >= 0.5; their membranes are multiples of 2**-(3 + t) after t steps.
ATTENTION_THRESHOLD = 0.5 - 2.0 ** -24

# SpikingJelly's LIFNode(tau=2.0, detach_reset=True) in tetsnn's terms (the papers' neuron)
TRANSFORMER_LIF = dict(tau=0.5, decay_input=True, detach_reset=True, surrogate="sigmoid", alpha=4.0)


def transformer_neuron(neuron: str = "lif", T: Optional[int] = None, attention: bool = False,
                       **neuron_kw) -> nn.Module:
    """The neuron ``neuron`` with the papers' settings (:data:`TRANSFORMER_LIF` for "lif"; keyword
    arguments override them); ``attention=True`` gives the attention neuron's threshold."""
    if neuron in ("lif", "plif"):
        kw = dict(TRANSFORMER_LIF)
    elif neuron == "if":
        kw = {k: v for k, v in TRANSFORMER_LIF.items() if k not in ("tau", "decay_input")}
    else:
        kw = {}
    kw.update(neuron_kw)
    if attention and neuron != "relu":
        kw["threshold"] = ATTENTION_THRESHOLD
    return make_neuron(neuron, T=T, **kw)


class ConvBNNeuron(nn.Module):
    """``neuron(BN(conv(x)))`` per step on ``[N, T, C, ...]``, the BatchNorm fused into the neuron in
    training where the planner allows (:func:`tetsnn.layers.conv_bn_spike`). ``conv`` / ``bn`` are the
    children of ``self.fwd`` (a :class:`tetsnn.layers.ConvBN`)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, neuron: nn.Module, fuse_bn: bool = True):
        super().__init__()
        self.fwd = ConvBN(conv, bn)
        self.act = neuron
        self.fuse_bn = fuse_bn

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_spike(self.fwd, self.act, x, self.fuse_bn)


# --------------------------------------------------------------------------- spike products

def _compact(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and all(x.dtype in (torch.float32, torch.float64, torch.float16,
                                                       torch.bfloat16) for x in xs)


def _product(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``(v @ k^T) @ q * scale``: Spikformer's ``Q K^T V * scale`` in the channel layout ``[..., d, L]``."""
    return (v @ k.transpose(-2, -1)) @ q * scale


def _is_split_of(qkv: Tensor, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether q, k and v are the slices 0, 1, 2 of the contiguous ``qkv`` along dim -4 (same memory)."""
    return qkv.is_contiguous() and all(
        t.shape == qkv.shape[:-4] + qkv.shape[-3:] and t.data_ptr() == qkv[..., i, :, :, :].data_ptr()
        and t.stride() == qkv[..., i, :, :, :].stride() for i, t in enumerate((q, k, v)))


def _attention_grads(q: Tensor, k: Tensor, v: Tensor, grad: Tensor, scale: float, needs=(True, True, True)):
    """The gradients of ``(v @ k^T) @ q * scale`` with respect to q, k and v (None where not needed)."""
    g = grad * scale
    kv = v @ k.transpose(-2, -1)
    gq = kv.transpose(-2, -1) @ g if needs[0] else None
    gkv = g @ q.transpose(-2, -1)
    gk = gkv.transpose(-2, -1) @ v if needs[1] else None
    gv = gkv @ k if needs[2] else None
    return gq, gk, gv


class _SpikeAttentionFn(torch.autograd.Function):
    """``(v @ k^T) @ q * scale`` on 0/1 spikes ``[..., d, L]``; keeps q, k, v as packed bits and rebuilds
    ``v @ k^T`` in backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.meta = (list(q.shape), q.dtype, scale)
        ctx.save_for_backward(pack_spikes(q), pack_spikes(k), pack_spikes(v))   # neuron outputs: 0/1
        return _product(q, k, v, scale)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, scale = ctx.meta
        q, k, v = (unpack_spikes(p, shape, dtype) for p in ctx.saved_tensors)
        return (*_attention_grads(q, k, v, grad, scale, ctx.needs_input_grad[:3]), None)


class _StackedAttentionFn(torch.autograd.Function):
    """:class:`_SpikeAttentionFn` on one tensor ``qkv [..., 3, heads, d, L]`` holding q, k and v (one
    neuron's spikes): keeps the bits that neuron's kernel packed (:func:`pack_once`) and returns one
    gradient for the whole tensor, where three slices would each form a zero-filled gradient of its size."""

    @staticmethod
    def forward(ctx, qkv, scale):
        ctx.meta = (list(qkv.shape), qkv.dtype, scale)
        ctx.save_for_backward(pack_once(qkv, checked=False))   # neuron outputs: 0/1
        return _product(*qkv.unbind(-4), scale)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, scale = ctx.meta
        # each slice made contiguous once: the products would copy each strided operand anyway
        q, k, v = (t.contiguous() for t in unpack_spikes(ctx.saved_tensors[0], shape, dtype).unbind(-4))
        return torch.stack(_attention_grads(q, k, v, grad, scale), -4), None


def spike_attention(q: Tensor, k: Tensor, v: Tensor, scale: float = 0.125, compact: bool = True,
                    qkv: Optional[Tensor] = None) -> Tensor:
    """Spikformer's spiking self-attention product ``Q K^T V * scale`` in the channel layout
    ``[..., d, L]`` of its code (``(v @ k^T) @ q``: ``d x d`` before ``d x L``). With ``compact`` and
    gradients on, q, k and v are kept as packed bits for backward (they must be 0/1 spikes: they are not
    checked, as the neurons before them make them so). ``qkv``: the contiguous tensor ``[..., 3, heads, d,
    L]`` whose slices along dim -4 are q, k and v, if they are (its gradient is then formed whole)."""
    if not (compact and _compact(q, k, v)):
        return _product(q, k, v, scale)
    if qkv is not None and not torch.compiler.is_compiling() and _is_split_of(qkv, q, k, v):
        return _StackedAttentionFn.apply(qkv, scale)
    return _SpikeAttentionFn.apply(q, k, v, scale)


class _SpikeMulFn(torch.autograd.Function):
    """``a * b`` (broadcasting) of 0/1 spikes, both kept as packed bits."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.meta = ((list(a.shape), a.dtype), (list(b.shape), b.dtype))
        ctx.save_for_backward(pack_spikes(a), pack_spikes(b))
        return a * b

    @staticmethod
    def backward(ctx, grad):
        (sa, da), (sb, db) = ctx.meta
        pa, pb = ctx.saved_tensors
        a, b = unpack_spikes(pa, sa, da), unpack_spikes(pb, sb, db)
        ga = _sum_to(grad * b, sa) if ctx.needs_input_grad[0] else None
        gb = _sum_to(grad * a, sb) if ctx.needs_input_grad[1] else None
        return ga, gb


def _sum_to(g: Tensor, shape) -> Tensor:
    """``g`` summed over the dimensions broadcasting expanded from ``shape``."""
    dims = [i for i, (n, m) in enumerate(zip(shape, g.shape)) if n == 1 and m != 1]
    return g.sum(dims, keepdim=True) if dims else g


def spike_mul(a: Tensor, b: Tensor, compact: bool = True) -> Tensor:
    """``a * b`` of 0/1 spikes of the same number of dimensions (one may broadcast over size-1 dims),
    keeping both as packed bits for backward (``compact`` and gradients on)."""
    if not (compact and _compact(a, b)) or a.dim() != b.dim():
        return a * b
    return _SpikeMulFn.apply(a, b)


# --------------------------------------------------------------------------- blocks

@dataclass(frozen=True)
class Neurons:
    """How a transformer builds its neurons: the kind (a key of :data:`tetsnn.neuron.NEURONS`), the
    model's T, whether BatchNorm runs inside the neuron, and keyword arguments over the papers' settings."""
    kind: str = "lif"
    T: Optional[int] = None
    fuse_bn: bool = True
    kw: Tuple[Tuple[str, object], ...] = ()

    def make(self, attention: bool = False) -> nn.Module:
        return transformer_neuron(self.kind, T=self.T, attention=attention, **dict(self.kw))

    @property
    def levels(self) -> int:
        """The largest spike value (0 for the ReLU twin): what spike-fed layers keep bits for."""
        return spike_levels(self.kind, **dict(self.kw))

    def conv_bn_neuron(self, cin: int, cout: int, levels: int, bias: bool = False) -> ConvBNNeuron:
        """A token projection ``neuron(BN1d(Conv1d_1x1(x)))``; ``levels`` the largest input value (0: not
        spikes)."""
        return ConvBNNeuron(spike_conv1d(cin, cout, 1, bias=bias, spikes=levels), nn.BatchNorm1d(cout),
                            self.make(), self.fuse_bn)


class TokenMLP(nn.Module):
    """Two token projections, each Conv1d 1x1 + BatchNorm + neuron (Spikformer's and QKFormer's MLP)."""

    def __init__(self, dim: int, hidden: int, neurons: Neurons, levels_in: int, bias: bool = True):
        super().__init__()
        self.fc1 = neurons.conv_bn_neuron(dim, hidden, levels_in, bias)
        self.fc2 = neurons.conv_bn_neuron(hidden, dim, neurons.levels, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x))


class SpikingSelfAttention(nn.Module):
    """Spikformer's SSA on tokens ``[N, T, C, L]``: q, k, v = neuron(BN(Conv1d(x))) (one conv of 3C
    channels), ``attn = neuron_0.5(Q K^T V * scale)`` per head, then neuron(BN(Conv1d(attn)))."""

    def __init__(self, dim: int, heads: int, neurons: Neurons, levels_in: int, scale: float = 0.125,
                 qkv_bias: bool = False, proj_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = neurons.conv_bn_neuron(dim, 3 * dim, levels_in, qkv_bias)
        self.product = QKVProduct(scale, compact=neurons.levels == 1)
        self.attn_act = neurons.make(attention=True)
        self.proj = neurons.conv_bn_neuron(dim, dim, neurons.levels, proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c, length = x.shape
        qkv = self.qkv(x).view(n, t, 3, self.heads, c // self.heads, length)
        y = self.product(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], qkv=qkv)
        return self.proj(self.attn_act(y.reshape(n, t, c, length)))

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class TransformerBlock(nn.Module):
    """``x + attn(x)``, then ``+ mlp(x)`` on tokens (Spikformer's block; QKFormer's with its attention).
    With ``memory="min"`` each half is a block of :func:`tetsnn.memory.run_block`: it keeps its input (the
    residual stream, as bit planes when it holds spike counts) and recomputes the rest in backward."""

    memory = "default"

    def __init__(self, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attn = attn
        self.mlp = mlp

    def forward(self, x: Tensor) -> Tensor:
        x = run_block(self._attention, x, -1, self.memory, (self,))
        return run_block(self._mlp, x, -1, self.memory, (self,))

    def _attention(self, x: Tensor) -> Tensor:
        return x + self.attn(x)

    def _mlp(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


def set_memory(model: nn.Module, memory: str) -> str:
    """Give every block of a transformer (the modules with a ``memory`` setting) ``memory``; returns it."""
    check_memory(memory)
    for m in model.modules():
        if m is not model and "memory" in vars(type(m)):
            m.memory = memory
    return memory


def trunc_normal_init(model: nn.Module) -> None:
    """The papers' initialisation: truncated normal (std 0.02) weights and zero biases for Linear and
    convolutions, BatchNorm at weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_norm(norm: str) -> None:
    """The transformers normalise with BatchNorm (``norm="bn"``), as their papers do; tdBN and TEBN are
    built for 2-d feature maps and are not offered."""
    if norm != "bn":
        raise ValueError(f"the spiking transformers take norm='bn' only, got {norm!r}")


def resolve_preset(name: str, presets: dict, preset: Optional[str], overrides: dict) -> dict:
    """The architecture of ``preset`` (a key of ``presets``) with the explicit ``overrides`` (those not None)."""
    if preset is not None and preset not in presets:
        raise ValueError(f"unknown {name} preset {preset!r}: expected one of {sorted(k for k in presets if k)}")
    arch = dict(presets[preset] if preset is not None else presets[None])
    arch.update({k: v for k, v in overrides.items() if v is not None})
    return arch


# --------------------------------------------------------------------------- the products as modules
# (what tetsnn.analysis.profile hooks: each counts the accumulates its spike operands drive)

class SpikeProduct(nn.Module):
    """Base of the attention products: ``spike_synops(*inputs)`` is the number of accumulates the call
    performs (one per nonzero spike operand element and element it multiplies), ``dense_macs(*inputs)``
    the multiply-accumulates of the same product on dense operands."""

    multiplies_activations = True   # a product of two activations (NIR cannot express it)

    def spike_synops(self, *inputs: Tensor) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense_macs(self, *inputs: Tensor) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


class QKVProduct(SpikeProduct):
    """``(v @ k^T) @ q * scale`` on ``[..., d, L]`` (:func:`spike_attention`). Accumulates: ``v @ k^T`` adds
    a row of k for every spike of v (``nnz(v) * d``), then ``(v k^T) @ q`` a column of ``v k^T`` for every
    spike of q (``nnz(q) * d``)."""

    def __init__(self, scale: float = 0.125, compact: bool = True):
        super().__init__()
        self.scale, self.compact = float(scale), compact

    def forward(self, q: Tensor, k: Tensor, v: Tensor, qkv: Optional[Tensor] = None) -> Tensor:
        """``qkv``: the one tensor q, k and v are slices of, if they are (see :func:`spike_attention`)."""
        return spike_attention(q, k, v, self.scale, self.compact, qkv)

    def spike_synops(self, q, k, v) -> int:
        d = q.shape[-2]
        return int((v != 0).sum().item()) * d + int((q != 0).sum().item()) * d

    def dense_macs(self, q, k, v) -> int:
        d, length = q.shape[-2:]
        return 2 * q[..., 0, 0].numel() * d * d * length

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class MaskedTokenSum(SpikeProduct):
    """SDSA's ``sum over tokens of k * v`` on ``[..., d, L]``: the product is a mask (an AND of spikes), the
    sum accumulates each nonzero product once."""

    def __init__(self, compact: bool = True):
        super().__init__()
        self.compact = compact

    def forward(self, k: Tensor, v: Tensor) -> Tensor:
        return spike_mul(k, v, self.compact).sum(-1, keepdim=True)

    def spike_synops(self, k, v) -> int:
        return int(((k != 0) & (v != 0)).sum().item())

    def dense_macs(self, k, v) -> int:
        return k.numel()


class ChannelSum(SpikeProduct):
    """QKFormer's token attention: the sum of q over each head's channels ``[..., d, L] -> [..., 1, L]``
    (one accumulate per spike of q). Its mask times k is an AND of spikes."""

    multiplies_activations = True

    def forward(self, q: Tensor) -> Tensor:
        return q.sum(-2, keepdim=True)

    def spike_synops(self, q) -> int:
        return int((q != 0).sum().item())

    def dense_macs(self, q) -> int:
        return q.numel()
