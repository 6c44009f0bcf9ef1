"""QKFormer (Zhou et al., NeurIPS 2024): the hierarchical spiking transformer with Q-K attention, as
its official code builds it.

Stages of patch embedding (conv3x3-BN-[max pool]-neuron steps, with a strided conv1x1-BN-neuron
shortcut whose spikes are added) and blocks ``x + attn(x)``, ``+ mlp(x)``. The early stages use token
Q-K attention: ``q, k = neuron(BN(conv1x1(x)))``, ``mask = neuron_0.5(sum of q over each head's
channels)``, ``neuron(BN(conv1x1(mask * k)))``; the last stage uses Spikformer's spiking self-attention.
The head is linear on the token mean, per time step.

``layout`` picks the official code's embedding for "imagenet" (three stages of 1, 2 and depth-3 blocks,
widths C/4, C/2, C), "cifar" (1, 1 and depth-2 blocks) and "dvs" (two stages of one block each, widths
C/2 and C, on 128x128 event frames; the shortcut of its first embedding starts after the first pooled
step, with stride 4, as in the code that trained the paper's CIFAR10-DVS model).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from ..attention import (ChannelSum, Neurons, SpikingSelfAttention, TokenMLP, TransformerBlock, check_norm, set_memory,
                         resolve_preset, spike_mul, trunc_normal_init)
from ..compact import spike_conv2d
from ..memory import run_block
from ..layers import ConvBN, conv_bn_spike
from ._registry import register_model
from .base import SpikingModel

_IMAGENET = dict(img_size=224, in_channels=3, mlp_ratio=4.0, layout="imagenet")
PRESETS = {
    None: dict(_IMAGENET, embed_dim=384, depth=10, heads=6),
    "imagenet-10-384": dict(_IMAGENET, embed_dim=384, depth=10, heads=6),
    "imagenet-10-512": dict(_IMAGENET, embed_dim=512, depth=10, heads=8),
    "imagenet-10-768": dict(_IMAGENET, embed_dim=768, depth=10, heads=12),
    "cifar-4-384": dict(img_size=32, in_channels=3, mlp_ratio=4.0, layout="cifar", embed_dim=384, depth=4, heads=8),
    "dvs-2-256": dict(img_size=128, in_channels=2, mlp_ratio=1.0, layout="dvs", embed_dim=256, depth=2, heads=16),
}


class Step(NamedTuple):
    """One conv3x3-BN-[max pool]-neuron step of a patch embedding."""
    cin: int
    cout: int
    pool: bool


class EmbedSpec(NamedTuple):
    """A patch embedding: its steps, where its shortcut starts (-1: the input, i: after step i) and the
    shortcut's stride."""
    steps: Sequence[Step]
    shortcut_from: int
    stride: int


def _embeds(layout: str, in_channels: int, dim: int):
    """``(EmbedSpec, width, blocks-of-this-stage-or-None)`` per stage of ``layout``."""
    q, h = dim // 4, dim // 2
    if layout == "imagenet":
        return [EmbedSpec([Step(in_channels, q // 2, True), Step(q // 2, q, True), Step(q, q, False)], 0, 2),
                EmbedSpec([Step(q, h, True), Step(h, h, False)], -1, 2),
                EmbedSpec([Step(h, dim, True), Step(dim, dim, False)], -1, 2)]
    if layout == "cifar":
        return [EmbedSpec([Step(in_channels, q // 2, False), Step(q // 2, q, False)], 0, 1),
                EmbedSpec([Step(q, h, False), Step(h, h, True)], -1, 2),
                EmbedSpec([Step(h, dim, False), Step(dim, dim, True)], -1, 2)]
    if layout == "dvs":
        e = h   # the first stage's width
        return [EmbedSpec([Step(in_channels, e // 8, False), Step(e // 8, e // 4, True), Step(e // 4, e // 2, True),
                           Step(e // 2, e, True)], 1, 4),
                EmbedSpec([Step(h, dim, False), Step(dim, dim, True)], -1, 2)]
    raise ValueError(f"unknown qkformer layout {layout!r}: expected 'imagenet', 'cifar' or 'dvs'")


def _stage_blocks(layout: str, depth: int):
    if layout == "imagenet":
        counts = [1, 2, depth - 3]
    elif layout == "cifar":
        counts = [1, 1, depth - 2]
    else:
        counts = [1, depth - 1]
    if min(counts) < 1:
        raise ValueError(f"depth {depth} is too small for the qkformer layout {layout!r}")
    return counts


class PatchEmbed(nn.Module):
    """A QKFormer patch embedding on ``[N, T, C, H, W]`` (output: the sum of two spike maps)."""

    def __init__(self, spec: EmbedSpec, neurons: Neurons, levels_in: int):
        super().__init__()
        lv = neurons.levels
        self.convs = nn.ModuleList(ConvBN(spike_conv2d(s.cin, s.cout, 3, 1, 1, bias=False,
                                                       spikes=levels_in if i == 0 else lv), nn.BatchNorm2d(s.cout))
                                   for i, s in enumerate(spec.steps))
        self.acts = nn.ModuleList(neurons.make() for _ in spec.steps)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.pools = tuple(s.pool for s in spec.steps)
        src = spec.steps[spec.shortcut_from].cout if spec.shortcut_from >= 0 else spec.steps[0].cin
        self.shortcut = ConvBN(spike_conv2d(src, spec.steps[-1].cout, 1, spec.stride, 0, bias=False,
                                            spikes=lv if spec.shortcut_from >= 0 else levels_in),
                               nn.BatchNorm2d(spec.steps[-1].cout))
        self.shortcut_act = neurons.make()
        self.shortcut_from = spec.shortcut_from
        self.fuse_bn = neurons.fuse_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = x
        for i, (conv, act, pool) in enumerate(zip(self.convs, self.acts, self.pools)):
            if pool:   # conv-BN-max pool-neuron: the pool sits between BatchNorm and neuron
                y = conv(x)
                n, t = y.shape[:2]
                x = act(self.pool(y.flatten(0, 1)).unflatten(0, (n, t)))
            else:
                x = conv_bn_spike(conv, act, x, self.fuse_bn)
            if i == self.shortcut_from:
                feat = x
        return x + conv_bn_spike(self.shortcut, self.shortcut_act, feat, self.fuse_bn)


class TokenQKAttention(nn.Module):
    """Token Q-K attention on tokens ``[N, T, C, L]``."""

    def __init__(self, dim: int, heads: int, neurons: Neurons, levels_in: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qk = neurons.conv_bn_neuron(dim, 2 * dim, levels_in, bias=False)
        self.channel_sum = ChannelSum()
        self.attn_act = neurons.make(attention=True)
        self.proj = neurons.conv_bn_neuron(dim, dim, neurons.levels, bias=True)
        self.compact = neurons.levels == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c, length = x.shape
        qk = self.qk(x).view(n, t, 2, self.heads, c // self.heads, length)
        q, k = qk[:, :, 0], qk[:, :, 1]
        mask = self.attn_act(self.channel_sum(q))   # [N, T, heads, 1, L]
        return self.proj(spike_mul(mask, k, self.compact).reshape(n, t, c, length))

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class QKStage(nn.Module):
    """A patch embedding, then blocks on its tokens (back to ``[N, T, C, H, W]``); with ``memory="min"``
    the embedding is a block of :func:`tetsnn.memory.run_block`."""

    memory = "default"

    def __init__(self, embed: PatchEmbed, blocks: Sequence[nn.Module]):
        super().__init__()
        self.embed = embed
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_block(self.embed, x, -1, self.memory, (self,))
        return self.blocks(x.flatten(3)).view(x.shape)


class QKFormer(SpikingModel):
    """QKFormer on ``[N, T, C, H, W]`` returning per-step logits ``[N, T, classes]``. ``neuron`` /
    ``neuron_kw`` override the papers' LIF; ``neuron="relu"`` is the ANN twin."""

    def __init__(self, num_classes: int = 1000, T: int = 4, embed_dim: int = 384, depth: int = 10, heads: int = 6,
                 img_size: int = 224, in_channels: int = 3, mlp_ratio: float = 4.0, layout: str = "imagenet",
                 scale: float = 0.125, neuron: str = "lif", fuse_bn: bool = True, norm: str = "bn",
                 memory: str = "default", **neuron_kw):
        super().__init__(T)
        check_norm(norm)
        if embed_dim % 16:
            raise ValueError(f"embed_dim must be divisible by 16, got {embed_dim!r}")
        if img_size % {"imagenet": 16, "cifar": 4, "dvs": 16}.get(layout, 1):
            raise ValueError(f"img_size {img_size!r} does not fit the qkformer layout {layout!r}")
        neurons = Neurons(neuron, T, fuse_bn, tuple(sorted(neuron_kw.items())))
        lv = neurons.levels
        specs = _embeds(layout, in_channels, embed_dim)
        counts = _stage_blocks(layout, depth)
        stages, level = [], 0
        for s, (spec, count) in enumerate(zip(specs, counts)):
            embed = PatchEmbed(spec, neurons, level)
            dim = spec.steps[-1].cout
            level = 2 * lv
            blocks = []
            for _ in range(count):
                attn = (SpikingSelfAttention(dim, heads, neurons, level, scale, qkv_bias=False, proj_bias=True)
                        if s == len(specs) - 1 else TokenQKAttention(dim, heads, neurons, level))
                blocks.append(TransformerBlock(attn, TokenMLP(dim, int(dim * mlp_ratio), neurons, level + lv)))
                level += 2 * lv
            stages.append(QKStage(embed, blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(embed_dim, num_classes)
        trunc_normal_init(self)
        self.memory = set_memory(self, memory)

    def forward_seq(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x).flatten(3).mean(3))


@register_model("qkformer", num_classes=1000)
def qkformer(num_classes=1000, T=4, preset=None, embed_dim=None, depth=None, heads=None, img_size=None,
             in_channels=None, mlp_ratio=None, layout=None, **kw):
    """QKFormer (HST); ``preset``: one of "imagenet-10-384" (the default), "imagenet-10-512",
    "imagenet-10-768", "cifar-4-384", "dvs-2-256". Explicit keywords override the preset."""
    arch = resolve_preset("qkformer", PRESETS, preset, dict(
        embed_dim=embed_dim, depth=depth, heads=heads, img_size=img_size, in_channels=in_channels,
        mlp_ratio=mlp_ratio, layout=layout))
    return QKFormer(num_classes, T, **arch, **kw)
