"""ILIF (integer-valued spikes) through every path against the loop and SpikingJelly's ILIFNode in
float64; the bits spike-fed layers keep for integer spikes; profile and NIR export.

The Triton kernels run on the CPU through Triton's interpreter, switched on before they are built.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import tetsnn  # noqa: E402
from tetsnn import ILIF  # noqa: E402
from tetsnn.compact import SpikeConv2d, SpikeLinear  # noqa: E402
from tetsnn.kernels import numba_kernels  # noqa: E402
from tetsnn.kernels.levels import planes_for  # noqa: E402
from tetsnn.kernels.torch_kernels import forward as torch_forward  # noqa: E402

sjn = pytest.importorskip("spikingjelly.activation_based.neuron")
sjs = pytest.importorskip("spikingjelly.activation_based.surrogate")

TOL = 1e-10


def far_input(shape, m: ILIF, seed=0):
    """float64 input whose h / threshold stays 1e-3 away from the rounding points k + 1/2 and from the
    gradient window's ends 0 and max_level."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 1.0
    spec = m.spec
    for t in range(shape[1]):
        q = torch_forward(x, spec, spec.decay)[1][:, t] / spec.threshold
        frac = (q - q.floor() - 0.5).abs()
        near = (frac < 1e-3) | (q.abs() < 1e-3) | ((q - spec.max_level).abs() < 1e-3)
        x[:, t][near] += 0.01
    return x


def run(m, x, grad):
    xx = x.clone().requires_grad_()
    s = m(xx)
    s.backward(grad)
    return s, xx.grad


@pytest.mark.parametrize("max_level,tau,detach", [(4, 0.25, False), (2, 0.5, True), (3, 0.8, False)])
def test_against_spikingjelly_every_path(max_level, tau, detach, monkeypatch):
    for T in range(1, 9):
        ref_node = sjn.ILIFNode(tau=1 / (1 - tau), detach_reset=detach, step_mode="m",
                                surrogate_function=sjs.MultiLevelSpikeCount(max_level))
        m = ILIF(max_level, tau, detach_reset=detach, backend="loop")
        x = far_input((2, T, 3, 5), m, seed=T)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(T + 50), dtype=torch.float64)
        xx = x.clone().requires_grad_()
        s_ref = ref_node(xx.transpose(0, 1).contiguous()).transpose(0, 1)
        s_ref.backward(grad)
        assert s_ref.max() == max_level and set(s_ref.unique().tolist()) <= set(range(max_level + 1))
        for path in ["loop", "numba"] + (["torch_ops", "triton"] if T in (1, 4, 8) else []):
            backend = {"loop": "loop", "triton": "triton"}.get(path, "fused")
            with monkeypatch.context() as mp:
                if path == "torch_ops":
                    mp.setitem(numba_kernels.STATE, "numba", False)
                node = ILIF(max_level, tau, detach_reset=detach, backend=backend)
                if path != "loop":
                    assert node.path(x).value == path
                s, gx = run(node, x, grad)
            assert torch.equal(s, s_ref), (path, T)
            torch.testing.assert_close(gx, xx.grad, rtol=TOL, atol=TOL)


def test_float32_fused_equals_loop():
    m = ILIF(backend="loop")
    x = far_input((3, 6, 40), m).float()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    s1, g1 = run(m, x, grad)
    s2, g2 = run(ILIF(backend="fused"), x, grad)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)


def saved_numel(fn):
    sizes = []

    def pack(t):
        sizes.append((t.numel(), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 7])
def test_spike_fed_layers_keep_log2_bits(levels):
    """Integer spikes 0..D are kept as ceil(log2(D+1)) bit planes; gradients equal the plain layers'."""
    assert planes_for(levels) == (levels + 1 - 1).bit_length()
    g = torch.Generator().manual_seed(levels)
    x = torch.randint(0, levels + 1, (6, 4, 5, 5), generator=g).double()
    for lean, plain, inp in ((SpikeConv2d(4, 3, 3, padding=1, levels=levels), nn.Conv2d(4, 3, 3, padding=1), x),
                             (SpikeLinear(5, 2, levels=levels), nn.Linear(5, 2), x)):
        lean, plain = lean.double(), plain.double()
        plain.load_state_dict(lean.state_dict())
        outs = []
        for layer in (lean, plain):
            xx = inp.clone().requires_grad_()
            y = layer(xx)
            y.backward(torch.ones_like(y))
            outs.append([y, xx.grad, layer.weight.grad])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        xx = inp.clone().requires_grad_()
        kept = [n for n, dt in saved_numel(lambda: lean(xx)) if dt == torch.uint8]
        assert kept == [(x.numel() + 7) // 8] * planes_for(levels)


def test_models_take_ilif_and_keep_bits_for_its_counts():
    model = tetsnn.create_model("resnet19", neuron="ilif", max_level=3, T=2)
    assert {m.max_level for m in model.modules() if isinstance(m, ILIF)} == {3}
    assert {m.levels for m in model.modules() if isinstance(m, SpikeConv2d)} == {3}
    out = model(torch.rand(2, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_profile_counts_a_value_v_as_v_operations():
    from tetsnn import SeqToANNContainer
    from tetsnn.analysis.profile import profile

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = SeqToANNContainer(nn.Linear(6, 5))
            self.sn = ILIF()
            self.fc2 = SeqToANNContainer(nn.Linear(5, 3))

        def forward(self, x):
            return self.fc2(self.sn(self.fc1(x)))

    model = Tiny()
    with torch.no_grad():
        model.fc1.module.weight.fill_(0.5)
        model.fc1.module.bias.zero_()
    x = torch.rand(4, 3, 6, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        counts = model.sn(model.fc1(x))
    assert counts.max() > 1   # integer counts above one reach the last Linear
    r = profile(model, x, T=3)
    row = next(row for row in r["layers"] if row["layer"] == "fc2.module")
    assert row["spike_driven"] and row["synops_per_sample"] * 4 == float(counts.sum()) * 3
    assert r["firing_rates"]["sn"] == pytest.approx(float(counts.mean()))


def test_nir_export_refuses_ilif_in_one_line():
    pytest.importorskip("nir")
    model = tetsnn.create_model("digits_snn", neuron="ilif", T=2, size=8)
    with pytest.raises(ValueError) as e:
        tetsnn.to_nir(model, (1, 8, 8))
    assert "ILIF" in str(e.value) and "\n" not in str(e.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_level"):
        ILIF(max_level=0)
    with pytest.raises(ValueError, match="threshold"):
        ILIF(threshold=0.0)
    with pytest.raises(ValueError, match="backend"):
        ILIF(backend="numba")
