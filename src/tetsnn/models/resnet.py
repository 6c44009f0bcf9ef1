"""Spiking ResNets with the spike after the residual add (TET's ResNet19 and ImageNet ResNet18/34).

BasicBlock:  x -> conv3x3-BN-SN -> conv3x3-BN -> (+ shortcut) -> SN

With ``fuse_bn`` (the default) each BatchNorm runs inside the neuron that follows it during training,
the residual add included (:func:`tetsnn.kernels.ops.bn_neuron`); ``fuse_bn=False`` runs the modules one by one.
"""
from __future__ import annotations

from torch import nn

from ..compact import spike_adaptive_avg_pool2d, spike_conv2d, spike_linear, spike_max_pool2d
from ..layers import ConvBN, ConvBNSpike, SeqToANNContainer, bn_path, bn_spikes, conv_bn_spike, per_step
from ..memory import check_memory, run_block
from ..neuron import make_neuron, spike_levels
from ..norm import make_norm
from ._registry import register_model
from .base import SpikingModel


def conv3x3(cin, cout, stride=1, spikes=False):
    """3x3 conv without bias; ``spikes=True`` where its input is 0/1 spikes (saved as packed bits)."""
    return spike_conv2d(cin, cout, 3, stride, 1, bias=False, spikes=spikes)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, neuron="lif", fuse_bn=True, norm="bn", T=None, memory="default",
                 **neuron_kw):
        super().__init__()
        self.fuse_bn = fuse_bn
        self.memory = check_memory(memory)
        spikes = spike_levels(neuron, **neuron_kw)  # the block's input and sn1's output are spikes
        self.in_levels = spikes
        bn = lambda c: make_norm(norm, c, T, neuron_kw.get("threshold", 1.0))  # noqa: E731
        self.conv1 = ConvBN(conv3x3(cin, cout, stride, spikes), bn(cout))
        self.sn1 = make_neuron(neuron, T=T, **neuron_kw)
        self.conv2 = ConvBN(conv3x3(cout, cout, 1, spikes), bn(cout))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = ConvBN(spike_conv2d(cin, cout, 1, stride, bias=False, spikes=spikes),
                                     bn(cout))
        self.sn2 = make_neuron(neuron, T=T, **neuron_kw)

    def forward(self, x):
        return run_block(self.block, x, self.in_levels, self.memory, (self,))

    def block(self, x):
        ds = self.downsample
        path = bn_path(self.conv2.bn, self.sn2, self.fuse_bn, x)
        if path.fuses_bn and (ds is None or bn_path(ds.bn, self.sn2, True, x).fuses_bn):
            # the block input is spikes: the fused op keeps it as bits; a downsample keeps its conv output
            y_ds = None if ds is None else per_step(ds.conv, x)
            out = per_step(self.conv2.conv, conv_bn_spike(self.conv1, self.sn1, x))
            return bn_spikes(path, out, self.conv2.bn, self.sn2, x.shape[1], output_unused=True,
                             residual=x if ds is None else None, y2=y_ds, bn2=None if ds is None else ds.bn)
        identity = x if ds is None else ds(x)
        out = self.conv2(conv_bn_spike(self.conv1, self.sn1, x, self.fuse_bn))
        return self.sn2(out + identity)


def make_stage(block, cin, cout, blocks, stride, **kw):
    layers = [block(cin, cout, stride, **kw)]
    layers += [block(cout, cout, 1, **kw) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def imagenet_stem(neuron="lif", fuse_bn=True, norm="bn", T=None, memory="default", **neuron_kw):
    """7x7/2 conv (64, no bias) + BN + SN + 3x3/2 max pool (of spikes: kept as bits)."""
    return ConvBNSpike(
        ConvBN(nn.Conv2d(3, 64, 7, 2, 3, bias=False), make_norm(norm, 64, T, neuron_kw.get("threshold", 1.0))),
        make_neuron(neuron, T=T, **neuron_kw),
        SeqToANNContainer(spike_max_pool2d(3, 2, 1, spikes=spike_levels(neuron, **neuron_kw))),
        fuse_bn=fuse_bn, memory=memory,
    )


def kaiming_init(model: nn.Module) -> None:
    """He-normal (fan_out) convolutions; BatchNorm at its own initialisation (weight 1, tdBN's
    alpha * threshold; bias 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()


class ResNet19(SpikingModel):
    """TET's CIFAR ResNet19 (12,630,858 parameters at 10 classes), PyTorch's default init."""

    def __init__(self, num_classes=10, T=4, neuron="lif", fuse_bn=True, norm="bn", memory="default", **neuron_kw):
        super().__init__(T)
        self.memory = check_memory(memory)
        kw = dict(neuron=neuron, fuse_bn=fuse_bn, norm=norm, T=T, memory=memory, **neuron_kw)
        self.stem = ConvBNSpike(
            ConvBN(conv3x3(3, 64), make_norm(norm, 64, T, neuron_kw.get("threshold", 1.0))),
            make_neuron(neuron, T=T, **neuron_kw), fuse_bn=fuse_bn, memory=memory)
        self.layer1 = make_stage(BasicBlock, 64, 128, 3, 1, **kw)
        self.layer2 = make_stage(BasicBlock, 128, 256, 3, 2, **kw)
        self.layer3 = make_stage(BasicBlock, 256, 512, 2, 2, **kw)
        self.pool = SeqToANNContainer(spike_adaptive_avg_pool2d(1, spikes=spike_levels(neuron, **neuron_kw)), nn.Flatten())
        self.fc1 = SeqToANNContainer(nn.Linear(512, 256))
        self.sn_fc = make_neuron(neuron, T=T, **neuron_kw)
        self.fc2 = SeqToANNContainer(spike_linear(256, num_classes, spikes=spike_levels(neuron, **neuron_kw)))

    def forward_seq(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        # the head (pool -> linear -> neuron) is a block too, fed the last stage's spikes
        x = run_block(lambda v: self.sn_fc(self.fc1(self.pool(v))), x, self.layer3[-1].in_levels, self.memory,
                      (self.fc1, self.sn_fc))
        return self.fc2(x)


class ImageNetResNet(SpikingModel):
    """ImageNet-style spiking ResNet (stem 7x7/2 + max pool, four stages, avg pool + one Linear)."""

    def __init__(self, block, layers, num_classes=1000, T=4, widths=(64, 128, 256, 512),
                 strides=(1, 2, 2, 2), neuron="lif", block_kw=None, fuse_bn=True, norm="bn", memory="default",
                 **neuron_kw):
        super().__init__(T)
        kw = dict(neuron=neuron, fuse_bn=fuse_bn, norm=norm, T=T, memory=memory, **(block_kw or {}), **neuron_kw)
        self.stem = imagenet_stem(neuron, fuse_bn, norm, T, memory, **neuron_kw)
        stages, cin = [], 64
        for cout, n, s in zip(widths, layers, strides):
            stages.append(make_stage(block, cin, cout, n, s, **kw))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = SeqToANNContainer(spike_adaptive_avg_pool2d(1, spikes=spike_levels(neuron, **neuron_kw)), nn.Flatten())
        self.fc = SeqToANNContainer(nn.Linear(cin, num_classes))
        kaiming_init(self)

    def forward_seq(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


@register_model("resnet19", num_classes=10)
def resnet19(num_classes=10, T=4, **kw):
    return ResNet19(num_classes, T, **kw)


@register_model("resnet18", num_classes=1000)
def resnet18(num_classes=1000, T=4, **kw):
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, T, **kw)


@register_model("resnet34", num_classes=1000)
def resnet34(num_classes=1000, T=4, **kw):
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, T, **kw)
