"""PSN and SlidingPSN: the per-step loop against the fused path, exactness against SpikingJelly 2.0's
modules (float64, T = 1..8), models built with them, profile and NIR export."""
import json

import pytest
import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

import tetsnn
from tetsnn import PSN, SlidingPSN, to_batch_first, to_time_first
from tetsnn.cli import main
from tetsnn.kernels import psn_numba
from tetsnn.neuron import make_neuron
from tetsnn.neuron.psn import psn_fused, psn_loop, sliding_index



@pytest.fixture(params=["numba", "torch-ops"])
def kernel(request, monkeypatch):
    """The fused path's two forms on CPU: the numba kernels, or the batched matmul and torch ops."""
    if request.param == "numba":
        if not psn_numba.available():
            pytest.skip("numba is not installed")
        assert psn_numba.applies(torch.zeros(1, dtype=torch.float64), "zif")
    else:
        monkeypatch.setattr(psn_numba, "applies", lambda x, surrogate: False)
    return request.param


SJ_SURROGATES = {"sigmoid": lambda: sj_surrogate.Sigmoid(alpha=4.0), "atan": lambda: sj_surrogate.ATan(alpha=2.0)}


def _pair(kind, T, order, surrogate):
    """SpikingJelly's module and ours (loop and fused) with the same float64 parameters."""
    sg = SJ_SURROGATES[surrogate]()
    if kind == "psn":
        sj = sj_neuron.PSN(T, surrogate_function=sg).double()
        with torch.no_grad():  # a bias that lets about half of the neurons fire
            sj.bias.uniform_(-0.5, 0.5)
        ours = [PSN(T, surrogate=surrogate, backend=b).double() for b in ("loop", "fused")]
    else:
        sj = sj_neuron.SlidingPSN(order, surrogate_function=sg, step_mode="m").double()
        with torch.no_grad():  # away from the initial values, so every weight matters
            sj.weight.uniform_(-1.5, 1.5)
            sj.bias.fill_(-0.6)
        ours = [SlidingPSN(order, surrogate=surrogate, backend=b).double() for b in ("loop", "fused")]
    for m in ours:
        m.load_state_dict(sj.state_dict())
    return sj, ours


def _margin(module, x):
    """Smallest |H| over the input: a spike is compared exactly only away from H = 0 (SpikingJelly fires on >=)."""
    with torch.no_grad():
        w, b = module.mixing(x.shape[1])
        h = torch.einsum("ts,nsf->ntf", w, x.reshape(x.shape[0], x.shape[1], -1)) + b
    return h.abs().min().item()


@pytest.mark.parametrize("kind", ["psn", "sliding"])
@pytest.mark.parametrize("surrogate", ["sigmoid", "atan"])
def test_equals_spikingjelly_float64(kind, surrogate, kernel):
    gen = torch.Generator().manual_seed(1)
    fired = []
    for T in range(1, 9):
        for order in ((1, 2, 3) if kind == "sliding" else (None,)):
            torch.manual_seed(T)
            sj, ours = _pair(kind, T, order, surrogate)
            x = 2 * torch.randn(3, T, 2, 5, generator=gen, dtype=torch.float64)
            assert _margin(ours[0], x) > 1e-9
            xs = x.clone().requires_grad_()
            y = sj(to_time_first(xs))
            gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
            y.backward(gy)
            for m in ours:
                xo = x.clone().requires_grad_()
                yo = m(xo)
                yo.backward(to_batch_first(gy))
                assert torch.equal(yo, to_batch_first(y).detach()), (T, order, m.backend)
                fired.append(yo.mean().item())
                torch.testing.assert_close(xo.grad, xs.grad, rtol=0, atol=1e-10)
                torch.testing.assert_close(m.weight.grad, sj.weight.grad, rtol=0, atol=1e-10)
                torch.testing.assert_close(m.bias.grad, sj.bias.grad, rtol=0, atol=1e-10)
    assert 0.1 < sum(fired) / len(fired) < 0.9


def test_initialisation_as_spikingjelly():
    torch.manual_seed(0)
    sj = sj_neuron.PSN(6)
    torch.manual_seed(0)
    ours = PSN(6)
    assert torch.equal(ours.weight, sj.weight) and torch.equal(ours.bias, sj.bias)
    assert ours.bias.shape == (6, 1) and bool((ours.bias == -1).all())
    s = SlidingPSN(4)
    assert s.weight.tolist() == sj_neuron.SlidingPSN(4).weight.tolist() == [0.125, 0.25, 0.5, 1.0]
    assert s.bias.item() == -1.0 and s.bias.shape == ()
    assert SlidingPSN(3, exp_init=False).weight.abs().max() <= 1 / 3 ** 0.5


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_sliding_matrix_as_spikingjelly(order):
    sj = sj_neuron.SlidingPSN(order, exp_init=False, step_mode="m")
    ours = SlidingPSN(order)
    ours.load_state_dict(sj.state_dict())
    for T in range(1, 9):
        assert torch.equal(ours.mixing(T)[0], sj.gen_gemm_weight(T))
    assert sliding_index(3, 2).tolist() == [[2, 0, 0], [1, 2, 0], [0, 1, 2]]


def _grads(module, x, gy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("cls", [lambda **k: PSN(4, **k), lambda **k: SlidingPSN(3, **k)])
@pytest.mark.parametrize("surrogate", ["zif", "sigmoid", "atan", lambda v: 1.0 / (1.0 + v.abs()) ** 2])
def test_fused_equals_loop(cls, surrogate, kernel):
    torch.manual_seed(0)
    loop = cls(surrogate=surrogate, backend="loop").double()
    fused = cls(surrogate=surrogate, backend="fused").double()
    fused.load_state_dict(loop.state_dict())
    x = torch.randn(5, 4, 3, 2, 2, dtype=torch.float64)
    gy = torch.randn_like(x)
    for a, b in zip(_grads(loop, x, gy), _grads(fused, x, gy)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_spike_input_kept_as_bits(kernel):
    """spikes=True keeps the 0/1 input as packed bits and gives the same gradients bit for bit."""
    torch.manual_seed(0)
    plain, bits = PSN(8), PSN(8, spikes=True)
    bits.load_state_dict(plain.state_dict())
    x = (torch.rand(4, 8, 64) > 0.6).float()
    gy = torch.randn_like(x)
    for a, b in zip(_grads(plain, x, gy), _grads(bits, x, gy)):
        assert torch.equal(a, b)

    def kept(module):
        sizes = []

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                sizes.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x.clone().requires_grad_())
        return sum(sizes)
    assert kept(plain) == x.numel() * 4           # X alone (H is rebuilt in backward)
    assert kept(bits) == x.numel() // 8           # one bit per input
    loop = PSN(8, backend="loop")
    loop.load_state_dict(plain.state_dict())
    assert kept(loop) > 2 * x.numel() * 4


def test_no_grad_keeps_nothing_and_matches():
    torch.manual_seed(0)
    m = PSN(3)
    x = torch.randn(2, 3, 7)
    with torch.no_grad():
        y = m(x)
    assert torch.equal(y, psn_loop(x, m.weight.detach(), m.bias.detach(), m.spike_fn))
    assert torch.equal(psn_fused(x, m.weight, m.bias, m._surrogate), y)


def test_bad_arguments_are_one_line():
    with pytest.raises(ValueError, match="T=4 steps, got input with 3"):
        PSN(4)(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="batch-first"):
        PSN(4)(torch.zeros(4))
    with pytest.raises(ValueError, match="integer >= 1"):
        PSN(0)
    with pytest.raises(ValueError, match="order"):
        SlidingPSN(0)
    with pytest.raises(ValueError, match="backend 'triton'"):
        SlidingPSN(2, backend="triton")
    with pytest.raises(ValueError, match="needs the number of time steps T"):
        make_neuron("psn")
    with pytest.raises(ValueError, match="needs its order"):
        make_neuron("sliding_psn")
    assert make_neuron("psn", T=3).T == 3 and make_neuron("sliding_psn", order=2, T=3).order == 2
    assert make_neuron("lif", T=3).tau == 0.5


@pytest.mark.parametrize("name, shape, kw, neuron, nkw", [
    ("digits_snn", (2, 1, 8, 8), {}, "psn", {}),
    ("digits_snn", (2, 1, 8, 8), {}, "sliding_psn", {"order": 2}),
    ("vggsnn", (2, 2, 16, 16), {"size": 16}, "sliding_psn", {"order": 3}),
    ("resnet19", (1, 3, 8, 8), {}, "psn", {}),
    ("sew_resnet19", (1, 3, 16, 16), {}, "sliding_psn", {"order": 2}),
])
def test_models_with_psn(name, shape, kw, neuron, nkw):
    torch.manual_seed(0)
    model = tetsnn.create_model(name, T=3, neuron=neuron, **nkw, **kw)
    cls = PSN if neuron == "psn" else SlidingPSN
    layers = [m for m in model.modules() if isinstance(m, cls)]
    assert layers and not any(isinstance(m, tetsnn.LIF) for m in model.modules())
    y = model(torch.rand(shape))
    assert y.shape == (shape[0], 3, 10)
    y.sum().backward()
    assert all(m.weight.grad is not None for m in layers)
    # state_dict round trip: a fresh model with the loaded weights computes the same
    again = tetsnn.create_model(name, T=3, neuron=neuron, **nkw, **kw)
    again.load_state_dict(model.state_dict())
    model.eval(), again.eval()
    x = torch.rand(shape)
    assert torch.equal(model(x), again(x))
    key = "weight" if neuron == "psn" else "bias"
    assert any(k.endswith(f"act.{key}") or k.endswith(f"sn1.{key}") or k.endswith(f"sn.{key}")
               for k in model.state_dict())


def test_psn_neuron_counted_by_profile():
    torch.manual_seed(0)
    model = tetsnn.create_model("digits_snn", T=2, neuron="psn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PSN):
                m.bias.zero_()  # about half of the neurons fire
    from tetsnn.analysis import profile
    res = profile(model, torch.rand(8, 1, 8, 8))
    assert set(res["firing_rates"]) == {"features.0.act", "features.1.act", "features.3.act", "sn"}
    assert all(0 < r < 1 for r in res["firing_rates"].values())
    layers = {row["layer"]: row for row in res["layers"]}
    assert layers["features.1.fwd.module.0"]["spike_driven"] and not layers["features.0.fwd.module.0"]["spike_driven"]
    assert res["synops"] > 0


def test_nir_export_refuses_psn_in_one_line():
    model = tetsnn.create_model("digits_snn", T=2, neuron="sliding_psn", order=2)
    with pytest.raises(ValueError) as e:
        tetsnn.to_nir(model, (1, 8, 8))
    msg = str(e.value)
    assert "'features.0.act'" in msg and "SlidingPSN" in msg and "\n" not in msg


def test_config_model_kw_train_and_profile(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--limit-train", "64", "--limit-test", "32", "--batch-size", "32",
                 "--T", "2", "--model-kw", "{neuron: psn, norm: tebn}", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["profile", "--checkpoint", str(out / "best.pt"), "--batches", "1", "--device", "cpu",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["firing_rates"]) == {"features.0.act", "features.1.act", "features.3.act", "sn"}
    assert main(["export", "--checkpoint", str(out / "best.pt"), "--format", "nir",
                 "--out", str(tmp_path / "x.nir")]) == 2
    err = capsys.readouterr().err.strip()
    assert "PSN" in err and len(err.splitlines()) == 1
    assert main(["train", "--model-kw", "{norm: bogus}", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bogus" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("cls", [lambda: PSN(4), lambda: SlidingPSN(2)])
def test_half_precision_input_mixed_in_float32(cls):
    """A bfloat16 input (or autocast) is mixed in the parameters' float32, forward and backward alike."""
    torch.manual_seed(0)
    m = cls()
    with torch.no_grad():
        m.bias.zero_()
    x = torch.randn(3, 4, 16).to(torch.bfloat16)
    gy = torch.randn(3, 4, 16).to(torch.bfloat16)
    results = []
    for backend in ("loop", "fused"):
        m.backend = backend
        m.zero_grad()
        xx = x.clone().requires_grad_()
        y = m(xx)
        y.backward(gy)
        assert y.dtype == xx.grad.dtype == torch.bfloat16 and m.weight.grad.dtype == torch.float32
        results.append((y, xx.grad, m.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and 0 < results[0][0].mean() < 1
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-4, atol=1e-4)
    m.backend = "fused"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = m(x.float())
    assert torch.equal(ya, m(x.float()))
