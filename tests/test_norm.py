"""TEBN and tdBN: exactness against SpikingJelly 2.0's modules (float64, train and eval, T = 1..8), alone
and inside a layer with BatchNorm fusion on and off; the models' norm= option, state_dict keys and
NIR export."""
import pytest
import torch
from spikingjelly.activation_based import layer as sj_layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate
from torch import nn

import tetsnn
from tetsnn import TEBN, Layer, tdBN, to_batch_first, to_time_first
from tetsnn.layers import fuses_bn
from tetsnn.norm import make_norm


def _sj_norm(kind, T, C):
    if kind == "tebn":
        return sj_layer.TemporalEffectiveBatchNorm2d(T, C).double()
    return sj_layer.ThresholdDependentBatchNorm2d(0.7, 1.3, C).double()


def _our_norm(kind, T, C, sj):
    """Ours with SpikingJelly's parameters and statistics (TEBN keeps its BatchNorm as the child ``bn``)."""
    if kind == "tebn":
        m = TEBN(C, T).double()
        m.load_state_dict({k if k == "scale" else f"bn.{k}": v for k, v in sj.state_dict().items()})
    else:
        m = tdBN(C, alpha=0.7, threshold=1.3).double()
        m.load_state_dict(sj.state_dict())
    return m


def _sj_name(kind, name):
    return name.removeprefix("bn.") if kind == "tebn" else name


@pytest.mark.parametrize("kind", ["tebn", "tdbn"])
def test_equals_spikingjelly_train_and_eval(kind):
    gen = torch.Generator().manual_seed(0)
    for T in range(1, 9):
        sj = _sj_norm(kind, T, 3)
        with torch.no_grad():
            for p in sj.parameters():
                p.uniform_(0.5, 1.5, generator=gen)
        ours = _our_norm(kind, T, 3, sj)
        for mode in ("train", "train", "eval"):
            sj.train(mode == "train"), ours.train(mode == "train")
            x = torch.randn(2, T, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 + 0.5
            xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, yo = sj(to_time_first(xs)), ours(xo)
            gy = torch.randn(yo.shape, generator=gen, dtype=torch.float64)
            ys.backward(to_time_first(gy)), yo.backward(gy)
            torch.testing.assert_close(yo, to_batch_first(ys), rtol=0, atol=1e-12)
            torch.testing.assert_close(xo.grad, xs.grad, rtol=0, atol=1e-10)
            sj_params = dict(sj.named_parameters())
            for name, p in ours.named_parameters():
                q = sj_params[_sj_name(kind, name)]
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10)
                p.grad = q.grad = None
            sj_buffers = dict(sj.named_buffers())
            for name, b in ours.named_buffers():
                torch.testing.assert_close(b, sj_buffers[_sj_name(kind, name)], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["tebn", "tdbn"])
def test_flattened_steps_equal_the_sequence(kind):
    """Inside a SeqToANNContainer the layer gets [N*T, C, H, W]: the same as [N, T, C, H, W]."""
    torch.manual_seed(0)
    m = make_norm(kind, 3, T=4)
    x = torch.randn(2, 4, 3, 5, 5)
    assert torch.equal(m(x).flatten(0, 1), m(x.flatten(0, 1)))
    assert m(x).shape == x.shape


@pytest.mark.parametrize("kind", ["tebn", "tdbn"])
@pytest.mark.parametrize("fuse_bn", [True, False])
def test_layer_with_lif_equals_spikingjelly(kind, fuse_bn):
    """conv -> norm -> LIF as tetsnn's Layer (BatchNorm fusion on and off) and as SpikingJelly's modules.

    SpikingJelly's LIFNode(tau=2, decay_input=False, v_reset=0) is TET's LIF with decay 0.5."""
    gen = torch.Generator().manual_seed(1)
    fired = []
    for T in range(1, 9):
        torch.manual_seed(T)
        conv = nn.Conv2d(2, 3, 3, 1, 1).double()
        sj_norm = _sj_norm(kind, T, 3)
        with torch.no_grad():
            for p in sj_norm.parameters():
                p.uniform_(0.5, 1.5, generator=gen)
        sj = nn.Sequential(
            sj_layer.SeqToANNContainer(conv), sj_norm,
            sj_neuron.LIFNode(tau=2.0, decay_input=False, v_threshold=1.0, v_reset=0.0,
                              surrogate_function=sj_surrogate.Sigmoid(alpha=4.0), step_mode="m"))
        ours = Layer(2, 3, neuron="lif", norm=kind, T=T, surrogate="sigmoid", fuse_bn=fuse_bn).double()
        ours.fwd.module[0].load_state_dict(conv.state_dict())
        ours.fwd.module[1].load_state_dict(_our_norm(kind, T, 3, sj_norm).state_dict())
        assert fuses_bn(ours.fwd.module[1], ours.act, fuse_bn) == (fuse_bn and kind == "tdbn")
        for mode in ("train", "eval"):
            sj.train(mode == "train"), ours.train(mode == "train")
            x = torch.rand(2, T, 2, 5, 5, generator=gen, dtype=torch.float64) * 3
            xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, yo = sj(to_time_first(xs)), ours(xo)
            sj_neuron_ = sj[2]
            sj_neuron_.reset()
            gy = torch.randn(yo.shape, generator=gen, dtype=torch.float64)
            ys.backward(to_time_first(gy)), yo.backward(gy)
            assert torch.equal(yo, to_batch_first(ys).detach()), (T, mode)
            fired.append(yo.mean().item())
            torch.testing.assert_close(xo.grad, xs.grad, rtol=0, atol=1e-10)
            pairs = [(p, dict(conv.named_parameters())[n]) for n, p in ours.fwd.module[0].named_parameters()]
            pairs += [(p, dict(sj_norm.named_parameters())[_sj_name(kind, n)])
                      for n, p in ours.fwd.module[1].named_parameters()]
            assert len(pairs) == len(list(sj.parameters())) == len(list(ours.parameters()))
            for p, q in pairs:
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10)
                p.grad = q.grad = None
            ours_buffers = dict(ours.fwd.module[1].named_buffers())
            for name, b in sj_norm.named_buffers():
                key = f"bn.{name}" if kind == "tebn" else name
                torch.testing.assert_close(ours_buffers[key], b, rtol=0, atol=1e-12)
    assert 0.1 < sum(fired) / len(fired) < 0.9


def test_initialisation_as_spikingjelly():
    for kind in ("tebn", "tdbn"):
        sj = _sj_norm(kind, 5, 4)
        ours = make_norm(kind, 4, T=5) if kind == "tebn" else tdBN(4, 0.7, 1.3).double()
        sj_sd = sj.state_dict()
        for k, v in ours.state_dict().items():
            assert torch.equal(v.double(), sj_sd[_sj_name(kind, k)].double()), (kind, k)
    assert bool((tdBN(4, 0.7, 1.3).weight == 0.7 * 1.3).all())


def test_tdbn_initialisation_survives_model_init():
    m = tetsnn.create_model("resnet18", T=1, norm="tdbn", threshold=0.5)
    norms = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert norms and all(isinstance(x, tdBN) for x in norms)
    assert all(bool((x.weight == 0.5).all()) and bool((x.bias == 0).all()) for x in norms)


@pytest.mark.parametrize("name, shape, kw", [
    ("digits_snn", (2, 1, 8, 8), {}),
    ("vggsnn", (2, 2, 16, 16), {"size": 16}),
    ("resnet19", (1, 3, 8, 8), {}),
    ("sew_resnet19", (1, 3, 16, 16), {"connect": "AND"}),
])
def test_models_norm_option_and_state_dict_keys(name, shape, kw):
    torch.manual_seed(0)
    keys = list(tetsnn.create_model(name, T=2, **kw).state_dict())
    assert not any(".bn." in k or k.endswith(".scale") for k in keys)
    assert list(tetsnn.create_model(name, T=2, norm="tdbn", **kw).state_dict()) == keys
    tebn = tetsnn.create_model(name, T=2, norm="tebn", **kw)
    n_norms = sum(isinstance(m, TEBN) for m in tebn.modules())
    assert n_norms == sum(isinstance(m, nn.BatchNorm2d) for m in tetsnn.create_model(name, T=2, **kw).modules())
    tebn_keys = list(tebn.state_dict())
    assert sum(k.endswith(".scale") for k in tebn_keys) == n_norms
    # every other key is the default's, with the BatchNorm as the child "bn"
    assert sorted(k.replace(".bn.", ".") for k in tebn_keys if not k.endswith(".scale")) == sorted(keys)
    y = tebn(torch.rand(shape))
    y.sum().backward()
    assert all(m.scale.grad is not None for m in tebn.modules() if isinstance(m, TEBN))
    again = tetsnn.create_model(name, T=2, norm="tebn", **kw)
    again.load_state_dict(tebn.state_dict())
    tebn.eval(), again.eval()
    x = torch.rand(shape)
    assert torch.equal(tebn(x), again(x))


def test_nir_export_folds_tdbn_and_uniform_tebn():
    torch.manual_seed(0)
    plain = tetsnn.create_model("digits_snn", T=2)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1)
    td = tetsnn.create_model("digits_snn", T=2, norm="tdbn")
    td.load_state_dict(plain.state_dict())
    te = tetsnn.create_model("digits_snn", T=2, norm="tebn")
    te_sd, plain_sd = {}, plain.state_dict()
    for k in te.state_dict():  # the same BatchNorm as (affine / 2) * scale 2
        if k.endswith(".scale"):
            te_sd[k] = torch.full((2,), 2.0)
        else:
            v = plain_sd[k.replace(".bn.", ".")].clone()
            te_sd[k] = v / 2 if ".bn." in k and k.endswith((".weight", ".bias")) else v
    te.load_state_dict(te_sd)
    graphs = [tetsnn.to_nir(m, (1, 8, 8)) for m in (plain, td, te)]
    for g in graphs[1:]:
        assert list(g.nodes) == list(graphs[0].nodes)
        for name, node in graphs[0].nodes.items():
            for attr in ("weight", "bias"):
                if hasattr(node, attr):
                    assert torch.allclose(torch.as_tensor(getattr(g.nodes[name], attr)),
                                          torch.as_tensor(getattr(node, attr)), rtol=1e-6, atol=1e-6), name
    with torch.no_grad():
        te.features[1].fwd.module[1].scale[0] = 3.0
    with pytest.raises(ValueError) as e:
        tetsnn.to_nir(te, (1, 8, 8))
    assert "'features.1.fwd.module.1'" in str(e.value) and "scale" in str(e.value) and "\n" not in str(e.value)


def test_bad_arguments_are_one_line():
    with pytest.raises(ValueError, match="unknown norm 'ln'"):
        make_norm("ln", 3)
    with pytest.raises(ValueError, match="'tebn' needs the number of time steps"):
        make_norm("tebn", 3)
    with pytest.raises(ValueError, match="T as an integer"):
        TEBN(3, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        TEBN(3, 4)(torch.zeros(6, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[N, T, C, H, W\]"):
        tdBN(3)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown norm"):
        tetsnn.create_model("digits_snn", norm="group")


@pytest.mark.parametrize("name, kw, shape", [
    ("digits_snn", dict(T=3), (2, 1, 8, 8)),
    ("resnet19", dict(T=2), (2, 3, 8, 8)),         # tdBN fused with the residual add
    ("sew_resnet19", dict(T=2), (1, 3, 16, 16)),
])
@pytest.mark.parametrize("norm", ["tdbn", "tebn"])
def test_models_fused_equal_unfused(name, kw, shape, norm):
    """BatchNorm fusion on and off give the same step (float64): tdBN runs fused, TEBN unfused."""
    torch.manual_seed(0)
    fused = tetsnn.create_model(name, norm=norm, fuse_bn=True, **kw).double().train()
    plain = tetsnn.create_model(name, norm=norm, fuse_bn=False, **kw).double().train()
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, (nn.BatchNorm2d, TEBN)):
                for p in m.parameters():
                    p.uniform_(0.5, 1.5)
    plain.load_state_dict(fused.state_dict())
    norms = [m for m in fused.modules() if isinstance(m, (tdBN, TEBN))]
    assert norms and all(fuses_bn(m, tetsnn.LIF()) == (norm == "tdbn") for m in norms)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    outs = []
    for model in (fused, plain):
        xx = x.clone().requires_grad_()
        y = model(xx)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype))
        outs.append((y.detach(), xx.grad, {k: p.grad for k, p in model.named_parameters()},
                     {k: b.clone() for k, b in model.named_buffers()}))
    (y1, gx1, gp1, b1), (y2, gx2, gp2, b2) = outs
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx1, gx2, rtol=0, atol=1e-10)
    assert gx1.abs().sum() > 0
    for k in gp1:
        torch.testing.assert_close(gp1[k], gp2[k], rtol=0, atol=1e-10, msg=k)
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k], rtol=0, atol=1e-12, msg=k)
