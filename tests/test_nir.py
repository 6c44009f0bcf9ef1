"""NIR export: the graph read back with nir.read, simulated by an independent forward-Euler
evaluator against tetsnn's own spikes. The real simulators are in tests/test_nir_simulators.py,
import (tetsnn.from_nir) in tests/test_nir_import.py."""
import os
import subprocess
import sys
from pathlib import Path

import nir
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tetsnn
from tetsnn.models.resnet import BasicBlock, ImageNetResNet
from tetsnn.models.sew_resnet import SEWBlock

S = tetsnn.SeqToANNContainer


# --------------------------------------------------------------------------- an independent NIR evaluator

def topological(graph):
    preds = {n: [s for s, d in graph.edges if d == n] for n in graph.nodes}
    order, done = [], set()
    while len(order) < len(graph.nodes):
        ready = [n for n in graph.nodes if n not in done and all(p in done for p in preds[n])]
        assert ready, "the graph has a cycle"
        order += ready
        done |= set(ready)
    return order, preds


def euler_step(node, x, v, dt):
    """One forward-Euler step of NIR's neuron equations; returns (spikes, new membrane). The step
    factors dt/tau and r*dt are formed in float32 from the float32 parameters, as simulators do."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    dt = np.float32(dt)
    if isinstance(node, nir.LIF):
        v = v + t(dt / node.tau) * (t(node.v_leak) - v + t(node.r) * x)
    else:
        v = v + t(node.r * dt) * x
    z = (v > t(node.v_threshold)).double()
    return z, torch.where(z > 0, t(node.v_reset), v)


def apply(node, x):
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    if isinstance(node, nir.Conv2d):
        return F.conv2d(x, t(node.weight), t(node.bias), tuple(node.stride), tuple(node.padding),
                        tuple(node.dilation), int(node.groups))
    if isinstance(node, nir.Affine):
        return x @ t(node.weight).T + t(node.bias)
    if isinstance(node, nir.Linear):
        return x @ t(node.weight).T
    if isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
        k = tuple(int(v) for v in node.kernel_size)
        y = F.avg_pool2d(x, k, tuple(int(v) for v in node.stride), tuple(int(v) for v in node.padding))
        return y * (k[0] * k[1]) if isinstance(node, nir.SumPool2d) else y
    if isinstance(node, nir.Threshold):
        return (x > t(node.threshold)).double()
    if isinstance(node, nir.Flatten):   # NIR shapes exclude the batch dimension
        return x.flatten(int(node.start_dim) + 1, int(node.end_dim) + 1 if node.end_dim >= 0 else -1)
    if isinstance(node, nir.Output):
        return x
    raise AssertionError(f"no rule for {type(node).__name__}")


def simulate(graph, frames):
    """Run a NIR graph on ``frames [N, T, ...]``; returns every node's outputs stacked over time."""
    order, preds = topological(graph)
    dt = float(graph.metadata["dt"])
    membranes, record = {}, {n: [] for n in order}
    for step in range(frames.shape[1]):
        out = {}
        for name in order:
            node = graph.nodes[name]
            if isinstance(node, nir.Input):
                out[name] = frames[:, step]
                continue
            x = sum(out[p] for p in preds[name])
            if isinstance(node, (nir.LIF, nir.IF)):
                out[name], membranes[name] = euler_step(node, x, membranes.get(name, torch.zeros_like(x)), dt)
            else:
                out[name] = apply(node, x)
        for name in order:
            record[name].append(out[name])
    return {name: torch.stack(v, 1) for name, v in record.items()}


def spikes_of(model, x):
    """tetsnn's spikes per LIF/IF layer (by NIR node name) and its logits."""
    spikes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, tetsnn.LIF):
            hooks.append(m.register_forward_hook(
                lambda m, i, o, name=name.replace(".", "_"): spikes.__setitem__(name, o)))
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return spikes, logits


def randomize_batchnorm(model):
    """Random inference statistics, and weights doubled so that every layer spikes."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(2.0)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.5)
    return model


class TinyResNet(tetsnn.models.SpikingModel):
    """ResNet19-style: conv-BN-LIF stem, two BasicBlocks (one with a 1x1 downsample), avg pool, fc."""

    def __init__(self, T=4, **neuron_kw):
        super().__init__(T)
        self.stem = nn.Sequential(S(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)),
                                  tetsnn.make_neuron(**neuron_kw))
        self.layer = nn.Sequential(BasicBlock(8, 16, 2, **neuron_kw), BasicBlock(16, 16, 1, **neuron_kw))
        self.pool = S(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = S(nn.Linear(16, 5))

    def forward_seq(self, x):
        return self.fc(self.pool(self.layer(self.stem(x))))


def tiny_sew(neuron="lif", connect="ADD"):
    """SEW-ResNet with the ImageNet stem (7x7/2 conv, max pool of spikes) and two ADD blocks."""
    return ImageNetResNet(SEWBlock, [1, 1], num_classes=5, T=3, widths=(8, 16), strides=(1, 2), neuron=neuron,
                          block_kw={"connect": connect})


CASES = {
    "digits_snn": (lambda: tetsnn.create_model("digits_snn", T=4), (1, 8, 8)),
    "resnet_lif": (lambda: TinyResNet(T=4), (3, 8, 8)),
    "resnet_if_threshold": (lambda: TinyResNet(T=4, neuron="if", threshold=0.7), (3, 8, 8)),
    "sew_add": (lambda: tiny_sew(), (3, 16, 16)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dt,avgpool", [(1e-4, "avg"), (1.0, "sum")])
def test_nir_round_trip_reproduces_tetsnn_spikes(case, dt, avgpool, tmp_path):
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = randomize_batchnorm(build()).eval().double()       # float64 model, float32 NIR weights
    path = tmp_path / "model.nir"
    written = tetsnn.export_nir(model, path, shape, dt=dt, avgpool=avgpool)
    assert os.listdir(tmp_path) == ["model.nir"]             # no temporary file left behind
    pos = {n: i for i, n in enumerate(written.nodes)}       # in memory: in topological order
    assert all(pos[a] < pos[b] for a, b in written.edges)
    graph = nir.read(str(path))
    assert graph.metadata["dt"] == dt and graph.metadata["encoding"] == "scaled-membrane"
    assert not any("." in n for n in graph.nodes)
    if avgpool == "sum":
        assert not any(isinstance(n, nir.AvgPool2d) for n in graph.nodes.values())

    x = torch.rand(2, model.T, *shape, dtype=torch.float64) * 2
    spikes, logits = spikes_of(model, x)
    sim = simulate(graph, x)
    assert set(spikes) == {n for n, node in graph.nodes.items() if isinstance(node, (nir.LIF, nir.IF))}
    for name, s in spikes.items():
        assert 0 < s.mean() < 1, name
        assert torch.equal(sim[name].reshape(s.shape), s), name
    torch.testing.assert_close(sim["output"], logits, rtol=1e-5, atol=1e-5)


def test_neuron_encoding():
    """LIF at dt: tau = dt / (1 - decay), r = 1, v_threshold = threshold * (1 - decay); IF: r = 1 / dt."""
    lif = tetsnn.export.neuron_node("sn", tetsnn.LIF(tau=0.5, threshold=1.0), (3,), dt=1e-4)
    assert isinstance(lif, nir.LIF)
    np.testing.assert_array_equal(lif.tau, np.float32(2e-4))
    assert np.all(lif.r == 1) and np.all(lif.v_threshold == 0.5) and np.all(lif.v_leak == 0)
    assert np.all(lif.v_reset == 0)
    lif = tetsnn.export.neuron_node("sn", tetsnn.LIF(tau=0.5, threshold=1.0), (3,), dt=1.0)
    assert np.all(lif.tau == 2) and np.all(lif.r == 1) and np.all(lif.v_threshold == 0.5)
    if_ = tetsnn.export.neuron_node("sn", tetsnn.IF(threshold=0.7), (3,), dt=1e-4)
    assert isinstance(if_, nir.IF) and np.all(if_.r == np.float32(1e4)) and np.all(if_.v_threshold == np.float32(0.7))
    for dt in (0, -1.0, float("nan"), "1e-4"):
        with pytest.raises(ValueError, match="dt must be a positive number"):
            tetsnn.to_nir(tetsnn.create_model("digits_snn"), (1, 8, 8), dt=dt)


@pytest.mark.parametrize("name,shape", [("digits_snn", (1, 8, 8)), ("vggsnn", (2, 48, 48)),
                                        ("resnet19", (3, 32, 32)), ("sew_resnet19", (3, 32, 32))])
def test_registry_models_export(name, shape, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(tetsnn.create_model(name, num_classes=10)).eval()
    tetsnn.export_nir(model, tmp_path / "m.nir", shape)
    graph = nir.read(str(tmp_path / "m.nir"))
    kinds = [type(n).__name__ for n in graph.nodes.values()]
    mods = list(model.named_modules())
    assert kinds.count("LIF") == sum(isinstance(m, tetsnn.LIF) for _, m in mods)
    assert kinds.count("Conv2d") == sum(isinstance(m, nn.Conv2d) for _, m in mods)
    assert "BatchNorm" not in "".join(kinds) and kinds.count("Input") == kinds.count("Output") == 1
    for n in graph.nodes.values():
        if isinstance(n, nir.LIF):       # u = 0.5 u + x at dt = 1e-4: tau = 2e-4, r = 1, v_threshold = 0.5
            assert np.all(n.tau == np.float32(2e-4)) and np.all(n.r == 1) and np.all(n.v_leak == 0)
            assert np.all(n.v_threshold == 0.5) and np.all(n.v_reset == 0)
    # BatchNorm folded into the convolution before it
    conv_name = next(n for n, m in mods if isinstance(m, nn.Conv2d))
    conv = model.get_submodule(conv_name)
    bn = next(m for m in model.get_submodule(conv_name.rsplit(".", 1)[0]) if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale[:, None, None, None]
        bias = ((0 if conv.bias is None else conv.bias) - bn.running_mean) * scale + bn.bias
    conv_name = conv_name.replace(".", "_")
    np.testing.assert_allclose(graph.nodes[conv_name].weight, weight.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(graph.nodes[conv_name].bias, bias.numpy(), rtol=1e-5, atol=1e-6)
    into = {}
    for src, dst in graph.edges:
        into[dst] = into.get(dst, 0) + 1
    if name == "resnet19":      # each block's residual sum: two edges into its second LIF
        blocks = [n for n, m in mods if type(m).__name__ == "BasicBlock"]
        assert {d for d, c in into.items() if c == 2} == {f"{n}_sn2".replace(".", "_") for n in blocks}
        assert len(blocks) == 8
    elif name == "sew_resnet19":  # ADD of spikes: the pool receives the spikes of the last stage's sum
        assert {s for s, d in graph.edges if d == "pool_module_0"} == {
            "stages_2_0_downsample_1", "stages_2_0_sn2", "stages_2_1_sn2"}
        assert kinds.count("SumPool2d") == kinds.count("Threshold") == 1    # max pooling of spikes
    else:
        assert max(into.values()) == 1


def test_what_nir_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="soft reset"):
        tetsnn.export_nir(tetsnn.create_model("digits_snn", reset="soft"), tmp_path / "a.nir", (1, 8, 8))
    for connect in ("AND", "IAND"):
        with pytest.raises(ValueError, match="AND/IAND"):
            tetsnn.export_nir(tiny_sew(connect=connect), tmp_path / "b.nir", (3, 16, 16))
    with pytest.raises(ValueError, match="tau=1.5"):
        tetsnn.export_nir(tetsnn.create_model("digits_snn", tau=1.5), tmp_path / "c.nir", (1, 8, 8))
    maxpool_on_currents = nn.Sequential(S(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2)), tetsnn.LIF())
    with pytest.raises(ValueError, match="max pooling"):
        tetsnn.to_nir(maxpool_on_currents, (1, 8, 8))
    pool_into_neuron = nn.Sequential(S(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2)), tetsnn.LIF())
    with pytest.raises(ValueError, match="layer '1'.*followed by a Conv2d or Linear"):
        tetsnn.to_nir(pool_into_neuron, (1, 8, 8), avgpool="sum")
    with pytest.raises(ValueError, match="avgpool must be"):
        tetsnn.to_nir(pool_into_neuron, (1, 8, 8), avgpool="max")
    assert os.listdir(tmp_path) == []


def test_untraceable_model_gives_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.sn = tetsnn.LIF()

        def forward(self, x):
            return self.sn(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="Branchy cannot be traced for export"):
        tetsnn.to_nir(Branchy(), (3,))


def test_tetsnn_imports_without_nir():
    """nir is read only when a graph is built or imported."""
    code = ("import sys; sys.modules['nir'] = None\n"
            "import tetsnn\n"
            "tetsnn.create_model('digits_snn')\n"
            "try:\n"
            "    tetsnn.to_nir(tetsnn.create_model('digits_snn'), (1, 8, 8))\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(tetsnn.__file__).parents[1])})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "NIR export and import need the nir package: pip install nir"
