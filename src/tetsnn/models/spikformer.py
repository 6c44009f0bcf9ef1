"""Spikformer (Zhou et al., ICLR 2023), as its official code builds it.

Spiking patch splitting (SPS): four conv3x3-BN-neuron stages (C/8, C/4, C/2, C), a 3x3/2 max pool of
spikes after the last ``log2(patch_size)`` of them, then a relative position embedding conv3x3-BN-neuron
added to its input. Then ``depth`` blocks of spiking self-attention and MLP with residual adds on
tokens, the mean over tokens, and a linear head applied per time step.

Presets (``preset=``) fill the architecture of the paper's configurations; keywords override them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..attention import (ConvBNNeuron, Neurons, SpikingSelfAttention, TokenMLP, TransformerBlock, check_norm,
                         resolve_preset, set_memory, trunc_normal_init)
from ..compact import spike_conv2d, spike_max_pool2d
from ..memory import run_block
from ..layers import SeqToANNContainer
from ._registry import register_model
from .base import SpikingModel

# the official code's settings: CIFAR projections are Linear layers (with bias), ImageNet's and DVS's are
# 1x1 convolutions without bias for q, k, v and with bias for the output projection and the MLP
_CIFAR = dict(img_size=32, patch_size=4, in_channels=3, mlp_ratio=4.0, scale=0.125, qkv_bias=True)
_IMAGENET = dict(img_size=224, patch_size=16, in_channels=3, mlp_ratio=4.0, scale=0.125, qkv_bias=False)
PRESETS = {
    None: dict(_CIFAR, embed_dim=384, depth=4, heads=12),
    "cifar-4-384": dict(_CIFAR, embed_dim=384, depth=4, heads=12),
    "dvs-2-256": dict(img_size=128, patch_size=16, in_channels=2, mlp_ratio=4.0, scale=0.25, qkv_bias=False,
                      embed_dim=256, depth=2, heads=16),
    "imagenet-8-384": dict(_IMAGENET, embed_dim=384, depth=8, heads=12),
    "imagenet-8-512": dict(_IMAGENET, embed_dim=512, depth=8, heads=8),
    "imagenet-8-768": dict(_IMAGENET, embed_dim=768, depth=8, heads=12),
}


class SPS(nn.Module):
    """Spiking patch splitting: ``[N, T, C_in, H, W]`` -> tokens ``[N, T, embed_dim, L]``."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, neurons: Neurons):
        super().__init__()
        pools = int(math.log2(patch_size))
        if 2 ** pools != patch_size or not 0 <= pools <= 4:
            raise ValueError(f"patch_size must be 1, 2, 4, 8 or 16, got {patch_size!r}")
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8, got {embed_dim!r}")
        lv = neurons.levels
        widths = [in_channels, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        self.stages = nn.ModuleList(
            ConvBNNeuron(spike_conv2d(cin, cout, 3, 1, 1, bias=False, spikes=lv if i else 0), nn.BatchNorm2d(cout),
                         neurons.make(), neurons.fuse_bn)
            for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])))
        self.pool_after = tuple(i >= 4 - pools for i in range(4))   # pools on spikes, after the neuron
        self.pool = SeqToANNContainer(spike_max_pool2d(3, 2, 1, spikes=lv))
        self.rpe = ConvBNNeuron(spike_conv2d(embed_dim, embed_dim, 3, 1, 1, bias=False, spikes=lv),
                                nn.BatchNorm2d(embed_dim), neurons.make(), neurons.fuse_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, pool in zip(self.stages, self.pool_after):
            x = stage(x)
            if pool:
                x = self.pool(x)
        x = x + self.rpe(x)
        return x.flatten(3)


class Spikformer(SpikingModel):
    """Spikformer on ``[N, T, C, H, W]`` returning per-step logits ``[N, T, classes]``.

    ``qkv_bias`` gives q, k, v projections a bias (the official CIFAR code's Linear layers); the output
    projection and the MLP always have one, as in the official code. ``neuron`` / ``neuron_kw`` override
    the papers' LIF (:func:`tetsnn.attention.transformer_neuron`); ``neuron="relu"`` is the ANN twin.
    """

    def __init__(self, num_classes: int = 10, T: int = 4, embed_dim: int = 384, depth: int = 4, heads: int = 12,
                 patch_size: int = 4, img_size: int = 32, in_channels: int = 3, mlp_ratio: float = 4.0,
                 scale: float = 0.125, qkv_bias: bool = False, neuron: str = "lif", fuse_bn: bool = True,
                 norm: str = "bn", memory: str = "default", **neuron_kw):
        super().__init__(T)
        check_norm(norm)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        neurons = Neurons(neuron, T, fuse_bn, tuple(sorted(neuron_kw.items())))
        lv = neurons.levels
        self.patch_embed = SPS(in_channels, embed_dim, patch_size, neurons)
        hidden = int(embed_dim * mlp_ratio)
        blocks = []
        for i in range(depth):
            level = 2 * lv * (i + 1)   # block input: spikes + spikes, plus two spike outputs per block
            blocks.append(TransformerBlock(
                SpikingSelfAttention(embed_dim, heads, neurons, level, scale, qkv_bias=qkv_bias, proj_bias=True),
                TokenMLP(embed_dim, hidden, neurons, level + lv, bias=True)))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(embed_dim, num_classes)
        trunc_normal_init(self)
        self.memory = set_memory(self, memory)

    def forward_seq(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(run_block(self.patch_embed, x, 0, self.memory, (self,)))
        return self.head(x.mean(3))


@register_model("spikformer", num_classes=10)
def spikformer(num_classes=10, T=4, preset=None, embed_dim=None, depth=None, heads=None, patch_size=None,
               img_size=None, in_channels=None, mlp_ratio=None, scale=None, qkv_bias=None, **kw):
    """Spikformer; ``preset``: one of "cifar-4-384" (the default), "dvs-2-256", "imagenet-8-384",
    "imagenet-8-512", "imagenet-8-768". Explicit keywords override the preset."""
    arch = resolve_preset("spikformer", PRESETS, preset, dict(
        embed_dim=embed_dim, depth=depth, heads=heads, patch_size=patch_size, img_size=img_size,
        in_channels=in_channels, mlp_ratio=mlp_ratio, scale=scale, qkv_bias=qkv_bias))
    return Spikformer(num_classes, T, **arch, **kw)
