"""The spiking transformers: parameter counts of every preset, equality with SpikingJelly 2.0's models
(float64, forward and backward, train- and eval-mode BatchNorm) through convert_state_dict, and the
spike products that keep their operands as bits."""
import pytest
import torch
from torch import nn

import tetsnn
from tetsnn.attention import ATTENTION_THRESHOLD, spike_attention, spike_mul

sj_model = pytest.importorskip("spikingjelly.activation_based.model")
from spikingjelly.activation_based import functional, layer, neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based.model import qkformer as sj_qk  # noqa: E402
from spikingjelly.activation_based.model import spike_driven_transformer as sj_sdt  # noqa: E402
from spikingjelly.activation_based.model import spikformer as sj_sf  # noqa: E402


def count(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ parameter counts

# (model, preset, classes): parameters as tetsnn builds them (the official code's layers); the papers' figures
# in docs/models.md
COUNTS = [
    ("spikformer", "cifar-4-384", 10, 9_324_730),        # paper 9.32M
    ("spikformer", "dvs-2-256", 10, 2_566_666),          # paper 2.57M
    ("spikformer", "imagenet-8-384", 1000, 16_816_024),  # paper 16.81M
    ("spikformer", "imagenet-8-512", 1000, 29_689_384),  # paper 29.68M
    ("spikformer", "imagenet-8-768", 1000, 66_338_632),  # paper 66.34M
    ("spike_driven_transformer", "imagenet-8-384", 1000, 16_816_024),
    ("spike_driven_transformer", "imagenet-8-512", 1000, 29_689_384),
    ("spike_driven_transformer", "imagenet-8-768", 1000, 66_338_632),
    ("spike_driven_transformer", "cifar-2-512", 10, 10_233_418),
    ("spike_driven_transformer", "dvs-2-256", 10, 2_566_666),
    ("qkformer", "imagenet-10-384", 1000, 16_473_688),   # paper 16.47M
    ("qkformer", "imagenet-10-512", 1000, 29_079_336),   # paper 29.08M
    ("qkformer", "imagenet-10-768", 1000, 64_962_760),   # paper 64.96M
    ("qkformer", "cifar-4-384", 10, 6_706_234),
    ("qkformer", "dvs-2-256", 10, 1_504_138),     # paper 1.50M
]


@pytest.mark.parametrize("name,preset,classes,expect", COUNTS, ids=[f"{n}-{p}" for n, p, _, _ in COUNTS])
def test_preset_parameter_counts(name, preset, classes, expect):
    with torch.device("meta"):   # shapes only
        model = tetsnn.create_model(name, classes, preset=preset)
    assert count(model) == expect


def test_paper_counts_to_their_precision():
    """The counts the papers print (millions, two decimals), where tetsnn's layers give them."""
    paper = {("spikformer", "cifar-4-384", 10): 9.32, ("spikformer", "dvs-2-256", 10): 2.57,
             ("spikformer", "imagenet-8-768", 1000): 66.34, ("qkformer", "imagenet-10-384", 1000): 16.47,
             ("qkformer", "imagenet-10-768", 1000): 64.96, ("qkformer", "imagenet-10-512", 1000): 29.08,
             ("qkformer", "dvs-2-256", 10): 1.50}
    counts = {(n, p, c): e for n, p, c, e in COUNTS}
    for key, millions in paper.items():
        assert round(counts[key] / 1e6, 2) == millions, key


def test_spikingjelly_counts_and_the_official_biases():
    """SpikingJelly's Spikformer drops the official CIFAR code's Linear biases (q, k, v, projection, MLP):
    9,310,906 parameters (zoo), tetsnn 9,324,730 = 9.32M; its QKFormer adds conv biases to the patch
    embeddings and drops the projections' (16,472,584 against tetsnn's 16,473,688)."""
    with torch.device("meta"):
        assert count(sj_sf.spikformer_cifar10()) == 9_310_906
        assert count(sj_qk.qkformer_10_384()) == 16_472_584
    d, blocks = 384, 4
    assert 9_310_906 + blocks * (3 * d + d + 4 * d + d) == 9_324_730


def test_presets_and_overrides():
    m = tetsnn.create_model("spikformer", preset="imagenet-8-512", depth=2, img_size=64)
    assert len(m.blocks) == 2 and m.blocks[0].attn.heads == 8
    with pytest.raises(ValueError, match="unknown spikformer preset 'cifar-9'"):
        tetsnn.create_model("spikformer", preset="cifar-9")
    with pytest.raises(ValueError, match="norm='bn' only, got 'tebn'"):
        tetsnn.create_model("qkformer", norm="tebn")
    with pytest.raises(ValueError, match="not divisible by heads"):
        tetsnn.create_model("spikformer", embed_dim=64, heads=5)
    lifs = [x for x in tetsnn.create_model("qkformer", 10, preset="cifar-4-384", embed_dim=32, heads=2).modules()
            if isinstance(x, tetsnn.LIF)]
    assert {(x.tau, x.decay_input, x.detach_reset, x.surrogate_name, x.width) for x in lifs} == {
        (0.5, True, True, "sigmoid", 4.0)}
    assert {x.threshold for x in lifs} == {1.0, ATTENTION_THRESHOLD}
    relu = tetsnn.create_model("spike_driven_transformer", 10, preset="cifar-2-512", embed_dim=32, heads=2,
                               neuron="relu")
    assert not any(isinstance(x, tetsnn.LIF) for x in relu.modules())


# ------------------------------------------------------------------------------------------ spike products

def _spikes(*shape, p=0.4, g=None):
    return (torch.rand(*shape, generator=g, dtype=torch.float64) < p).double()


def test_spike_attention_matches_matmul_and_keeps_bits():
    g = torch.Generator().manual_seed(0)
    q, k, v = (_spikes(2, 3, 4, 6, 10, g=g).requires_grad_() for _ in range(3))
    w = torch.randn(2, 3, 4, 6, 10, generator=g, dtype=torch.float64)
    out = spike_attention(q, k, v, 0.125)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qr, kr, vr = ref_in
    ref = (qr.transpose(-2, -1) @ kr @ vr.transpose(-2, -1)).transpose(-2, -1) * 0.125   # Q K^T V, tokens first
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    saved = out.grad_fn.saved_tensors
    assert all(t.dtype == torch.uint8 for t in saved)
    assert sum(t.numel() for t in saved) == 3 * q.numel() // 8
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip((q, k, v), ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


def test_spike_attention_on_one_qkv_tensor_keeps_its_bits_and_forms_one_gradient():
    """q, k, v as the slices of one tensor (one neuron's spikes, as SpikingSelfAttention passes them): the
    same outputs and gradients as three separate operands, one bit tensor kept, one gradient formed."""
    g = torch.Generator().manual_seed(2)
    base = _spikes(2, 3, 3 * 4 * 6, 10, g=g).requires_grad_()
    w = torch.randn(2, 3, 4, 6, 10, generator=g, dtype=torch.float64)
    qkv = base.view(2, 3, 3, 4, 6, 10)
    out = spike_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], 0.125, qkv=qkv)
    assert type(out.grad_fn).__name__ == "_StackedAttentionFnBackward"
    (saved,) = out.grad_fn.saved_tensors
    assert saved.dtype == torch.uint8 and saved.numel() == base.numel() // 8
    (out * w).sum().backward()
    ref_base = base.detach().clone().requires_grad_()
    r = ref_base.view(2, 3, 3, 4, 6, 10)
    ref = spike_attention(r[:, :, 0].contiguous(), r[:, :, 1].contiguous(), r[:, :, 2].contiguous(), 0.125)
    assert type(ref.grad_fn).__name__ == "_SpikeAttentionFnBackward"
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(base.grad, ref_base.grad, rtol=0, atol=1e-12)
    # slices of another tensor, or not in qkv's order: the three-operand path
    other = spike_attention(qkv[:, :, 1], qkv[:, :, 0], qkv[:, :, 2], 0.125, qkv=qkv)
    assert type(other.grad_fn).__name__ == "_SpikeAttentionFnBackward"


def test_spike_mul_broadcasts_and_keeps_bits():
    g = torch.Generator().manual_seed(1)
    a = _spikes(2, 3, 4, 1, 10, g=g).requires_grad_()
    b = _spikes(2, 3, 4, 6, 10, g=g).requires_grad_()
    w = torch.randn(2, 3, 4, 6, 10, generator=g, dtype=torch.float64)
    out = spike_mul(a, b)
    assert all(t.dtype == torch.uint8 for t in out.grad_fn.saved_tensors)
    (out * w).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = a2 * b2
    (ref * w).sum().backward()
    assert torch.equal(out, ref)
    torch.testing.assert_close(a.grad, a2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.grad, b2.grad, rtol=0, atol=1e-12)


def test_spike_conv1d_keeps_bits_and_matches_conv1d():
    from tetsnn.compact import SpikeConv1d
    torch.manual_seed(0)
    conv = SpikeConv1d(6, 5, 1, bias=True, levels=2).double()
    plain = nn.Conv1d(6, 5, 1).double()
    plain.load_state_dict(conv.state_dict())
    x = torch.randint(0, 3, (4, 6, 7)).double().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = conv(x), plain(x2)
    assert torch.equal(y, y2)
    assert sum(t.dtype == torch.uint8 for t in y.grad_fn.saved_tensors) == 2   # two bit planes
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ SpikingJelly parity

def _official_neurons(sj, detach_reset=True):
    """SpikingJelly's neurons as the official code builds them: the attention neurons at tetsnn's
    threshold (the same spikes as v >= 0.5 on their inputs' grid, see tetsnn.attention), every neuron
    with a detached reset."""
    for name, m in sj.named_modules():
        if isinstance(m, sj_neuron.LIFNode):
            if m.v_threshold == 0.5:
                m.v_threshold = ATTENTION_THRESHOLD
            m.detach_reset = detach_reset


def _spikformer_pool_after_neuron(sj):
    """SpikingJelly's Spikformer pools before the stem's neurons; the official code pools their spikes."""
    for stage in sj.patch_embed.stages:
        block = stage.conv_bn.block
        if len(block) == 3:
            stage.conv_bn.block = layer.SeqToANNContainer(block[0], block[1])
            stage.neuron = nn.Sequential(stage.neuron, layer.SeqToANNContainer(block[2]))


# the BatchNorm before the q, k, v neurons of Spikformer's self-attention (QKFormer's last stage too):
# its bias is raised so that q, k and v fire often enough for the attention neuron (threshold 0.5 on
# 0.125 times a count of spike triples) to fire on a substantial share of its elements. QKFormer's last
# stage has 4 tokens (Spikformer's test model 16), so fewer triples: it needs the larger raise
SSA_INPUT_BN = "qkv_conv_bn.1"
SSA_DRIVE = {"spikformer": 1.0, "qkformer": 1.4}


def _randomise(sj, g, drive=0.0):
    with torch.no_grad():
        for name, m in sj.named_modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) * 2 + 1)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g, dtype=m.bias.dtype) - 0.3)
                if name.endswith(SSA_INPUT_BN):
                    m.bias.add_(drive)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype) * 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.2)


CASES = {
    "spikformer": (
        lambda: sj_sf.Spikformer(T=2, in_channels=3, img_size_h=16, img_size_w=16, patch_size=4, num_classes=5,
                                 embed_dims=32, num_heads=2, depths=2),
        dict(img_size=16, patch_size=4, embed_dim=32, heads=2, depth=2, qkv_bias=False), 16),
    "spike_driven_transformer": (
        lambda: sj_sdt.SpikeDrivenTransformer(T=2, in_channels=3, num_classes=5, embed_dims=32, num_heads=2,
                                              depths=2, pooling_stat="0011"),
        dict(img_size=16, embed_dim=32, heads=2, depth=2, pooling="0011"), 16),
    "qkformer": (
        lambda: sj_qk.QKFormer(T=2, in_channels=3, num_classes=5, embed_dims=32, num_heads=(2, 2, 2),
                               depths=(1, 2, 1)),
        dict(embed_dim=32, heads=2, depth=4, img_size=32), 32),
}


def _calibrate(sj, x):
    """Running statistics set to the batch statistics of ``x`` (one train-mode pass with momentum 1), so
    that eval-mode BatchNorm normalises as train mode does and the neurons fire in both modes."""
    bns = [m for m in sj.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in bns:
        m.momentum = 1.0
    with torch.no_grad():
        functional.reset_net(sj)
        sj.train()(x)
    for m in bns:
        m.momentum = 0.1


def _firing_rates(sj):
    """Hooks recording each SpikingJelly neuron's share of spikes in the next forward pass."""
    rates = {}
    for name, m in sj.named_modules():
        if isinstance(m, sj_neuron.LIFNode):
            m.register_forward_hook(lambda mod, inp, out, name=name: rates.__setitem__(name, out.mean().item()))
    return rates


def _grads(model):
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CASES))
def test_equal_to_spikingjelly_in_float64(name):
    build_sj, kw, size = CASES[name]
    g = torch.Generator().manual_seed(0)
    sj = build_sj().double().train()
    _randomise(sj, g, SSA_DRIVE.get(name, 0.0))
    _official_neurons(sj)
    if name == "spikformer":
        _spikformer_pool_after_neuron(sj)
    x = torch.rand(3, 3, size, size, generator=g, dtype=torch.float64) * 2
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    _calibrate(sj, x)
    rates = _firing_rates(sj)
    ours = tetsnn.create_model(name, 5, T=2, **kw).double().train()
    sd = tetsnn.convert_state_dict(sj.state_dict(), source="spikingjelly", model=name, **kw)
    ours.load_state_dict(sd, strict=True)
    sj_ptrs = {t.data_ptr() for t in sj.state_dict().values()}
    added = {k for k, t in sd.items() if t.data_ptr() not in sj_ptrs and not t.any()}   # zero biases
    for mode in ("train", "eval"):
        sj.train(mode == "train")
        ours.train(mode == "train")
        sj.zero_grad()
        ours.zero_grad()
        xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        functional.reset_net(sj)
        rates.clear()
        ref = sj(xs)
        ref = ref.mean(0) if ref.dim() == 3 else ref        # Spikformer's head is per step: [T, N, classes]
        # every neuron, the attention neurons of every stage included, fires on a substantial share
        assert len(rates) >= 15 and any("attn_lif" in n for n in rates)
        quiet = {n: round(r, 3) for n, r in rates.items() if not 0.05 <= r <= 0.95}
        assert not quiet, f"{mode}: neurons firing too little or too much: {quiet}"
        out = ours(xo)
        assert out.shape == (3, 2, 5)
        torch.testing.assert_close(out.mean(1), ref, rtol=0, atol=1e-10)
        assert ref.std() > 0
        (ref * w).sum().backward()
        (out.mean(1) * w).sum().backward()
        torch.testing.assert_close(xo.grad, xs.grad, rtol=0, atol=1e-10)
        assert xs.grad.abs().sum() > 0
        expect = tetsnn.convert_state_dict(_grads(sj), model=name, **kw)
        got = _grads(ours)
        compared = 0
        for key, grad in expect.items():
            if key in added or key not in got:
                continue
            torch.testing.assert_close(got[key], grad, rtol=0, atol=1e-10, msg=f"{mode} {key}")
            compared += 1
        assert compared >= len(got) - len(added) - 1
    # running statistics moved alike (the folded conv biases included)
    for key, value in tetsnn.convert_state_dict(sj.state_dict(), model=name, **kw).items():
        if "running" in key:
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-10)


@pytest.mark.parametrize("builder,name,kw", [
    (sj_sf.spikformer_cifar10, "spikformer", dict(preset="cifar-4-384")),
    (sj_sdt.sdt_8_384, "spike_driven_transformer", dict(preset="imagenet-8-384")),
    (sj_qk.qkformer_10_384, "qkformer", dict(preset="imagenet-10-384")),
])
def test_spikingjelly_builders_load_into_the_presets(builder, name, kw):
    sj = builder()
    ours = tetsnn.create_model(name, 10 if name == "spikformer" else 1000, **kw)
    ours.load_state_dict(tetsnn.convert_state_dict(sj.state_dict(), model=name, **kw), strict=True)
    torch.testing.assert_close(ours.head.weight, sj.head.weight)


def test_convert_state_dict_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="unknown source 'snntorch'"):
        tetsnn.convert_state_dict({}, source="snntorch", model="spikformer")
    with pytest.raises(ValueError, match="no spikingjelly mapping for the model 'resnet19'"):
        tetsnn.convert_state_dict({}, model="resnet19")
    with pytest.raises(ValueError, match="no rule for the key 'features.0.weight'"):
        tetsnn.convert_state_dict({"features.0.weight": torch.zeros(1)}, model="qkformer")


# ------------------------------------------------------------------------------------------ tools

def test_profile_counts_the_attention_products():
    from tetsnn.analysis import profile
    torch.manual_seed(0)
    model = tetsnn.create_model("spikformer", 5, T=2, img_size=16, embed_dim=32, heads=2, depth=1)
    for m in model.modules():   # let the neurons fire (eval mode: the running statistics normalise)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.constant_(m.running_var, 1e-4)
    x = torch.rand(2, 3, 16, 16) * 3
    seen = {}
    product = model.blocks[0].attn.product
    handle = product.register_forward_hook(lambda m, inp, out: seen.update(qkv=[t.clone() for t in inp]))
    res = profile(model, x)
    handle.remove()
    q, k, v = seen["qkv"]
    d = q.shape[-2]
    expect = int((v != 0).sum()) * d + int((q != 0).sum()) * d      # one accumulate per spike and element
    row = {r["layer"]: r for r in res["layers"]}["blocks.0.attn.product"]
    assert row["type"] == "product" and row["spike_driven"] and expect > 0
    assert row["synops_per_sample"] == expect / 2
    assert row["dense_macs_per_step"] == 2 * q[..., 0, 0].numel() * d * d * q.shape[-1] / 2 / 2
    # the token projections (Conv1d) are spike-driven too
    assert {r["layer"]: r for r in res["layers"]}["blocks.0.attn.qkv.fwd.module.0"]["spike_driven"]


@pytest.mark.parametrize("name,kw", [("spikformer", dict(img_size=16, embed_dim=32, heads=2, depth=1)),
                                     ("spike_driven_transformer", dict(img_size=16, embed_dim=32, heads=2, depth=1,
                                                                       pooling="0011")),
                                     ("qkformer", dict(img_size=16, embed_dim=32, heads=2, depth=4, layout="cifar"))])
def test_nir_export_refuses_attention(name, kw):
    model = tetsnn.create_model(name, 5, T=2, **kw)
    with pytest.raises(ValueError, match=r"^layer '[\w.]+': \w+ multiplies two activations") as e:
        tetsnn.to_nir(model, (3, 16, 16))
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.slow   # a training run (tens of seconds on a busy CPU, most of it compiling kernels)
def test_train_then_export_through_the_cli(tmp_path, capsys):
    from tetsnn.cli import main
    kw = "{img_size: 8, in_channels: 1, patch_size: 4, embed_dim: 32, heads: 2, depth: 1}"
    out = tmp_path / "run"
    assert main(["train", "--model", "spikformer", "--model-kw", kw, "--epochs", "1", "--limit-train", "64",
                 "--limit-test", "32", "--batch-size", "32", "--T", "2", "--out", str(out)]) == 0
    assert (out / "best.pt").is_file()
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(out / "best.pt"), "--format", "nir", "--out",
                 str(tmp_path / "m.nir")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "multiplies two activations" in err and "blocks.0.attn.product" in err
    assert not (tmp_path / "m.nir").exists()
    assert main(["profile", "--checkpoint", str(out / "best.pt"), "--batches", "1", "--device", "cpu"]) == 0
    assert "blocks.0.attn.product" in capsys.readouterr().out


@pytest.mark.parametrize("name,kw", [
    ("spikformer", dict(img_size=16, embed_dim=32, heads=2, depth=1)),
    pytest.param("spike_driven_transformer", dict(img_size=16, embed_dim=32, heads=2, depth=1, pooling="0011"),
                 marks=pytest.mark.slow),
    pytest.param("qkformer", dict(img_size=16, embed_dim=32, heads=2, depth=4, layout="cifar"),
                 marks=pytest.mark.slow),
])
def test_training_step_traces_without_graph_breaks(name, kw):
    """compile: true: the fused neurons, the bit-keeping layers and the spike products all trace."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tetsnn.create_model(name, 5, T=2, **kw).train()
    x, y = torch.rand(4, 3, 16, 16) * 3, torch.randint(0, 5, (4,))
    explained = torch._dynamo.explain(lambda x, y: tetsnn.tet_loss(model(x), y))(x, y)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    # BatchNorm fused into the neuron; the bit-keeping layers and products stay autograd Functions
    assert "tetsnn.bn_lif_forward.default" in ops and "autograd_function_apply" in ops
