"""VGGSNN, TET's CIFAR10-DVS model (input [N, 10, 2, 48, 48]; 9,271,498 parameters at 10 classes)."""
from __future__ import annotations

from torch import nn

from ..compact import spike_avg_pool2d
from ..neuron import spike_levels
from ..layers import Layer, SeqToANNContainer
from ..memory import run_sequence
from ._registry import register_model
from .base import SpikingModel


class VGGSNN(SpikingModel):
    def __init__(self, num_classes=10, T=10, in_channels=2, size=48, neuron="lif", fuse_bn=True, norm="bn",
                 memory="default", **neuron_kw):
        super().__init__(T)
        kw = dict(neuron=neuron, fuse_bn=fuse_bn, norm=norm, T=T, memory=memory, **neuron_kw)
        # average pooling keeps nothing for backward in the SNN (its gradient needs the shape only)
        pool = lambda: SeqToANNContainer(spike_avg_pool2d(2, spikes=spike_levels(neuron, **neuron_kw)))  # noqa: E731
        self.features = nn.Sequential(
            Layer(in_channels, 64, **kw), Layer(64, 128, spikes=True, **kw), pool(),
            Layer(128, 256, **kw), Layer(256, 256, spikes=True, **kw), pool(),
            Layer(256, 512, **kw), Layer(512, 512, spikes=True, **kw), pool(),
            Layer(512, 512, **kw), Layer(512, 512, spikes=True, **kw), pool(),
        )
        side = size // 16
        self.classifier = SeqToANNContainer(nn.Flatten(), nn.Linear(512 * side * side, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_seq(self, x):
        return self.classifier(run_sequence(self.features, x))


@register_model("vggsnn", num_classes=10)
def vggsnn(num_classes=10, T=10, **kw):
    return VGGSNN(num_classes, T, **kw)
