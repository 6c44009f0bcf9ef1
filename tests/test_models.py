import pytest
import torch

import tetsnn
from tetsnn.models.sew_resnet import sew_connect


def conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def basic_block(cin, cout, downsample):
    n = conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
    return n + (conv(cin, cout, 1) + bn(cout) if downsample else 0)


def stage(cin, cout, blocks, stride):
    return basic_block(cin, cout, stride != 1 or cin != cout) + (blocks - 1) * basic_block(cout, cout, False)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet19_parameter_count():
    expect = (conv(3, 64, 3) + bn(64) + stage(64, 128, 3, 1) + stage(128, 256, 3, 2) + stage(256, 512, 2, 2)
              + 512 * 256 + 256 + 256 * 10 + 10)
    assert expect == 12_630_858
    assert count(tetsnn.create_model("resnet19")) == expect


def test_vggsnn_parameter_count():
    layer = lambda a, b: conv(a, b, 3, bias=True) + bn(b)  # noqa: E731
    chans = [2, 64, 128, 256, 256, 512, 512, 512, 512]
    expect = sum(layer(a, b) for a, b in zip(chans, chans[1:])) + 512 * 3 * 3 * 10 + 10
    assert expect == 9_271_498
    assert count(tetsnn.create_model("vggsnn")) == expect


@pytest.mark.parametrize("name,layers,widths", [
    ("resnet18", [2, 2, 2, 2], (64, 128, 256, 512)),
    ("resnet34", [3, 4, 6, 3], (64, 128, 256, 512)),
    ("sew_resnet18", [2, 2, 2, 2], (64, 128, 256, 512)),
    ("sew_resnet19", [3, 3, 2], (128, 256, 512)),
])
def test_imagenet_style_parameter_counts(name, layers, widths):
    strides = [1, 2, 2, 2][: len(layers)]
    n, cin = conv(3, 64, 7) + bn(64), 64
    for cout, b, s in zip(widths, layers, strides):
        n += stage(cin, cout, b, s)
        cin = cout
    classes = 1000 if name != "sew_resnet19" else 10
    n += 512 * classes + classes
    assert count(tetsnn.create_model(name)) == n


SHAPES = {"vggsnn": (2, 48, 48), "digits_snn": (1, 8, 8)}
SMALL = {"spikformer": dict(embed_dim=64, heads=2), "spike_driven_transformer": dict(embed_dim=64, heads=2, depth=2),
         "qkformer": dict(embed_dim=64, heads=2, depth=4)}   # the transformers' layouts at a small width


@pytest.mark.parametrize("name", [m for m in tetsnn.list_models() if m != "nir"])  # nir: test_nir_import.py
def test_every_model_forward_backward(name):
    torch.manual_seed(0)
    c, h, w = SHAPES.get(name, (3, 32, 32))
    model = tetsnn.create_model(name, num_classes=7, T=2, **SMALL.get(name, {}))
    x = torch.rand(2, c, h, w) * 3
    out = model(x)
    assert out.shape == (2, 2, 7)
    out.mean(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # a sequence input is used as is
    assert model(torch.rand(2, 3, c, h, w)).shape == (2, 3, 7)


def test_default_num_classes():
    assert tetsnn.create_model("resnet19").fc2.module.out_features == 10
    assert tetsnn.create_model("resnet18").fc.module.out_features == 1000


@pytest.mark.parametrize("neuron", ["if", "relu"])
def test_neuron_option(neuron):
    m = tetsnn.create_model("sew_resnet19", neuron=neuron, T=2)
    kinds = {type(x) for x in m.modules()}
    assert (tetsnn.IF in kinds) == (neuron == "if")
    assert tetsnn.LIF not in kinds
    assert m(torch.rand(1, 3, 32, 32)).shape == (1, 2, 10)


def test_neuron_kwargs_reach_the_neurons():
    m = tetsnn.create_model("digits_snn", tau=0.25, reset="soft", surrogate="atan")
    lifs = [x for x in m.modules() if isinstance(x, tetsnn.LIF)]
    assert len(lifs) == 4
    assert all(x.tau == 0.25 and x.reset == "soft" and x.surrogate_name == "atan" for x in lifs)


def test_sew_connections_on_hand_made_spikes():
    identity = torch.tensor([0.0, 0.0, 1.0, 1.0])
    out = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert sew_connect(identity, out, "ADD").tolist() == [0, 1, 1, 2]
    assert sew_connect(identity, out, "AND").tolist() == [0, 0, 0, 1]
    assert sew_connect(identity, out, "IAND").tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("connect", ["AND", "IAND"])
def test_sew_block_uses_connect(connect):
    from tetsnn.models.sew_resnet import SEWBlock
    torch.manual_seed(0)
    blk = SEWBlock(4, 4, connect=connect).eval()
    x = (torch.rand(2, 3, 4, 5, 5) > 0.5).float()
    out = blk.sn2(blk.conv2(blk.sn1(blk.conv1(x))))
    expect = x * out if connect == "AND" else x * (1 - out)
    assert torch.equal(blk(x), expect)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model 'resnet99'"):
        tetsnn.create_model("resnet99")
    with pytest.raises(ValueError, match="unknown connect 'OR'"):
        tetsnn.create_model("sew_resnet18", connect="OR")
    with pytest.raises(ValueError, match="T must be an integer >= 1, got 0"):
        tetsnn.create_model("resnet19", T=0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\].*got shape \(3, 32, 32\)"):
        tetsnn.create_model("resnet19")(torch.zeros(3, 32, 32))
