"""LIF(decay_input=True) and PLIF through every path against the per-step loop and against
SpikingJelly's LIFNode / ParametricLIFNode, in float64.

The Triton kernels run on the CPU through Triton's interpreter, switched on before they are built.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import tetsnn  # noqa: E402
from tetsnn import LIF, PLIF, PSN, Layer, SlidingPSN  # noqa: E402
from tetsnn.kernels import numba_kernels, ops  # noqa: E402
from tetsnn.kernels.plan import Path, plan  # noqa: E402
from tetsnn.kernels.torch_kernels import forward as torch_forward  # noqa: E402
from tetsnn.neuron.spec import NeuronSpec  # noqa: E402

sjn = pytest.importorskip("spikingjelly.activation_based.neuron")
sjs = pytest.importorskip("spikingjelly.activation_based.surrogate")

TOL = 1e-10
PATHS = ["numba", "torch_ops", "triton"]
# (reset, detach, surrogate, width) cases: every option takes a non-default value somewhere
CASES = [("hard", False, "sigmoid", 4.0), ("soft", True, "atan", 2.0), ("hard", True, "atan", 3.0),
         ("soft", False, "sigmoid", 2.5)]


def far_input(shape, spec, seed=0):
    """float64 input whose pre-reset membranes stay at least 1e-3 from the threshold (SpikingJelly fires
    on '>=', tetsnn on '>'; float64 rounding differs between the two forms far below that)."""
    g = torch.Generator().manual_seed(seed)
    scale = 1 / (1 - spec.decay) if spec.decay_input else 1.0   # the charge scales the input by 1 - decay
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.9 + 0.6) * scale
    for t in range(shape[1]):
        h = torch_forward(x, spec, spec.decay)[1]
        near = (h[:, t] - spec.threshold).abs() < 1e-3
        x[:, t][near] += 0.01 * scale
    return x


def sj_surrogate(name, width):
    return sjs.Sigmoid(alpha=width) if name == "sigmoid" else sjs.ATan(alpha=width)


def sj_node(kind, tau, reset, detach, surrogate, width, decay_input):
    kw = dict(decay_input=decay_input, v_threshold=1.0, v_reset=0.0 if reset == "hard" else None,
              surrogate_function=sj_surrogate(surrogate, width), detach_reset=detach, step_mode="m")
    if kind == "plif":
        return sjn.ParametricLIFNode(init_tau=1.0 / (1.0 - tau), **kw).double()
    return sjn.LIFNode(tau=1.0 / (1.0 - tau), **kw).double()


def tet_node(kind, tau, reset, detach, surrogate, width, decay_input, backend):
    cls = PLIF if kind == "plif" else LIF
    return cls(tau=tau, reset=reset, detach_reset=detach, surrogate=surrogate, alpha=width,
               decay_input=decay_input, backend=backend).double()


def run_path(m, x, grad, path, monkeypatch):
    """Spikes, dL/dx and parameter gradients of module ``m`` on ``x`` along ``path``."""
    with monkeypatch.context() as mp:
        if path == "torch_ops":
            mp.setitem(numba_kernels.STATE, "numba", False)
        xx = x.clone().requires_grad_()
        s = m(xx)
        if path in PATHS:
            assert m.path(xx).value == path
        s.backward(grad)
    return s, xx.grad, [p.grad.clone() for p in m.parameters()]


def run_sj(node, x, grad):
    xx = x.clone().requires_grad_()
    s = node(xx.transpose(0, 1).contiguous()).transpose(0, 1)
    s.backward(grad)
    return s, xx.grad, [p.grad.clone() for p in node.parameters()]


@pytest.mark.parametrize("kind", ["lif", "plif"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_against_spikingjelly_every_path(kind, case, monkeypatch):
    """Each path equals SpikingJelly's module with the same parameters: spikes exactly, dL/dx and dL/dw to
    1e-10, for T = 1..8 (decay_input on for LIF; on and off for PLIF)."""
    reset, detach, surrogate, width = CASES[case]
    tau = (0.5, 0.75, 0.3, 0.6)[case]
    for T in range(1, 9):
        decay_input = kind == "lif" or T % 2 == 0
        spec = NeuronSpec(decay=tau, decay_input=decay_input, reset=reset)
        x = far_input((2, T, 3, 5), spec, seed=T)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(T + 100), dtype=torch.float64)
        ref = run_sj(sj_node(kind, tau, reset, detach, surrogate, width, decay_input), x, grad)
        assert 0 < ref[0].mean() < 1
        for path in ["loop"] + (PATHS if T in (1, 3, 8) else ["numba"]):
            backend = {"loop": "loop", "triton": "triton"}.get(path, "fused")
            out = run_path(tet_node(kind, tau, reset, detach, surrogate, width, decay_input, backend), x, grad, path,
                           monkeypatch)
            assert torch.equal(out[0], ref[0]), (path, T)
            torch.testing.assert_close(out[1], ref[1], rtol=TOL, atol=TOL)
            assert len(out[2]) == len(ref[2]) == (kind == "plif")
            for a, b in zip(out[2], ref[2]):
                assert b.abs() > 0 or (T == 1 and not decay_input)
                torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_input_paths_equal_the_loop(dtype, monkeypatch):
    """LIF(decay_input=True) on every path: the loop's spikes bit for bit, its gradient to rounding."""
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for reset, detach in (("hard", False), ("soft", True)):
        spec = NeuronSpec(decay=0.7, decay_input=True, reset=reset)
        x = far_input((3, 6, 4, 5), spec).to(dtype)
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        ref = run_path(LIF(0.7, reset=reset, detach_reset=detach, decay_input=True, backend="loop"), x, grad, "loop",
                       monkeypatch)
        for path in PATHS:
            backend = "triton" if path == "triton" else "fused"
            m = LIF(0.7, reset=reset, detach_reset=detach, decay_input=True, backend=backend)
            s, gx, _ = run_path(m, x, grad, path, monkeypatch)
            assert torch.equal(s, ref[0]) and 0 < s.mean() < 1, path
            torch.testing.assert_close(gx, ref[1], rtol=tol, atol=tol)


def small_net(neuron, fuse_bn, **kw):
    from tetsnn.models.resnet import BasicBlock
    kw = dict(neuron=neuron, fuse_bn=fuse_bn, **kw)
    return nn.Sequential(Layer(2, 4, **kw), BasicBlock(4, 4, **kw), BasicBlock(4, 6, stride=2, **kw))


def net_step(neuron, fuse_bn, backend, kw, dtype):
    """Output, input gradient, parameter gradients and buffers of :func:`small_net` (BatchNorm affines drawn
    at random) after one backward on a fixed input."""
    torch.manual_seed(0)
    net = small_net(neuron, fuse_bn, backend=backend, **kw).to(dtype).train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.8, 1.6)
                m.bias.uniform_(0.1, 0.6)
    x = torch.rand(2, 3, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    x = x.to(dtype).requires_grad_()
    out = net(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype))
    return (out, x.grad, {k: p.grad for k, p in net.named_parameters()},
            {k: b.clone() for k, b in net.named_buffers()})


@pytest.mark.parametrize("neuron,kw", [("plif", {}), ("plif", dict(decay_input=True, tau=0.7, reset="soft")),
                                       ("lif", dict(decay_input=True, detach_reset=True, tau=0.5))])
@pytest.mark.parametrize("backend", ["fused", "triton"])
def test_batchnorm_fusion_on_and_off(neuron, kw, backend):
    """conv-BN-neuron and ResNet blocks with the BatchNorm fused into the neuron equal the same modules run
    one by one: spikes, every parameter's gradient (the decays' included) and the running statistics."""
    (o1, g1, p1, b1), (o2, g2, p2, b2) = [net_step(neuron, fuse, backend, kw, torch.float64) for fuse in (True, False)]
    assert torch.equal(o1, o2) and 0 < o1.mean() < 1
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)
    assert p1.keys() == p2.keys()
    if neuron == "plif":
        assert sum(k.endswith(".w") for k in p1) == 5
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-10, atol=1e-10)
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k], rtol=0, atol=0)


# (neuron, options, dtype): PLIF with decay_input (its decay's gradient reads the normalised input) and ILIF
FUSED_BN_CASES = [("plif", dict(decay_input=True, tau=0.7), torch.float64),
                  ("plif", dict(decay_input=True, tau=0.6, reset="soft", detach_reset=True, surrogate="atan"),
                   torch.float32),
                  ("ilif", dict(max_level=4), torch.float64),
                  ("ilif", dict(max_level=2, tau=0.5, detach_reset=True), torch.float32)]


@pytest.mark.parametrize("case,backend", [(c, "triton") for c in range(len(FUSED_BN_CASES))] + [(2, "fused")])
def test_batchnorm_fused_equals_the_loop(case, backend, monkeypatch):
    """BatchNorm fused into PLIF(decay_input=True) and ILIF, on the Triton (interpreted) path and, for ILIF,
    the numba path (test_batchnorm_fusion_on_and_off covers numba's PLIF against the unfused kernels),
    against the same modules unfused on the per-step loop: spikes exactly, the gradients of the input and
    of every parameter (PLIF's decays included) to rounding; every conv-BN-neuron of the net runs fused
    (forward and backward), the residual block's ILIF counts included."""
    from tetsnn.kernels import triton_bn_lif
    neuron, kw, dtype = FUSED_BN_CASES[case]
    calls = []
    if backend == "triton":
        for name in ("forward", "backward"):
            fn = getattr(triton_bn_lif, name)
            monkeypatch.setattr(triton_bn_lif, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    else:
        fn = ops._numba_backward
        monkeypatch.setattr(ops, "_numba_backward", lambda *a, **k: calls.append("backward") or fn(*a, **k))
    results = [net_step(neuron, fuse, b, kw, dtype) for fuse, b in ((True, backend), (False, "loop"))]
    assert sorted(calls) == (["backward"] * 5 + (["forward"] * 5 if backend == "triton" else []))
    (o1, g1, p1, _), (o2, g2, p2, _) = results
    assert torch.equal(o1, o2) and 0 < o1.mean()
    if neuron == "ilif":
        assert o1.max() > 1   # counts above one reach the residual add
    assert p1.keys() == p2.keys() and sum(k.endswith(".w") for k in p1) == (5 if neuron == "plif" else 0)
    pairs = [(g1, g2)] + [(p1[k], p2[k]) for k in p1]
    scale = max(b.abs().max().item() for a, b in pairs)   # float32: sums over the batch round to this scale
    for a, b in pairs:
        assert b.abs().max() > 0
        f64 = dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0 if f64 else 1e-5, atol=1e-10 if f64 else 1e-6 * scale)


def test_planner_table():
    x = torch.zeros(2, 3, 4)
    bn = nn.BatchNorm2d(3).train()
    assert plan(NeuronSpec(), x) is Path.NUMBA
    assert plan(NeuronSpec(), x, backend="loop") is Path.LOOP
    assert plan(NeuronSpec(), x.half()) is Path.NUMBA        # integrated in float32
    assert plan(NeuronSpec(surrogate=lambda v: v), x) is Path.CUSTOM
    assert plan(NeuronSpec(), x, bn) is Path.BN_NUMBA
    assert plan(NeuronSpec(), x, bn, backend="triton") is Path.BN_TRITON
    assert plan(NeuronSpec(learnable_decay=True, decay_input=True), x, bn, backend="triton") is Path.BN_TRITON
    ilif = NeuronSpec(dynamics="ilif", reset="soft", surrogate="rectangle", max_level=4)
    assert plan(ilif, x, bn) is Path.BN_NUMBA and plan(ilif, x, bn, backend="triton") is Path.BN_TRITON
    assert plan(NeuronSpec(), x, bn.eval()) is Path.NUMBA
    with torch.no_grad():
        assert plan(NeuronSpec(), x, bn.train()) is Path.NUMBA
    assert plan(NeuronSpec(), x, nn.SyncBatchNorm(3)) is Path.NUMBA
    assert LIF().path(x) is Path.NUMBA and LIF(backend="triton").path(x) is Path.TRITON
    # parallel neurons: no recurrence, so no Triton path and no fused BatchNorm
    psn = NeuronSpec(dynamics="psn", surrogate="sigmoid", width=4.0)
    assert plan(psn, x) is Path.PSN_NUMBA and plan(psn, x, bn, backend="triton") is Path.PSN_NUMBA
    assert plan(psn, x, backend="loop") is Path.LOOP and plan(psn, x.half()) is Path.PSN_TORCH
    assert plan(NeuronSpec(dynamics="psn", surrogate=lambda v: v), x) is Path.PSN_TORCH
    assert PSN(3).path(x) is Path.PSN_NUMBA and SlidingPSN(2, backend="loop").path(x) is Path.LOOP


def test_torch_ops_path_without_numba(monkeypatch):
    monkeypatch.setitem(numba_kernels.STATE, "numba", False)
    assert plan(NeuronSpec(), torch.zeros(2, 3)) is Path.TORCH_OPS
    assert plan(NeuronSpec(), torch.zeros(2, 3), nn.BatchNorm1d(3).train()) is Path.BN_TORCH
    assert PSN(2).path(torch.zeros(2, 2, 3)) is Path.PSN_TORCH


def test_plif_parameter_and_state_dict():
    m = PLIF(tau=0.5)
    assert list(m.state_dict()) == ["w"] and m.w.item() == 0.0 and m.tau == 0.5
    assert abs(PLIF(tau=0.75).tau - 0.75) < 1e-7
    m.tau = 0.25
    assert abs(m.tau - 0.25) < 1e-7 and [n for n, _ in m.named_parameters()] == ["w"]
    with pytest.raises(ValueError, match="tau in"):
        PLIF(tau=1.0)
    m2 = PLIF(tau=0.5)
    m2.load_state_dict(m.state_dict())
    assert m2.tau == m.tau


@pytest.mark.parametrize("name", ["digits_snn", "vggsnn", "resnet19", "sew_resnet18", "resnet18"])
def test_every_model_takes_plif(name):
    kw = dict(size=8) if name in ("digits_snn",) else {}
    model = tetsnn.create_model(name, neuron="plif", tau=0.6, **kw)
    plifs = [m for m in model.modules() if isinstance(m, PLIF)]
    assert plifs and all(abs(m.tau - 0.6) < 1e-6 for m in plifs)
    keys = [k for k in model.state_dict() if k.endswith(".w")]
    assert len(keys) == len(plifs)
    again = tetsnn.create_model(name, neuron="plif", tau=0.6, **kw)
    again.load_state_dict(model.state_dict())


def test_plif_selectable_from_config():
    from tetsnn.engine.checkpoint import build_model
    from tetsnn.engine.config import parse_train_args, resolve
    _, flags = parse_train_args(["--model", "digits_snn", "--model-kw", "{neuron: plif, tau: 0.7}"])
    model = build_model(resolve({k: v for k, v in flags.items() if v is not None}))
    assert any(isinstance(m, PLIF) and abs(m.tau - 0.7) < 1e-6 for m in model.modules())


def test_compiled_op_with_a_learnable_decay():
    """The custom op with a decay operand passes torch.library's checks (schema, autograd, fake)."""
    x = far_input((2, 3, 5), NeuronSpec(decay=0.6)).requires_grad_()
    d = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    args = ops.flatten_neuron(NeuronSpec(decay=0.6, learnable_decay=True), "fused", d)
    torch.library.opcheck(torch.ops.tetsnn.lif_forward.default, (x, *args),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_nir_export_of_plif_uses_the_trained_decay():
    nir = pytest.importorskip("nir")
    model = tetsnn.create_model("digits_snn", neuron="plif", tau=0.5, T=2, size=8)
    plifs = [m for m in model.modules() if isinstance(m, PLIF)]
    with torch.no_grad():
        for k, m in enumerate(plifs):
            m.w.fill_(0.3 * (k + 1))   # "trained": decay = 1 - sigmoid(w)
    graph = tetsnn.to_nir(model, (1, 8, 8), dt=1e-4)
    lifs = [n for n in graph.nodes.values() if isinstance(n, nir.LIF)]
    assert len(lifs) == len(plifs)
    expected = sorted(1e-4 / (1 - m.tau) for m in plifs)
    got = sorted(float(n.tau.flat[0]) for n in lifs)
    assert got == pytest.approx(expected, rel=1e-6) and len(set(got)) == len(plifs)
    with pytest.raises(ValueError, match="decay_input"):
        tetsnn.to_nir(tetsnn.create_model("digits_snn", neuron="lif", decay_input=True, T=2, size=8), (1, 8, 8))
