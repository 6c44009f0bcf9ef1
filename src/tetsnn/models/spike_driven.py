"""Spike-driven Transformer (v1; Yao et al., NeurIPS 2023), as its official code builds it.

Membrane shortcuts: every residual adds BatchNorm outputs (membrane potentials), and each block runs
its neurons first. Patch embedding: three conv3x3-BN-neuron stages (C/8, C/4, C/2), each followed by a
3x3/2 max pool of spikes where ``pooling`` says "1"; a conv3x3-BN to C (pooled where the fourth digit
says so), whose output ``u`` feeds ``u + BN(conv3x3(neuron(u)))``. Spike-driven self-attention (SDSA):
``s = neuron(x)``; q, k, v = neuron(BN(conv1x1(s))); per head ``kv = neuron_0.5(sum over tokens of
k * v)``; ``x + BN(conv1x1(q * kv))``. MLP: ``h = BN(conv1x1(neuron(x)))`` (plus x when the hidden width
equals the width), ``out = BN(conv1x1(neuron(h))) + (h or x)``. Head: neuron of the token mean, then a
linear layer per time step. ``dvs=True`` adds the official code's 3x3 max pool ("erode") of k, v and the
products of the attention, as its event-data models use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import (ConvBNNeuron, MaskedTokenSum, Neurons, check_norm, resolve_preset, set_memory, spike_mul,
                         trunc_normal_init)
from ..compact import spike_conv1d, spike_conv2d, spike_linear, spike_max_pool2d
from ..memory import run_block
from ..layers import ConvBN, SeqToANNContainer
from ._registry import register_model
from .base import SpikingModel

_IMAGENET = dict(img_size=224, in_channels=3, heads=8, mlp_ratio=4.0, pooling="1111", dvs=False)
PRESETS = {
    None: dict(_IMAGENET, embed_dim=384, depth=8),
    "imagenet-8-384": dict(_IMAGENET, embed_dim=384, depth=8),
    "imagenet-8-512": dict(_IMAGENET, embed_dim=512, depth=8),
    "imagenet-8-768": dict(_IMAGENET, embed_dim=768, depth=8),
    "cifar-2-512": dict(img_size=32, in_channels=3, heads=8, mlp_ratio=4.0, pooling="0011", dvs=False,
                        embed_dim=512, depth=2),
    # the official CIFAR10-DVS configuration: 2-256 on 64x64 frames, with the event-data erode
    "dvs-2-256": dict(img_size=64, in_channels=2, heads=8, mlp_ratio=4.0, pooling="0011", dvs=True,
                      embed_dim=256, depth=2),
}


def _erode(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """3x3 / stride-1 max pool over the last two dims ``(h, w)`` of ``x`` (its leading dims kept)."""
    lead = x.shape[:-2]
    y = F.max_pool2d(x.reshape(-1, 1, h, w), 3, 1, 1)
    return y.view(*lead, h, w)


class SpikeDrivenPatchEmbed(nn.Module):
    def __init__(self, in_channels: int, embed_dim: int, pooling: str, neurons: Neurons):
        super().__init__()
        if len(pooling) != 4 or set(pooling) - {"0", "1"}:
            raise ValueError(f"pooling must be four 0/1 digits, got {pooling!r}")
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8, got {embed_dim!r}")
        lv = neurons.levels
        widths = [in_channels, embed_dim // 8, embed_dim // 4, embed_dim // 2]
        self.stages = nn.ModuleList(
            ConvBNNeuron(spike_conv2d(cin, cout, 3, 1, 1, bias=False, spikes=lv if i else 0), nn.BatchNorm2d(cout),
                         neurons.make(), neurons.fuse_bn)
            for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])))
        self.pooling = pooling
        self.pool = SeqToANNContainer(spike_max_pool2d(3, 2, 1, spikes=lv))
        self.last = ConvBN(spike_conv2d(embed_dim // 2, embed_dim, 3, 1, 1, bias=False, spikes=lv),
                           nn.BatchNorm2d(embed_dim))
        self.last_pool = SeqToANNContainer(nn.MaxPool2d(3, 2, 1))
        self.last_act = neurons.make()
        self.rpe = ConvBN(spike_conv2d(embed_dim, embed_dim, 3, 1, 1, bias=False, spikes=lv), nn.BatchNorm2d(embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, pool in zip(self.stages, self.pooling):
            x = stage(x)
            if pool == "1":
                x = self.pool(x)
        u = self.last(x)
        if self.pooling[3] == "1":
            u = self.last_pool(u)
        return u + self.rpe(self.last_act(u))


class SpikeDrivenSelfAttention(nn.Module):
    """SDSA on ``[N, T, C, H, W]`` (membrane potentials in, membrane potentials out)."""

    def __init__(self, dim: int, heads: int, neurons: Neurons, dvs: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by heads {heads}")
        lv = neurons.levels
        self.heads, self.dvs = heads, dvs
        self.shortcut_act = neurons.make()
        self.qkv = neurons.conv_bn_neuron(dim, 3 * dim, lv, bias=False)
        self.token_sum = MaskedTokenSum(compact=lv == 1)
        self.attn_act = neurons.make(attention=True)
        self.proj = ConvBN(spike_conv1d(dim, dim, 1, bias=True, spikes=lv), nn.BatchNorm1d(dim))
        self.compact = lv == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c, h, w = x.shape
        d = c // self.heads
        qkv = self.qkv(self.shortcut_act(x).flatten(3)).view(n, t, 3, self.heads, d, h * w)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.dvs:   # the official code pools k and v as [.., C, H, W] maps
            k = _erode(k.reshape(n, t, c, h, w), h, w).view(n, t, self.heads, d, h * w)
            v = _erode(v.reshape(n, t, c, h, w), h, w).view(n, t, self.heads, d, h * w)
        if self.dvs:   # ... and the products in its [.., tokens, d] layout
            kv = _erode((k * v).transpose(-1, -2), h * w, d).transpose(-1, -2).sum(-1, keepdim=True)
        else:
            kv = self.token_sum(k, v)
        kv = self.attn_act(kv)   # [N, T, heads, d, 1]
        y = spike_mul(q, kv, self.compact)
        if self.dvs:
            y = _erode(y.transpose(-1, -2), h * w, d).transpose(-1, -2)
        return x + self.proj(y.reshape(n, t, c, h * w)).view(n, t, c, h, w)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dvs={self.dvs}"


class SpikeDrivenMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, neurons: Neurons):
        super().__init__()
        lv = neurons.levels
        self.act1 = neurons.make()
        self.fc1 = ConvBN(spike_conv1d(dim, hidden, 1, bias=True, spikes=lv), nn.BatchNorm1d(hidden))
        self.act2 = neurons.make()
        self.fc2 = ConvBN(spike_conv1d(hidden, dim, 1, bias=True, spikes=lv), nn.BatchNorm1d(dim))
        self.res = dim == hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.flatten(3)
        h = self.fc1(self.act1(x))
        if self.res:
            h = h + x
            x = h
        return (self.fc2(self.act2(h)) + x).view(shape)


class SpikeDrivenBlock(nn.Module):
    """Attention, then MLP, each with its residual; with ``memory="min"`` each is a block of
    :func:`tetsnn.memory.run_block`."""

    memory = "default"

    def __init__(self, dim: int, heads: int, hidden: int, neurons: Neurons, dvs: bool = False):
        super().__init__()
        self.attn = SpikeDrivenSelfAttention(dim, heads, neurons, dvs)
        self.mlp = SpikeDrivenMLP(dim, hidden, neurons)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_block(self.attn, x, -1, self.memory, (self,))
        return run_block(self.mlp, x, -1, self.memory, (self,))


class SpikeDrivenTransformer(SpikingModel):
    """Spike-driven Transformer v1 on ``[N, T, C, H, W]`` returning per-step logits ``[N, T, classes]``.
    ``neuron`` / ``neuron_kw`` override the papers' LIF; ``neuron="relu"`` is the ANN twin."""

    def __init__(self, num_classes: int = 1000, T: int = 4, embed_dim: int = 384, depth: int = 8, heads: int = 8,
                 img_size: int = 224, in_channels: int = 3, mlp_ratio: float = 4.0, pooling: str = "1111",
                 dvs: bool = False, neuron: str = "lif", fuse_bn: bool = True, norm: str = "bn",
                 memory: str = "default", **neuron_kw):
        super().__init__(T)
        check_norm(norm)
        side = img_size // 2 ** pooling.count("1") if isinstance(pooling, str) else 0
        if side < 1:
            raise ValueError(f"img_size {img_size!r} is too small for pooling {pooling!r}")
        neurons = Neurons(neuron, T, fuse_bn, tuple(sorted(neuron_kw.items())))
        self.patch_embed = SpikeDrivenPatchEmbed(in_channels, embed_dim, pooling, neurons)
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.Sequential(*(SpikeDrivenBlock(embed_dim, heads, hidden, neurons, dvs) for _ in range(depth)))
        self.head_act = neurons.make()
        self.head = spike_linear(embed_dim, num_classes, spikes=neurons.levels)
        trunc_normal_init(self)
        self.memory = set_memory(self, memory)

    def forward_seq(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(run_block(self.patch_embed, x, 0, self.memory, (self,)))
        return self.head(self.head_act(x.flatten(3).mean(3)))


@register_model("spike_driven_transformer", num_classes=1000)
def spike_driven_transformer(num_classes=1000, T=4, preset=None, embed_dim=None, depth=None, heads=None,
                             img_size=None, in_channels=None, mlp_ratio=None, pooling=None, dvs=None, **kw):
    """Spike-driven Transformer v1; ``preset``: one of "imagenet-8-384" (the default), "imagenet-8-512",
    "imagenet-8-768", "cifar-2-512", "dvs-2-256". Explicit keywords override the preset."""
    arch = resolve_preset("spike_driven_transformer", PRESETS, preset, dict(
        embed_dim=embed_dim, depth=depth, heads=heads, img_size=img_size, in_channels=in_channels,
        mlp_ratio=mlp_ratio, pooling=pooling, dvs=dvs))
    return SpikeDrivenTransformer(num_classes, T, **arch, **kw)
