"""A small convolutional SNN: 8x8 single-channel images (scikit-learn's digits) by default, any
``size`` x ``size`` input with ``in_channels`` channels (N-MNIST: 2 x 34 x 34)."""
from __future__ import annotations

from torch import nn

from ..compact import spike_avg_pool2d, spike_linear
from ..layers import Layer, SeqToANNContainer
from ..memory import check_memory, run_block, run_sequence
from ..neuron import make_neuron, spike_levels
from ._registry import register_model
from .base import SpikingModel


class DigitsSNN(SpikingModel):
    """Layer(C,32) Layer(32,64) AvgPool2 | Layer(64,128) AvgPool2 | flatten -> Linear(128 (size//4)^2, 128)
    -> SN -> Linear (Linear(512, 128) for the digits' 8 x 8)."""

    def __init__(self, num_classes=10, T=4, in_channels=1, size=8, neuron="lif", fuse_bn=True, norm="bn",
                 memory="default", **neuron_kw):
        super().__init__(T)
        kw = dict(neuron=neuron, fuse_bn=fuse_bn, norm=norm, T=T, memory=memory, **neuron_kw)
        pool = lambda: SeqToANNContainer(spike_avg_pool2d(2, spikes=spike_levels(neuron, **neuron_kw)))  # noqa: E731
        self.features = nn.Sequential(
            Layer(in_channels, 32, **kw), Layer(32, 64, spikes=True, **kw), pool(),
            Layer(64, 128, **kw), pool(),
        )
        side = size // 2 // 2
        self.fc1 = SeqToANNContainer(nn.Flatten(), nn.Linear(128 * side * side, 128))
        self.sn = make_neuron(neuron, T=T, **neuron_kw)
        self.memory = check_memory(memory)
        self.fc2 = SeqToANNContainer(spike_linear(128, num_classes, spikes=spike_levels(neuron, **neuron_kw)))

    def forward_seq(self, x):
        x = run_sequence(self.features, x)   # the head (linear -> neuron) is a block too, fed pooled spikes
        return self.fc2(run_block(lambda v: self.sn(self.fc1(v)), x, 0, self.memory, (self.fc1, self.sn)))


@register_model("digits_snn", num_classes=10)
def digits_snn(num_classes=10, T=4, **kw):
    return DigitsSNN(num_classes, T, **kw)
