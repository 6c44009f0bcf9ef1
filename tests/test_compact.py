"""Spike-fed layers that keep their input as packed bits, and the models that use them."""
import pytest
import torch
from torch import nn

import tetsnn
from tetsnn import LIF, Layer, SeqToANNContainer, create_model
from tetsnn import compact
from tetsnn.compact import SpikeConv2d, SpikeLinear, pack_spikes, unpack_spikes
from tetsnn.kernels import ops


def spikes(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.7).to(dtype)


@pytest.fixture(params=["numba", "torch"])
def kernels(request, monkeypatch):
    """Run a test with the numba pack kernels and again with the torch-op ones."""
    if request.param == "torch":
        monkeypatch.setattr(ops, "_cpu_fast", lambda t: False)
    return request.param


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099, 12345])
def test_pack_roundtrip(kernels, n):
    x = spikes(n, seed=n)
    p = pack_spikes(x)
    assert p.dtype == torch.uint8 and p.numel() == (n + 7) // 8
    # bit k of byte j is element 8j + k
    assert all(((int(p[j // 8]) >> (j % 8)) & 1) == int(x[j]) for j in range(min(n, 40)))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        y = unpack_spikes(p, [n], dtype)
        assert y.dtype == dtype and torch.equal(y, x.to(dtype))


def grads_of(layer, x, grad_out):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(grad_out)
    return [y, x.grad] + [p.grad for p in layer.parameters()]


def assert_identical(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("cfg", [
    dict(kernel_size=3, stride=1, padding=1, bias=True),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=1, stride=2, padding=0, bias=False),
    dict(kernel_size=3, stride=1, padding=2, dilation=2, groups=2, bias=True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spike_conv_gradients_bit_identical(kernels, cfg, dtype):
    spike = SpikeConv2d(4, 6, **cfg).to(dtype)
    plain = nn.Conv2d(4, 6, **cfg).to(dtype)
    plain.load_state_dict(spike.state_dict())
    x = spikes(5, 4, 9, 9, dtype=dtype)
    grad_out = torch.randn_like(plain(x))
    assert_identical(grads_of(spike, x, grad_out), grads_of(plain, x, grad_out))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(13, 20), (3, 5, 20)])
def test_spike_linear_gradients_bit_identical(kernels, bias, shape):
    spike, plain = SpikeLinear(20, 7, bias=bias), nn.Linear(20, 7, bias=bias)
    plain.load_state_dict(spike.state_dict())
    x = spikes(*shape)
    grad_out = torch.randn(*shape[:-1], 7)
    assert_identical(grads_of(spike, x, grad_out), grads_of(plain, x, grad_out))


def test_autocast_gradients_bit_identical():
    spike, plain = SpikeConv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    plain.load_state_dict(spike.state_dict())
    x = spikes(3, 4, 8, 8)
    grad_out = torch.randn(3, 6, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = grads_of(spike, x, grad_out), grads_of(plain, x, grad_out)
    assert a[0].dtype == torch.bfloat16
    assert_identical(a, b)


def saved(fn, x):
    """Distinct storages autograd saves while ``fn(x)`` runs: data_ptr -> bytes."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return storages


def test_saves_one_bit_per_input_element():
    conv = SpikeConv2d(8, 8, 3, padding=1, bias=False)
    x = spikes(4, 8, 16, 16).requires_grad_()
    weight_bytes = conv.weight.numel() * 4
    assert sum(saved(conv, x).values()) == x.numel() // 8 + weight_bytes
    conv.compact = False
    assert sum(saved(conv, x).values()) == x.numel() * 4 + weight_bytes


def test_shared_input_is_packed_once():
    # a block input feeding conv1 and the downsample keeps one set of bits
    conv1, down = SpikeConv2d(8, 8, 3, padding=1, bias=False), SpikeConv2d(8, 8, 1, bias=False)
    base = spikes(2, 2, 8, 6, 6).requires_grad_()
    total = sum(saved(lambda b: conv1(b.flatten(0, 1)) + down(b.flatten(0, 1)), base).values())
    assert total == base.numel() // 8 + (8 * 8 * 9 + 8 * 8) * 4
    # an in-place change in between is packed again: zero input, zero weight gradient
    x = spikes(4, 8, 6, 6)
    conv1(x)
    x.zero_()
    down(x).sum().backward()
    assert torch.equal(down.weight.grad, torch.zeros_like(down.weight))


def test_residual_block_gradients_bit_identical():
    from tetsnn.models.resnet import BasicBlock
    tetsnn.seed_all(0)
    block = BasicBlock(8, 16, stride=2)
    x = spikes(2, 3, 8, 6, 6)

    def step():
        block.zero_grad()
        xx = x.clone().requires_grad_()
        out = block(xx)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return [out, xx.grad] + [p.grad.clone() for p in block.parameters()]

    a = step()
    assert len(spike_layers(block)) == 3
    for m in spike_layers(block):
        m.compact = False
    assert_identical(a, step())


def test_lif_then_conv_keeps_membrane_plus_bits():
    # between a LIF and the next conv: the membrane (one value per element) plus one bit per spike
    net = nn.Sequential(LIF(), SeqToANNContainer(SpikeConv2d(4, 4, 3, padding=1, bias=False)))
    x = torch.randn(2, 3, 4, 8, 8, requires_grad=True)
    total = sum(saved(net, x).values())
    assert total == x.numel() * 4 + x.numel() // 8 + 4 * 4 * 9 * 4


def spike_layers(model):
    return [m for m in model.modules() if isinstance(m, (SpikeConv2d, SpikeLinear))]


@pytest.mark.parametrize("name,expected", [("resnet19", 20), ("digits_snn", 2), ("vggsnn", 4),
                                           ("sew_resnet18", 8)])
def test_models_use_compact_layers_on_spikes(name, expected):
    model = create_model(name, T=1)
    assert len(spike_layers(model)) == expected
    relu = create_model(name, T=1, neuron="relu")
    assert spike_layers(relu) == []
    relu.load_state_dict(model.state_dict())  # same keys either way


def test_sew_and_join_feeds_spikes_to_every_block():
    assert len(spike_layers(create_model("sew_resnet18", T=1, connect="AND"))) == 8 + 8 + 3


def test_model_compact_gradients_bit_identical():
    tetsnn.seed_all(0)
    model = create_model("digits_snn", T=3)
    x = torch.rand(4, 1, 8, 8)

    def step():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return [out] + [p.grad.clone() for p in model.parameters()]

    a = step()
    for m in spike_layers(model):
        m.compact = False
    assert_identical(a, step())


def test_torch_compile_matches_eager():
    tetsnn.seed_all(0)
    model = nn.Sequential(
        Layer(2, 4, neuron="lif"), Layer(4, 4, neuron="lif", spikes=True),
        SeqToANNContainer(nn.Flatten(), SpikeLinear(4 * 6 * 6, 3)))
    x = torch.randn(3, 4, 2, 6, 6) + 0.5

    def step(m):
        model.zero_grad()
        out = m(x)
        out.square().sum().backward()
        return [out] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    for u, v in zip(eager, compiled):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_channels_last_conv_gradients_bit_identical():
    torch.manual_seed(0)
    compact_conv = SpikeConv2d(4, 5, 3, padding=1)
    plain = nn.Conv2d(4, 5, 3, padding=1)
    plain.load_state_dict(compact_conv.state_dict())
    x = (torch.rand(6, 4, 7, 7) > 0.5).float().to(memory_format=torch.channels_last)
    g = torch.randn(6, 5, 7, 7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    compact_conv(xa).backward(g)
    plain(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(compact_conv.weight.grad, plain.weight.grad)


def _made(t):
    """What the neuron kernel left on its spikes: (packed bits or None), or None without a link."""
    made = getattr(t, "_tetsnn_bits", None)
    return None if made is None else made.bits


@pytest.mark.skipif(not ops.nk.available(), reason="numba is not importable")
@pytest.mark.parametrize("memory", ["default", "min"])
def test_neuron_packs_its_spikes_only_for_a_spike_fed_layer(memory):
    # a neuron's kernel packs its spikes as it writes them once a spike-fed layer has taken their bits;
    # the last neuron (its spikes feed a plain linear layer and the loss) never packs
    tetsnn.seed_all(0)
    first = Layer(2, 8, memory=memory)                      # conv + BatchNorm fused into the LIF
    second = Layer(8, 8, spikes=True, memory=memory)        # spike-fed: takes the bits of first's spikes
    lif, fc, head = LIF(), SpikeLinear(8 * 4 * 4, 16), nn.Linear(16, 3)   # LIF module -> spike-fed -> plain
    last = LIF()
    x = torch.rand(2, 3, 2, 4, 4) * 2

    def step():
        for m in (first, second, fc, head):
            m.zero_grad()
        s1 = first(x)
        s2 = second(s1)
        s3 = lif(s2.flatten(2) * 2 - 0.5)
        s4 = last(fc(s3))
        head(s4).pow(2).sum().backward()
        grads = [p.grad.clone() for m in (first, second, fc, head) for p in m.parameters()]
        return (s1, s3, s4), grads

    (s1, s3, s4), grads = step()
    # first step: no layer had asked yet, so no neuron packed; the spike-fed layers packed for themselves
    assert _made(s1) is None and _made(s3) is None and _made(s4) is None
    assert first.act.packing.on and lif.packing.on and not second.act.packing.on and not last.packing.on
    (s1, s3, s4), again = step()
    assert torch.equal(_made(s1), pack_spikes(s1)) and torch.equal(_made(s3), pack_spikes(s3))
    assert _made(s4) is None and not last.packing.on and not second.act.packing.on
    assert len(grads) == len(again) and all(torch.equal(a, b) for a, b in zip(grads, again))
    # without gradients nothing packs the spikes, so neither does the kernel
    with torch.no_grad():
        assert not hasattr(lif(x.flatten(2).repeat(1, 1, 4)), "_tetsnn_bits")
