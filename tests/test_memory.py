"""``memory="min"``: spiking blocks keep only their input (as bits when it is spikes) and their BatchNorm
batch statistics for backward, recompute the rest, and give the default mode's outputs, gradients and
running statistics bit for bit.

The Triton kernels run on the CPU through Triton's interpreter, switched on before they are built.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import tetsnn  # noqa: E402
from tetsnn import Layer, create_model, list_models  # noqa: E402
from tetsnn import memory  # noqa: E402
from tetsnn.engine.config import ConfigError, HELP, resolve  # noqa: E402
from tetsnn.engine.train import resolve_run_config  # noqa: E402
from tetsnn.models.resnet import BasicBlock  # noqa: E402
from tetsnn.models.sew_resnet import SEWBlock  # noqa: E402

slow = pytest.mark.slow

# input shapes (after the batch dim) and model keywords small enough for a unit test
SMALL = {
    "digits_snn": ((1, 8, 8), {}),
    "vggsnn": ((2, 2, 16, 16), dict(size=16)),
    "resnet19": ((3, 8, 8), {}),
    "sew_resnet19": ((3, 16, 16), {}),
    "resnet18": ((3, 16, 16), dict(widths=(8, 8, 16, 16))),
    "resnet34": ((3, 16, 16), dict(widths=(8, 8, 16, 16))),
    "sew_resnet18": ((3, 16, 16), dict(widths=(8, 8, 16, 16), connect="AND")),
    "sew_resnet34": ((3, 16, 16), dict(widths=(8, 8, 16, 16))),
    "spikformer": ((3, 16, 16), dict(embed_dim=32, heads=2, depth=2, img_size=16)),
    "spike_driven_transformer": ((3, 16, 16), dict(preset="cifar-2-512", embed_dim=32, heads=2, depth=2, img_size=16)),
    "qkformer": ((3, 16, 16), dict(preset="cifar-4-384", embed_dim=32, heads=2, depth=3, img_size=16)),
}


def step(model, x, autocast=False):
    """Outputs, input gradient, parameter gradients and buffers after one forward + backward."""
    x = x.clone().requires_grad_(not autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
    (out.double() * w).sum().backward()
    return (out.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()},
            {k: b.clone() for k, b in model.named_buffers()})


def assert_min_equals_default(build, x, autocast=False, dtype=torch.float64):
    torch.manual_seed(0)
    default = build("default").to(dtype).train()
    torch.manual_seed(0)
    low = build("min").to(dtype).train()
    low.load_state_dict(default.state_dict())
    x = x.to(dtype)
    a, b = step(default, x, autocast), step(low, x, autocast)
    assert torch.equal(a[0], b[0]) and 0 < a[0].abs().sum()
    assert (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert (a[2][k] is None) == (b[2][k] is None), k
        assert a[2][k] is None or torch.equal(a[2][k], b[2][k]), k
    assert any(g is not None and g.abs().sum() > 0 for g in a[2].values())
    for k in a[3]:
        assert torch.equal(a[3][k], b[3][k]), k   # running statistics updated once, identically


def batch(shape, n=2, seed=3):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 3


def model_case(name, dtype, neuron_kw, autocast=False, side=None):
    shape, kw = SMALL[name]
    shape = shape if side is None else (*shape[:-2], side, side)
    build = lambda m: create_model(name, T=2, num_classes=4, memory=m, **kw, **neuron_kw)  # noqa: E731
    assert_min_equals_default(build, batch(shape), autocast, dtype)


FAST = {("digits_snn", "float64", "lif-hard"), ("vggsnn", "float32", "if-soft"), ("sew_resnet18", "float32", "lif-hard"),
        ("spikformer", "float64", "lif-hard")}
NEURONS = {"lif-hard": dict(), "if-soft": dict(neuron="if", reset="soft")}


def test_every_registry_model_is_covered():
    assert set(list_models()) - {"nir"} <= set(SMALL)


@pytest.mark.parametrize("name,dtype,neuron", [
    pytest.param(n, d, k, marks=() if (n, d, k) in FAST else slow)
    for n in SMALL for d in ("float64", "float32") for k in NEURONS])
def test_registry_models_min_equals_default(name, dtype, neuron):
    model_case(name, getattr(torch, dtype), NEURONS[neuron])


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "vggsnn" else slow) for n in SMALL])
def test_bf16_autocast(name):
    # the ImageNet-style models at a side where no feature map shrinks to 1 x 1: torch's CPU bfloat16
    # convolution backward has returned garbage in the zero border of a 3x3 weight gradient where the
    # input is 1 x 1 (the default mode as well)
    model_case(name, torch.float32, {}, autocast=True, side=BF16_SIDE.get(name))


# the side that keeps the last stage at 2 x 2: 4 stages after a stride-2 stem and a max pool, or 3
BF16_SIDE = {"resnet18": 64, "resnet34": 64, "sew_resnet18": 64, "sew_resnet34": 64, "sew_resnet19": 32}


@pytest.mark.parametrize("neuron_kw", [
    dict(neuron="ilif", max_level=3), dict(norm="tebn"), pytest.param(dict(neuron="plif"), marks=slow),
    pytest.param(dict(neuron="psn"), marks=slow), pytest.param(dict(norm="tdbn", neuron="if"), marks=slow),
    pytest.param(dict(surrogate=lambda v: (v.abs() < 0.5).to(v.dtype)), marks=slow),
    pytest.param(dict(backend="loop"), marks=slow), pytest.param(dict(neuron="sliding_psn", order=2), marks=slow),
    pytest.param(dict(fuse_bn=False), marks=slow),
], ids=lambda kw: "-".join(f"{k}={v if not callable(v) else 'custom'}" for k, v in kw.items()))
def test_other_neurons_and_norms(neuron_kw):
    model_case("digits_snn", torch.float64, neuron_kw)


def test_blocks_with_residual_and_downsample_and_triton():
    """ResNet and SEW blocks (identity and downsample shortcuts) on the Triton kernels, interpreted."""
    pytest.importorskip("triton")
    for block in (BasicBlock, SEWBlock):
        build = lambda m, block=block: nn.Sequential(  # noqa: E731
            Layer(2, 4, backend="triton", memory=m), block(4, 4, backend="triton", memory=m),
            block(4, 6, stride=2, backend="triton", memory=m, reset="soft"))
        assert_min_equals_default(build, batch((2, 2, 6, 6)))


def kept_bytes(model, x) -> int:
    """Bytes of the distinct non-parameter storages kept for backward after ``model(x)``: those saved
    outside any block, and each block's input and kept tensors."""
    storages = {}
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def add(t):
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(add, lambda t: t):
        out = model(x)
    for t in memory.kept_tensors():
        add(t)
    del out
    return sum(storages.values())


def test_min_keeps_a_fraction_of_the_default_bytes():
    x = batch((2, 2, 16, 16), n=4)
    kept = {}
    for m in ("default", "min"):
        torch.manual_seed(0)
        kept[m] = kept_bytes(create_model("vggsnn", T=2, size=16, memory=m).train(), x)
    assert kept["min"] < 0.1 * kept["default"], kept


def test_eval_and_no_grad_run_no_recompute_machinery(monkeypatch):
    torch.manual_seed(0)
    model = create_model("digits_snn", T=2, memory="min")
    x = batch((1, 8, 8))
    monkeypatch.setattr(memory, "_Block", None)   # any use of it would fail
    with torch.no_grad():
        model.train()(x)
    model.eval()(x)
    with pytest.raises(TypeError):
        model.train()(x)   # with gradients the block machinery runs


def test_second_backward_recomputes_again():
    torch.manual_seed(0)
    model = create_model("digits_snn", T=2, memory="min").double()
    out = model(batch((1, 8, 8)).double()).square().sum()
    grads = []
    for _ in range(2):
        model.zero_grad()
        out.backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_bad_memory_values_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown memory 'low'"):
        create_model("digits_snn", memory="low")
    with pytest.raises(ConfigError, match="memory"):
        resolve({"memory": "low"})
    with pytest.raises(ConfigError, match="memory is a key of its own"):
        resolve({"model_kw": {"memory": "min"}})
    assert "memory" in HELP
    assert resolve_run_config(["--memory", "min"])["memory"] == "min"
    assert resolve_run_config([])["memory"] == "default"


def test_transformer_blocks_keep_their_inputs_only():
    shape, kw = SMALL["spikformer"]
    x = batch(shape, n=4)
    kept = {}
    for m in ("default", "min"):
        torch.manual_seed(0)
        kept[m] = kept_bytes(create_model("spikformer", T=2, num_classes=4, memory=m, **kw).train(), x)
    assert kept["min"] < 0.25 * kept["default"], kept
