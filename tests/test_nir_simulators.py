"""Exported NIR graphs run in the real snnTorch, Norse and SpikingJelly, each at its own default dt
where it has one (Norse is given dt = 1e-4), one sample and one step at a time with fresh state;
every step's output and every spiking layer's spikes are compared with tetsnn's."""
import logging
import warnings

import pytest
import torch
from torch import nn

import tetsnn
from test_nir import randomize_batchnorm, spikes_of

S = tetsnn.SeqToANNContainer
logging.getLogger().setLevel(logging.ERROR)     # Norse logs a warning per IF node (r != 1)


class TwoLayer(tetsnn.models.SpikingModel):
    """conv-BN-neuron-flatten-linear-neuron-linear, the smallest net with every kind of layer."""

    def __init__(self, neuron="lif"):
        super().__init__(T=5)
        self.conv = S(nn.Conv2d(2, 4, 3, 1, 1), nn.BatchNorm2d(4))
        self.sn1 = tetsnn.make_neuron(neuron)
        self.fc1 = S(nn.Flatten(), nn.Linear(4 * 6 * 6, 8))
        self.sn2 = tetsnn.make_neuron(neuron, threshold=0.5)
        self.fc2 = S(nn.Linear(8, 3))

    def forward_seq(self, x):
        return self.fc2(self.sn2(self.fc1(self.sn1(self.conv(x)))))


# name: (builder, input shape, T, exact). Large models get small inputs; exact=False allows 1e-4 of the
# spikes to differ (BatchNorm is folded into the float32 weights of the graph, which rounds).
MODELS = {
    "if_net": (lambda: TwoLayer("if"), (2, 6, 6), 5, True),
    "lif_net": (lambda: TwoLayer("lif"), (2, 6, 6), 5, True),
    "digits_snn": (lambda: tetsnn.create_model("digits_snn", T=4), (1, 8, 8), 4, True),
    "vggsnn": (lambda: tetsnn.create_model("vggsnn", T=2, size=16), (2, 16, 16), 2, False),
    "resnet19": (lambda: tetsnn.create_model("resnet19", T=2), (3, 8, 8), 2, False),
    "sew_resnet19": (lambda: tetsnn.create_model("sew_resnet19", T=2), (3, 16, 16), 2, False),
}


def _snntorch(graph):
    from snntorch.import_nir import import_from_nir
    return import_from_nir(graph)


def _norse(graph):
    import norse.torch
    return norse.torch.from_nir(graph, dt=1e-4)


def _spikingjelly(graph):
    from spikingjelly.activation_based.nir_exchange.from_nir import import_from_nir
    return import_from_nir(graph, dtype=torch.float64)


# simulator: (package, loader, dtype it computes in, export options, models it can express)
SIMULATORS = {
    # its spike function returns float32, so it runs in float32; its IF import asserts r == 1
    "snntorch": ("snntorch", _snntorch, torch.float32, {}, ["lif_net", "digits_snn", "vggsnn", "resnet19"]),
    # no AvgPool2d: average pooling is exported as SumPool2d with 1/k^2 folded into the next layer.
    # Residual nets run but differ: its executor orders nodes depth-first, so a node with two inputs
    # reads one of them from the previous step.
    "norse": ("norse", _norse, torch.float64, {"avgpool": "sum"}, ["if_net", "lif_net", "digits_snn", "vggsnn"]),
    "spikingjelly": ("spikingjelly", _spikingjelly, torch.float64, {},
                     ["if_net", "lif_net", "digits_snn", "vggsnn", "resnet19"]),
}
# none of them has NIR's Threshold, which the max pooling of spikes in SEW-ResNet's stem needs (nor
# does nirtorch's SumPool2d, which snnTorch and SpikingJelly use, apply its padding)
CASES = [(sim, m) for sim, spec in SIMULATORS.items() for m in spec[4]]


def build(model_name, dtype):
    torch.manual_seed(0)
    make, shape, T, exact = MODELS[model_name]
    model = randomize_batchnorm(make()).eval().to(dtype)
    return model, shape, T, exact


def simulate(net, x, names):
    """Step ``net`` (a simulator's module from a NIR graph) through ``x [1, T, ...]`` with fresh state;
    returns the spikes of the modules ``names`` and the outputs, each ``[1, T, ...]``."""
    record = {n: [] for n in names}
    hooks = [net.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: record[n].append((o[0] if isinstance(o, tuple) else o).reshape(1, -1)))
        for n in names]
    state, outs = None, []
    with torch.no_grad():
        for t in range(x.shape[1]):
            out, state = net(x[:, t], state)
            outs.append(out.reshape(1, -1))
    for h in hooks:
        h.remove()
    return {n: torch.stack(v, 1) for n, v in record.items()}, torch.stack(outs, 1)


@pytest.mark.parametrize("sim,model_name", CASES)
def test_simulator_reproduces_tetsnn(sim, model_name):
    package, load, dtype, options, _ = SIMULATORS[sim]
    pytest.importorskip(package)
    model, shape, T, exact = build(model_name, dtype)
    graph = tetsnn.to_nir(model, shape, **options)        # dt = 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = load(graph).to(dtype)
    x = torch.rand(1, T, *shape, dtype=dtype) * 2
    spikes, logits = spikes_of(model, x)
    sim_spikes, outs = simulate(net, x, list(spikes))
    differ = total = 0
    for name, s in spikes.items():
        s = s.reshape(1, T, -1)
        assert sim_spikes[name].shape == s.shape, name
        assert 0 < s.mean() < 1, name
        differ += int((sim_spikes[name] != s).sum())
        total += int(s.sum())
    if exact:
        assert differ == 0
    else:
        assert differ <= 1e-4 * total, f"{differ} of {total} spikes differ"
    if differ == 0:    # the graph's weights are float32
        torch.testing.assert_close(outs, logits.reshape(1, T, -1), rtol=1e-5, atol=1e-5)


def test_what_the_simulators_cannot_express():
    """The limits the README lists, as each simulator's importer meets them."""
    model, shape, _, _ = build("sew_resnet19", torch.float32)
    threshold_graph = tetsnn.to_nir(model, shape, avgpool="sum")     # max pooling of spikes: Threshold
    if_graph = tetsnn.to_nir(build("if_net", torch.float32)[0], (2, 6, 6))
    avgpool_graph = tetsnn.to_nir(build("digits_snn", torch.float32)[0], (1, 8, 8))
    failures = {"snntorch": [(threshold_graph, ValueError, "Threshold"), (if_graph, AssertionError, "r != 1")],
                "norse": [(avgpool_graph, KeyError, "features_2_module")],   # the AvgPool2d it has no module for
                "spikingjelly": [(threshold_graph, ValueError, "Threshold")]}
    for sim, cases in failures.items():
        package, load, *_ = SIMULATORS[sim]
        pytest.importorskip(package)
        for graph, error, match in cases:
            with warnings.catch_warnings(), pytest.raises(error, match=match):
                warnings.simplefilter("ignore")
                simulate(load(graph), torch.zeros(1, 1, *graph.nodes["input"].input_type["input"]), [])
