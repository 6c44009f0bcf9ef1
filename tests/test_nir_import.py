"""tetsnn.from_nir and the registry model "nir": graphs exported by tetsnn, snnTorch and SpikingJelly
come back as tetsnn models that compute the same spikes, train with TET, and rebuild from checkpoints."""
import warnings

import nir
import numpy as np
import pytest
import torch
from torch import nn

import tetsnn
from tetsnn.cli import main
from test_nir import CASES, randomize_batchnorm, simulate, spikes_of

from conftest import QUICK


def imported_spikes(model, x):
    """Spikes of an imported model by NIR node name, and its outputs."""
    spikes, out = spikes_of(model, x)
    return {k.removeprefix("layers_"): v for k, v in spikes.items()}, out


def assert_same_spikes(ref, got, exact=True):
    assert set(got) == set(ref)
    differ = sum(int((got[n] != s).sum()) for n, s in ref.items())
    total = sum(int(s.sum()) for s in ref.values())
    assert all(0 < s.mean() < 1 for s in ref.values())
    assert differ == 0 if exact else differ <= 1e-4 * total, f"{differ} of {total} spikes differ"
    return differ


# every registry model that exports (not SEW AND/IAND), on a small input: (name, shape, exact)
REGISTRY = [("digits_snn", (1, 8, 8), True), ("vggsnn", (2, 16, 16), False), ("resnet19", (3, 8, 8), False),
            ("resnet18", (3, 16, 16), False), ("resnet34", (3, 16, 16), False),
            ("sew_resnet18", (3, 16, 16), False), ("sew_resnet34", (3, 16, 16), False),
            ("sew_resnet19", (3, 16, 16), False)]


TRANSFORMERS = {"spikformer", "spike_driven_transformer", "qkformer"}   # NIR has no product of two activations


def test_registry_covers_every_exportable_model():
    assert {n for n, _, _ in REGISTRY} | {"nir"} | TRANSFORMERS == set(tetsnn.list_models())


@pytest.mark.parametrize("name,shape,exact", REGISTRY)
def test_export_then_import_computes_what_the_model_computes(name, shape, exact, tmp_path):
    torch.manual_seed(0)
    kw = {"size": shape[-1]} if name == "vggsnn" else {}
    model = randomize_batchnorm(tetsnn.create_model(name, num_classes=5, T=2, **kw)).eval().double()
    tetsnn.export_nir(model, tmp_path / "m.nir", shape)
    back = tetsnn.from_nir(tmp_path / "m.nir", T=2).double().eval()
    assert back.dt == 1e-4 and back.output_shape == (5,) and back.input_shape == shape
    assert {m.tau for m in back.modules() if isinstance(m, tetsnn.LIF)} == {0.5}
    assert {m.threshold for m in back.modules() if isinstance(m, tetsnn.LIF)} == {1.0}
    x = torch.rand(1, *shape, dtype=torch.float64) * 2            # a static image, repeated T times
    ref, logits = spikes_of(model, x)
    got, out = imported_spikes(back, x)
    if assert_same_spikes(ref, got, exact) == 0:                  # the graph's weights are float32
        torch.testing.assert_close(out, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["resnet_if_threshold", "sew_add"])
def test_import_matches_an_independent_euler_evaluation(case, tmp_path):
    """IF nets, residual edges and max pooling (SumPool2d + Threshold), at dt = 1 and with SumPool2d."""
    torch.manual_seed(0)
    build, shape = CASES[case]
    model = randomize_batchnorm(build()).eval().double()
    graph = tetsnn.to_nir(model, shape, dt=1.0, avgpool="sum")
    back = tetsnn.from_nir(graph).double()
    assert back.dt == 1.0
    x = torch.rand(2, model.T, *shape, dtype=torch.float64) * 2
    sim = simulate(graph, x)
    got, out = imported_spikes(back, x)
    for name, s in got.items():
        assert torch.equal(sim[name].reshape(s.shape), s), name
    torch.testing.assert_close(out, sim["output"], rtol=1e-12, atol=1e-12)
    again = tetsnn.to_nir(back, shape, dt=1.0)       # Threshold and SumPool2d export back as themselves
    assert sorted(type(n).__name__ for n in again.nodes.values()) == \
        sorted(type(n).__name__ for n in graph.nodes.values())
    torch.testing.assert_close(simulate(again, x)["output"], sim["output"], rtol=1e-12, atol=1e-12)


def _graph(neuron, n=3):
    """Input -> Linear (identity) -> neuron -> Output."""
    return nir.NIRGraph(
        nodes={"input": nir.Input({"input": np.array([n])}), "fc": nir.Linear(np.eye(n, dtype=np.float32)),
               "sn": neuron, "output": nir.Output({"output": np.array([n])})},
        edges=[("input", "fc"), ("fc", "sn"), ("sn", "output")])


def full(v, n=3):
    return np.full(n, v, dtype=np.float32)


def lif(tau=2e-4, r=1.0, v_leak=0.0, v_threshold=0.5, v_reset=0.0):
    return nir.LIF(tau=full(tau), r=full(r), v_leak=full(v_leak), v_threshold=np.asarray(v_threshold, np.float32)
                   * np.ones(3, np.float32), v_reset=full(v_reset))


def test_neuron_gain_and_dt():
    """decay = 1 - dt/tau; a gain r*dt/tau other than 1 divides the threshold; dt: argument > metadata > 1e-4."""
    neuron = lambda g, **kw: next(m for m in tetsnn.from_nir(g, **kw).modules() if isinstance(m, tetsnn.LIF))  # noqa
    sn = neuron(_graph(lif(r=3.0)))                        # no metadata: dt = 1e-4, gain 1.5
    assert (sn.tau, sn.threshold) == (0.5, pytest.approx(0.5 / 1.5))
    g = _graph(lif(tau=4.0, r=1.0, v_threshold=0.25))
    g.metadata = {"dt": 1.0}
    sn = neuron(g)
    assert (sn.tau, sn.threshold) == (0.75, 1.0)
    sn = neuron(g, dt=2.0)                                  # an explicit dt wins
    assert (sn.tau, sn.threshold) == (0.5, 0.5)
    sn = neuron(_graph(nir.IF(r=full(2e4), v_threshold=full(0.7), v_reset=full(0.0))))
    assert (sn.tau, sn.threshold) == (1.0, pytest.approx(0.35))
    cuba = nir.CubaLIF(tau_syn=full(1e-4), tau_mem=full(2e-4), r=full(2.0), v_leak=full(0.0), v_threshold=full(1.0),
                       w_in=full(0.5))
    sn = neuron(_graph(cuba))                               # tau_syn = dt: a LIF with gain r*w_in*dt/tau_mem = 0.5
    assert (sn.tau, sn.threshold) == (0.5, 2.0)
    # the gain does not change the spikes: u = v / g
    x = torch.rand(4, 6, 3) * 2
    ref = tetsnn.LIF(tau=0.5, threshold=1.0)(x)
    assert torch.equal(tetsnn.from_nir(_graph(lif(r=3.0, v_threshold=1.5)), T=6)(x), ref)


@pytest.mark.parametrize("node,message", [
    (lif(v_threshold=[0.5, 0.6, 0.5]), "node 'sn': v_threshold differs between neurons"),
    (lif(tau=5e-5), r"node 'sn': decay 1 - dt/tau = -1.0 .* outside \[0, 1\]"),
    (lif(v_leak=0.1), "node 'sn': v_leak="),
    (lif(v_reset=-0.2), "node 'sn': v_reset="),
    (lif(r=-1.0), "node 'sn': input gain"),
    (nir.CubaLIF(tau_syn=full(2e-4), tau_mem=full(2e-4), r=full(1.0), v_leak=full(0.0), v_threshold=full(1.0)),
     "node 'sn': CubaLIF with tau_syn"),
    (nir.Scale(full(2.0)), "node 'sn': NIR Scale has no tetsnn counterpart"),
])
def test_what_import_refuses(node, message):
    with pytest.raises(ValueError, match=message):
        tetsnn.from_nir(_graph(node))


def test_bad_graphs_and_files(tmp_path):
    g = _graph(lif())
    g.edges.append(("sn", "fc"))
    with pytest.raises(ValueError, match=r"nodes \['fc', 'output', 'sn'\] lie on or after a cycle"):
        tetsnn.from_nir(g)
    with pytest.raises(ValueError, match="missing.nir: not a readable NIR graph"):
        tetsnn.from_nir(tmp_path / "missing.nir")
    with pytest.raises(ValueError, match="dt must be a positive number"):
        tetsnn.from_nir(_graph(lif()), dt=0)


def test_graph_from_snntorch_exporter():
    snn = pytest.importorskip("snntorch")
    from snntorch.export_nir import export_to_nir

    torch.manual_seed(0)
    kw = dict(init_hidden=True, reset_mechanism="zero")     # NIR cannot carry snnTorch's default subtract reset
    # per-neuron beta and threshold: with scalars nir 1.0.8's type check fails on the exported graph
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1),
                        snn.Leaky(beta=torch.full((4, 6, 6), 0.75), threshold=torch.full((4, 6, 6), 0.8), **kw),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                        snn.Leaky(beta=torch.full((5,), 0.5), threshold=torch.full((5,), 1.0), output=True, **kw))
    with torch.no_grad():
        net[0].weight.mul_(3)
        net[3].weight.mul_(6)
    x = torch.rand(1, 6, 2, 6, 6) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = export_to_nir(net, x[:, 0], ignore_dims=[0])    # (ignore_dims: NIR shapes have no batch)
    hidden = []
    h = net[1].register_forward_hook(lambda m, i, o: hidden.append(o))
    import snntorch.utils
    snntorch.utils.reset(net)
    with torch.no_grad():
        home = torch.stack([net(x[:, t])[0] for t in range(6)], 1)
    h.remove()
    back = tetsnn.from_nir(graph, T=6)
    lifs = [m for m in back.modules() if isinstance(m, tetsnn.LIF)]
    assert [(m.tau, m.threshold) for m in lifs] == [(0.75, pytest.approx(0.8)), (0.5, 1.0)]
    got, out = imported_spikes(back, x)
    first = next(k for k in got if got[k].shape[-1] != 5)
    assert 0 < home.mean() < 1 and 0 < got[first].mean() < 1
    assert torch.equal(got[first].flatten(2), torch.stack(hidden, 1).flatten(2))
    assert torch.equal(out, home)


def test_graph_from_spikingjelly_exporter():
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron
    from spikingjelly.activation_based.nir_exchange.to_nir import export_to_nir

    torch.manual_seed(0)
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1), neuron.LIFNode(tau=2.0, v_threshold=0.7),
                        layer.AvgPool2d(2), layer.Flatten(), layer.Linear(4 * 3 * 3, 5), neuron.IFNode(v_threshold=0.5))
    with torch.no_grad():
        net[0].weight.mul_(3)
        net[4].weight.mul_(6)
    x = torch.rand(2, 5, 2, 6, 6) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = export_to_nir(net, x[:, 0])                 # dt = 1e-4
    functional.reset_net(net)
    hidden = []
    h = net[1].register_forward_hook(lambda m, i, o: hidden.append(o))
    with torch.no_grad():
        home = torch.stack([net(x[:, t]) for t in range(5)], 1)
    h.remove()
    back = tetsnn.from_nir(graph, T=5)
    got, out = imported_spikes(back, x)
    first = next(k for k in got if got[k].shape[-1] != 5)
    assert 0 < home.mean() < 1 and 0 < got[first].mean() < 1
    assert torch.equal(got[first], torch.stack(hidden, 1))  # SpikingJelly fires on >=: equal barring exact ties
    assert torch.equal(out, home)


def test_imported_model_trains_with_tet(tmp_path):
    torch.manual_seed(0)
    tetsnn.export_nir(tetsnn.create_model("digits_snn", T=2), tmp_path / "d.nir", (1, 8, 8))
    model = tetsnn.create_model("nir", num_classes=10, T=2, path=str(tmp_path / "d.nir")).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.rand(4, 1, 8, 8) * 2, torch.arange(4)      # a batch it can learn by heart
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = tetsnn.tet_loss(model(x), y)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]                      # 2.3 -> about 1.5


def test_registry_model_errors(tmp_path):
    tetsnn.export_nir(tetsnn.create_model("digits_snn", T=2), tmp_path / "d.nir", (1, 8, 8))
    assert tetsnn.create_model("nir", path=tmp_path / "d.nir").output_shape == (10,)
    with pytest.raises(ValueError, match=r"num_classes = 7 differs from the output size \(10,\) of the NIR graph"):
        tetsnn.create_model("nir", num_classes=7, path=tmp_path / "d.nir")
    with pytest.raises(ValueError, match="model 'nir' needs the graph's file"):
        tetsnn.create_model("nir")
    g = _graph(lif())
    g.nodes["output"].output_type = {"output": None}           # not stated: one step of one sample tells
    assert tetsnn.from_nir(g).output_shape == (3,)


def test_train_a_graph_from_the_command_line(tmp_path, capsys):
    """tetsnn train --model nir; the checkpoint rebuilds from its config (tetsnn test, tetsnn export --dt)."""
    graph = tmp_path / "d.nir"
    tetsnn.export_nir(tetsnn.create_model("digits_snn", T=2), graph, (1, 8, 8))
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--T", "2", "--model", "nir", "--model-kw",
                 f"{{path: {graph}}}", "--out", str(run), "--device", "cpu"]) == 0
    assert main(["test", "--checkpoint", str(run / "last.pt"), "--device", "cpu"]) == 0
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "again.nir"),
                 "--dt", "1.0"]) == 0
    again = nir.read(str(tmp_path / "again.nir"))
    assert again.metadata["dt"] == 1.0
    assert {float(n.tau.flat[0]) for n in again.nodes.values() if isinstance(n, nir.LIF)} == {2.0}
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "x.nir"), "--dt", "0"]) == 2
    assert "dt" in capsys.readouterr().err
