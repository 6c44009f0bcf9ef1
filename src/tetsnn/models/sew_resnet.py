"""SEW-ResNet: spike-element-wise residual blocks.

Block: out = SN(BN(conv(SN(BN(conv(x)))))) (spikes); identity = x, or SN(BN(conv1x1(x))) when the
shape changes; the two spike tensors are joined by ADD (identity + out), AND (identity * out)
or IAND (identity * (1 - out)).
"""
from __future__ import annotations

from torch import nn

from ..compact import spike_conv2d
from ..layers import ConvBN, ConvBNSpike, conv_bn_spike
from ..memory import check_memory, run_block
from ..neuron import make_neuron, spike_levels
from ..norm import make_norm
from ._registry import register_model
from .resnet import ImageNetResNet, conv3x3

CONNECTS = ("ADD", "AND", "IAND")


def sew_connect(identity, out, connect: str):
    if connect == "ADD":
        return identity + out
    if connect == "AND":
        return identity * out
    if connect == "IAND":
        return identity * (1 - out)
    raise ValueError(f"unknown connect {connect!r}: expected one of {CONNECTS}")


class SEWBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, connect="ADD", neuron="lif", fuse_bn=True, norm="bn", T=None,
                 memory="default", **neuron_kw):
        super().__init__()
        self.fuse_bn = fuse_bn
        self.memory = check_memory(memory)
        if connect not in CONNECTS:
            raise ValueError(f"unknown connect {connect!r}: expected one of {CONNECTS}")
        self.connect = connect
        spikes = spike_levels(neuron, **neuron_kw)  # sn1's output is spikes; the block's input too unless ADD made it 0/1/2
        in_spikes = spikes if connect != "ADD" and spikes == 1 else 0   # AND / IAND of counts are no counts
        self.in_levels = in_spikes or (-1 if spikes else 0)   # ADD: counts, as many bits as the batch needs
        bn = lambda c: make_norm(norm, c, T, neuron_kw.get("threshold", 1.0))  # noqa: E731
        self.conv1 = ConvBN(conv3x3(cin, cout, stride, in_spikes), bn(cout))
        self.sn1 = make_neuron(neuron, T=T, **neuron_kw)
        self.conv2 = ConvBN(conv3x3(cout, cout, 1, spikes), bn(cout))
        self.sn2 = make_neuron(neuron, T=T, **neuron_kw)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = ConvBNSpike(
                ConvBN(spike_conv2d(cin, cout, 1, stride, bias=False, spikes=in_spikes), bn(cout)),
                make_neuron(neuron, T=T, **neuron_kw), fuse_bn=fuse_bn)

    def forward(self, x):
        return run_block(self.block, x, self.in_levels, self.memory, (self,))

    def block(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_bn_spike(self.conv1, self.sn1, x, self.fuse_bn)
        # an ADD join saves nothing: a recompute need not form the spikes it adds
        out = conv_bn_spike(self.conv2, self.sn2, out, self.fuse_bn, output_unused=self.connect == "ADD")
        return sew_connect(identity, out, self.connect)


def _sew(layers, num_classes, T, connect="ADD", widths=(64, 128, 256, 512), strides=(1, 2, 2, 2), **kw):
    if connect not in CONNECTS:
        raise ValueError(f"unknown connect {connect!r}: expected one of {CONNECTS}")
    return ImageNetResNet(SEWBlock, layers, num_classes, T, widths=widths, strides=strides,
                          block_kw={"connect": connect}, **kw)


@register_model("sew_resnet18", num_classes=1000)
def sew_resnet18(num_classes=1000, T=4, connect="ADD", **kw):
    return _sew([2, 2, 2, 2], num_classes, T, connect, **kw)


@register_model("sew_resnet34", num_classes=1000)
def sew_resnet34(num_classes=1000, T=4, connect="ADD", **kw):
    return _sew([3, 4, 6, 3], num_classes, T, connect, **kw)


@register_model("sew_resnet19", num_classes=10)
def sew_resnet19(num_classes=10, T=4, connect="ADD", **kw):
    """The seed's SEW-ResNet19: 7x7/2 stem + max pool, stages [3, 3, 2] at 128-256-512."""
    return _sew([3, 3, 2], num_classes, T, connect, widths=(128, 256, 512), strides=(1, 2, 2), **kw)
