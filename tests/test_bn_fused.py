"""BatchNorm fused into the neuron against the same modules run one by one (``fuse_bn=False``).

The Triton kernels run on the CPU through Triton's interpreter, switched on before they are built.
"""
import copy
import os
import subprocess
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import tetsnn  # noqa: E402
from tetsnn import Layer, create_model  # noqa: E402
from tetsnn import layers  # noqa: E402
from tetsnn import compact  # noqa: E402
from tetsnn.kernels import ops as bn_fused  # noqa: E402
from tetsnn.models.resnet import BasicBlock  # noqa: E402

# (neuron, its options): every option takes a non-default value in some case; T runs over 1..8
NEURON_CASES = [
    ("lif", dict()),
    ("lif", dict(tau=0.8, threshold=0.7)),
    ("lif", dict(reset="soft")),
    ("lif", dict(detach_reset=True)),
    ("lif", dict(reset="soft", detach_reset=True, tau=0.3)),
    ("lif", dict(surrogate="sigmoid")),
    ("lif", dict(surrogate="atan", alpha=3.0, threshold=0.5)),
    ("if", dict(gamma=0.5, threshold=1.3)),
]


def small_net(neuron, fuse_bn, **kw):
    """conv-BN-LIF, a block with the identity shortcut (bits) and one with a downsample branch."""
    kw = dict(neuron=neuron, fuse_bn=fuse_bn, **kw)
    return nn.Sequential(Layer(2, 4, **kw), BasicBlock(4, 4, **kw), BasicBlock(4, 6, stride=2, **kw))


def run(model, x, seed=1):
    """Output, input gradient, parameter gradients and buffers after one training step's backward."""
    model.train()
    x = x.clone().requires_grad_()
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(g)
    return out, x.grad, {k: p.grad for k, p in model.named_parameters()}, {k: b.clone() for k, b in
                                                                          model.named_buffers()}


def twins(build, dtype=torch.float64):
    torch.manual_seed(0)
    fused = build(True).to(dtype)
    plain = build(False).to(dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def assert_same_step(fused, plain, x, dtype, spikes=True):
    out1, gx1, gp1, buf1 = run(fused, x)
    out2, gx2, gp2, buf2 = run(plain, x)
    assert torch.equal(out1, out2)
    assert not spikes or 0 < out1.float().mean() < 1
    for k in buf1:  # running statistics and num_batches_tracked
        assert torch.equal(buf1[k], buf2[k]), k
    for a, b in [(gx1, gx2)] + [(gp1[k], gp2[k]) for k in gp1]:
        assert a is not None and b is not None
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    assert (gx1 if spikes else torch.cat([g.flatten() for g in gp1.values()])).abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(NEURON_CASES)))
def test_matches_unfused_every_neuron_option(case, dtype):
    neuron, kw = NEURON_CASES[case]
    T = case % 8 + 1 if dtype == torch.float64 else 8 - case % 8  # T = 1..8 in both dtypes
    fused, plain = twins(lambda f: small_net(neuron, f, **kw), dtype)
    x = torch.rand(2, T, 2, 6, 6, generator=torch.Generator().manual_seed(case), dtype=dtype) * 3
    assert_same_step(fused, plain, x, dtype)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_statistics_over_steps(momentum):
    """Several steps: running mean/var and num_batches_tracked as nn.BatchNorm2d keeps them, cumulative
    average (momentum=None) included; eval afterwards gives the same outputs."""
    def build(f):
        net = small_net("lif", f)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
        return net
    fused, plain = twins(build)
    for step in range(3):
        x = torch.rand(2, 3, 2, 6, 6, generator=torch.Generator().manual_seed(step), dtype=torch.float64) * 3
        assert_same_step(fused, plain, x, torch.float64)
    bn = fused[0].fwd.module[1]
    assert int(bn.num_batches_tracked) == 3 and not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    fused.eval(), plain.eval()
    x = torch.rand(2, 3, 2, 6, 6, dtype=torch.float64) * 3
    assert torch.equal(fused(x), plain(x))


def test_float32_statistics_alone_equal_torch_batch_norm():
    """The CPU float32 forward takes the batch statistics alone (BatchNorm's output is never written: the
    kernel rebuilds it as it reads the conv output): mean, invstd and the updated running statistics are
    torch's bit for bit, contiguous or channels-last, with or without running statistics."""
    g = torch.Generator().manual_seed(5)
    for i in range(60):
        c = int(torch.randint(1, 40, (1,), generator=g))
        shape = [int(torch.randint(2, 12, (1,), generator=g)), c] + [int(torch.randint(1, 9, (1,), generator=g))
                                                                     for _ in range(i % 3)]
        y = torch.randn(shape, generator=g) * float(torch.rand(1, generator=g) * 50) + float(torch.randn(1, generator=g) * 20)
        if i % 3 == 2 and i % 2:
            y = y.contiguous(memory_format=torch.channels_last)
        track = i % 4 != 0
        bn = bn_fused.BNOperand(None, None, torch.randn(c, generator=g) if track else None,
                                torch.rand(c, generator=g) if track else None, [0.1, 0.5, 1.0][i % 3], [1e-5, 1e-3][i % 2])
        got, want = bn_fused._batch_stats_cpu(y, bn), bn_fused._normalise(y, bn)[1:]
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (shape, i)
    assert bn_fused._stats_exact(torch.float32) and not bn_fused._stats_exact(torch.float64)


def test_float32_statistics_kernel_equals_torch_batch_norm():
    """Where numba runs, the float32 statistics of contiguous conv-like input come from the numba kernel
    (sums vectorised), and they equal torch's bit for bit, also far from zero mean (where the variance's
    float32 terms cancel most) and for a cumulative-average momentum."""
    from tetsnn.kernels import numba_kernels as nk
    assert bn_fused._stats_mode(torch.float32) == ("numba" if nk.available() else "torch")
    g = torch.Generator().manual_seed(11)
    for i in range(80):
        shape = [int(torch.randint(1, 17, (1,), generator=g)), int(torch.randint(1, 24, (1,), generator=g)),
                 int(torch.randint(2, 700, (1,), generator=g))]
        scale = 10 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
        offset = 10 ** float(torch.empty(1).uniform_(-3, 4, generator=g))
        y = torch.randn(shape, generator=g) * scale + offset
        c = shape[1]
        bn = bn_fused.BNOperand(None, None, torch.randn(c, generator=g), torch.rand(c, generator=g),
                                [0.1, 1 / (i + 1)][i % 2], 1e-5)
        got, want = bn_fused._batch_stats_cpu(y, bn), bn_fused._normalise(y, bn)[1:]
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (shape, scale, offset)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_float32_forward_never_normalises(momentum, monkeypatch):
    """Plain, residual and downsample blocks in float32 over several steps: the fused forward never runs
    torch's batch_norm, and outputs, gradients and running statistics are those of the unfused modules."""
    def build(f):
        net = small_net("lif", f, reset="soft")
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
        net[2].downsample.module[1] = nn.BatchNorm2d(6, affine=False)   # no affine
        return net
    fused, plain = twins(build, torch.float32)
    for step in range(3):
        x = torch.rand(2, 3, 2, 6, 6, generator=torch.Generator().manual_seed(step)) * 3
        with monkeypatch.context() as m:
            m.setattr(bn_fused, "_normalise", None)   # any call fails
            out1, gx1, gp1, buf1 = run(fused, x)
        out2, gx2, gp2, buf2 = run(plain, x)
        assert torch.equal(out1, out2) and 0 < out1.mean() < 1
        assert all(torch.equal(buf1[k], buf2[k]) for k in buf1)
        for a, b in [(gx1, gx2)] + [(gp1[k], gp2[k]) for k in gp1]:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_frozen_parameters_and_no_affine():
    """requires_grad=False parameters get no gradient; a BatchNorm without weight and bias fuses too."""
    def build(f):
        net = small_net("lif", f)
        net[0].fwd.module[1] = nn.BatchNorm2d(4, affine=False)
        for p in net[1].parameters():
            p.requires_grad_(False)
        return net
    fused, plain = twins(build)
    x = torch.rand(2, 3, 2, 6, 6, dtype=torch.float64) * 3
    out1, gx1, gp1, _ = run(fused, x)
    out2, gx2, gp2, _ = run(plain, x)
    assert torch.equal(out1, out2)
    torch.testing.assert_close(gx1, gx2, rtol=0, atol=1e-10)
    for k in gp1:
        assert (gp1[k] is None) == (gp2[k] is None) and (gp1[k] is None) == k.startswith("1.")
        if gp1[k] is not None:
            torch.testing.assert_close(gp1[k], gp2[k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name,kw,shape", [
    ("digits_snn", {}, (2, 1, 8, 8)),
    ("vggsnn", dict(T=2, size=16), (1, 2, 2, 16, 16)),
    ("resnet19", dict(T=2), (2, 3, 8, 8)),
    ("resnet18", dict(T=2), (1, 3, 32, 32)),
    ("sew_resnet19", dict(T=2), (2, 3, 16, 16)),
    ("sew_resnet18", dict(T=2, connect="AND"), (1, 3, 32, 32)),
    ("sew_resnet18", dict(T=2, connect="IAND"), (1, 3, 32, 32)),
])
def test_registry_models_match_unfused(name, kw, shape):
    fused, plain = twins(lambda f: create_model(name, fuse_bn=f, **kw))
    assert list(fused.state_dict()) == list(plain.state_dict())
    x = torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    assert_same_step(fused, plain, x, torch.float64, spikes=False)


def saved_activation_bytes(model, x):
    """Bytes of the distinct storages autograd keeps, parameters and buffers excluded."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in skip:  # not the empty statistics of an absent second BatchNorm
            storages[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return storages


def test_keeps_conv_output_and_bits_only():
    """Layer: the conv's input and output and two per-channel vectors; a block with the identity
    shortcut adds the conv outputs and the block input as bits, nothing of the neuron's input size."""
    layer = Layer(2, 4)
    x = torch.rand(2, 3, 2, 6, 6)
    kept = sorted(saved_activation_bytes(layer, x).values())
    y = 2 * 3 * 4 * 36 * 4
    assert kept == sorted([x.numel() * 4, y, 16, 16])
    plain = copy.deepcopy(layer)
    plain.fuse_bn = False
    assert sorted(saved_activation_bytes(plain, x).values()) == sorted(kept + [y])  # and the neuron input
    block = BasicBlock(4, 4)
    s = (torch.rand(2, 3, 4, 6, 6) > 0.5).float()
    kept = sorted(saved_activation_bytes(block, s).values())
    bits = s.numel() // 8
    assert kept == sorted([bits, y, y, bits] + [16] * 4)  # conv1 in, conv2 in, their outputs; stats


def test_eval_no_grad_hooks_and_loop_run_unfused():
    layer = Layer(2, 4)
    seen = []
    handle = layer.fwd.module[1].register_forward_hook(lambda *a: seen.append(1))
    x = torch.rand(2, 3, 2, 6, 6)
    layer(x)   # a hook on the BatchNorm: it runs as a module
    handle.remove()
    handle = layer.act.register_forward_hook(lambda *a: seen.append(2))
    layer(x)   # likewise on the neuron
    handle.remove()
    assert seen == [1, 2]
    calls = []
    orig = bn_fused._bn_forward   # the body of the op and of its eager path
    try:
        bn_fused._bn_forward = lambda *a: calls.append(1) or orig(*a)
        layer(x)
        assert calls == [1]
        with torch.no_grad():
            layer(x)
        layer.eval()
        layer(x)
        layer.train()
        layer.act.backend = "loop"
        layer(x)
        assert calls == [1]
    finally:
        bn_fused._bn_forward = orig


def test_sync_batchnorm_runs_unfused_and_warns_once(monkeypatch):
    monkeypatch.setattr(layers, "_warned_sync_bn", False)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(small_net("lif", True))
    plain = small_net("lif", False)
    plain.load_state_dict(model.state_dict())
    x = torch.rand(2, 2, 2, 6, 6)
    with pytest.warns(RuntimeWarning, match="SyncBatchNorm"):
        out = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    assert torch.equal(out, plain(x))


def test_bf16_autocast_and_channels_last():
    for memory_format in (torch.contiguous_format, torch.channels_last):
        fused, plain = twins(lambda f: create_model("digits_snn", fuse_bn=f), torch.float32)
        fused.to(memory_format=memory_format), plain.to(memory_format=memory_format)
        x = torch.rand(4, 1, 8, 8) * 3
        y = torch.tensor([0, 1, 2, 3])
        grads = []
        for m in (fused, plain):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
            assert out.dtype == torch.bfloat16
            tetsnn.tet_loss(out, y).backward()
            grads.append(m.features[0].fwd.module[0].weight.grad)
        assert grads[0].abs().sum() > 0
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-2 * grads[1].abs().max().item())
    for memory_format in (torch.channels_last,):  # float32 channels_last to the tolerance
        fused, plain = twins(lambda f: small_net("lif", f), torch.float32)
        fused.to(memory_format=memory_format), plain.to(memory_format=memory_format)
        x = torch.rand(2, 3, 2, 6, 6) * 3
        assert_same_step(fused, plain, x, torch.float32)


def test_triton_kernels():
    """The Triton kernels (interpreted on the CPU) against the unfused modules on the per-step loop, in
    float64: plain, residual bits and downsample branch, each layer with other neuron options."""
    def build(fuse, backend):
        opts = [dict(), dict(reset="soft", surrogate="atan", detach_reset=True), dict(surrogate="sigmoid", tau=0.7)]
        return nn.Sequential(Layer(2, 4, fuse_bn=fuse, backend=backend, **opts[0]),
                             BasicBlock(4, 4, fuse_bn=fuse, backend=backend, **opts[1]),
                             BasicBlock(4, 6, stride=2, fuse_bn=fuse, backend=backend, **opts[2])).double()
    torch.manual_seed(0)
    fused = build(True, "triton")
    plain = build(False, "loop")  # the per-step reference
    plain.load_state_dict(fused.state_dict())
    x = torch.rand(2, 2, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    out1, gx1, gp1, buf1 = run(fused, x)
    out2, gx2, gp2, buf2 = run(plain, x)
    assert torch.equal(out1, out2) and 0 < out1.mean() < 1
    for k in buf1:
        torch.testing.assert_close(buf1[k], buf2[k], rtol=1e-12, atol=1e-12)
    for a, b in [(gx1, gx2)] + [(gp1[k], gp2[k]) for k in gp1]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert gx1.abs().sum() > 0


def test_triton_aot_variants_cover_every_launch():
    from tetsnn.kernels import triton_bn_lif as k
    fwd = {(c["HARD"], c["RES"], c["ILIF"], sig["y_ptr"]) for fn, sig, c in k.AOT_VARIANTS if fn is k._bn_lif_fwd}
    bwd = {(c["HARD"], c["DETACH"], c["KIND"], c["RES"], c["ILIF"], sig["y_ptr"]) for fn, sig, c in k.AOT_VARIANTS
           if fn is k._bn_lif_bwd}
    # LIF: hard or soft reset; ILIF: soft only, no surrogate kind; 3 residual forms, 4 activation dtypes
    assert len(fwd) == (2 + 1) * 3 * 4 and len(bwd) == (2 * 2 * 3 + 2) * 3 * 4
    assert {sig["r_ptr"] for fn, sig, c in k.AOT_VARIANTS if fn is k._bn_lif_bwd and c["RES"] == 1 and c["ILIF"]} \
        == {"*fp32", "*fp64", "*bf16", "*fp16"}   # ILIF's residual counts stay floats
    for fn, sig, c in k.AOT_VARIANTS:  # every argument typed, constexprs valued
        assert list(sig) == fn.arg_names
        assert {a for a, t in sig.items() if t == "constexpr"} == set(c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_rebuild_reproduces_torch_batch_norm(dtype):
    """The CPU backward rebuilds z = BN(y) inside its kernel in the way (fused multiply-add or not) that
    reproduced torch's batch_norm on a probe; it does so bit for bit on other shapes, layouts and scales."""
    fused_madd = bn_fused._rebuild_mode(dtype)
    if fused_madd is None:
        pytest.skip("neither rounding reproduces this machine's batch_norm kernel: the backward re-runs it")
    g = torch.Generator().manual_seed(5)
    for shape in ((64, 16, 8, 8), (33, 7, 5, 3), (128, 10), (9, 4, 3, 5, 2)):
        for scale in (1e-3, 1.0, 1e3):
            y = torch.randn(shape, generator=g, dtype=dtype) * scale + scale
            for affine in (True, False):
                w = torch.randn(shape[1], generator=g, dtype=dtype) if affine else None
                b = torch.randn(shape[1], generator=g, dtype=dtype) if affine else None
                for layout in (torch.contiguous_format, torch.channels_last):
                    if layout is torch.channels_last and y.dim() != 4:
                        continue
                    yl = y.contiguous(memory_format=layout)
                    z, mean, invstd = torch.ops.aten.native_batch_norm(yl, w, b, None, None, True, 0.0, 1e-5)
                    out = bn_fused._rebuilt(y, w, b, mean, invstd, fused_madd)
                    assert torch.equal(out, z), (shape, scale, affine, layout)


def test_rebuild_follows_the_kernel_torch_dispatches_to():
    """With torch's kernels forced to the default (unvectorised) build, which rounds differently from the
    AVX2/AVX-512 ones on x86, the probe picks the rounding of that build, which reproduces it."""
    code = """if True:
        import torch
        from tetsnn.kernels import ops as bn_fused
        g = torch.Generator().manual_seed(1)
        for dtype in (torch.float32, torch.float64):
            mode = bn_fused._rebuild_mode(dtype)
            assert mode is not None, dtype
            for shape in ((50, 8, 6, 6), (300, 7)):
                y = torch.randn(shape, generator=g, dtype=dtype) * 5 + 2
                w, b = torch.randn(shape[1], generator=g, dtype=dtype), torch.randn(shape[1], generator=g, dtype=dtype)
                z, mean, invstd = torch.ops.aten.native_batch_norm(y, w, b, None, None, True, 0.0, 1e-5)
                assert torch.equal(bn_fused._rebuilt(y, w, b, mean, invstd, mode), z), (dtype, shape)
            print(dtype, mode)
    """
    if bn_fused._rebuild_mode(torch.float32) is None:
        pytest.skip("this machine's batch_norm kernel is re-run in backward")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_backward_equals_batch_norm_rerun(dtype, monkeypatch):
    """dL/dz from the kernel that rebuilds z as it goes equals, bit for bit, the LIF backward on z from
    torch's batch_norm run again: plain, with residual bits and with a downsample branch."""
    if bn_fused._rebuild_mode(dtype) is None:
        pytest.skip("this machine's batch_norm kernel is re-run in backward")
    g = torch.Generator().manual_seed(6)
    N, T, C = 3, 4, 5
    y, y2 = (torch.randn(N * T, C, 6, 7, generator=g, dtype=dtype) * 2 for _ in range(2))
    w, b, w2, b2 = (torch.randn(C, generator=g, dtype=dtype) for _ in range(4))
    bits = compact.pack_spikes((torch.rand(N, T, C, 6, 7, generator=g) < 0.3).to(dtype))
    grad_s = torch.randn(N, T, C, 6, 7, generator=g, dtype=dtype)
    _, mean, invstd = torch.ops.aten.native_batch_norm(y, w, b, None, None, True, 0.0, 1e-5)
    _, mean2, invstd2 = torch.ops.aten.native_batch_norm(y2, w2, b2, None, None, True, 0.0, 1e-5)
    cases = {"plain": (None, None, None, None, None, None), "bits": (None, None, None, None, None, bits),
             "downsample": (y2, w2, b2, mean2, invstd2, None)}
    others = [(0.8, 0.6, "soft", True, "atan", 2.0), (0.3, 0.9, "hard", True, "sigmoid", 4.0),
              (0.5, 0.7, "soft", False, "zif", 0.5)]
    for (name, (a2, aw, ab, am, ai, r)), other in zip(cases.items(), others):
        for lif in ((0.5, 1.0, "hard", False, "zif", 1.0), other):   # the default and other options
            args = (grad_s, y, w, b, mean, invstd, 1e-5, a2, aw, ab, am, ai, 1e-5, r, dtype, T, *lif, "fused")
            spec = bn_fused.unflatten_neuron(*lif, "fused")[0]
            second = None if a2 is None else bn_fused.SavedBN(a2, aw, ab, am, ai, 1e-5)
            assert bn_fused._numba_backward(grad_s, bn_fused.SavedBN(y, w, b, mean, invstd, 1e-5), second, r, dtype, T,
                                            spec, None) is not None
            gz = torch.ops.tetsnn.bn_lif_backward(*args)[0]
            with monkeypatch.context() as m:
                m.setitem(bn_fused._MODES, dtype, None)  # as on a machine whose kernel is not reproduced
                ref = torch.ops.tetsnn.bn_lif_backward(*args)[0]
            assert gz.abs().sum() > 0 and torch.equal(gz, ref), (name, lif)


def test_custom_op_registration():
    y = torch.randn(6, 3, 4, 4, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    args = (y, w, b, torch.zeros(3), torch.ones(3), 0.1, 1e-5, None, None, None, None, None, 0.0, 0.0, None, 2,
            0.5, 0.2, "hard", False, "zif", 1.0, "fused")
    torch.library.opcheck(torch.ops.tetsnn.bn_lif_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    _, mean, invstd = torch.ops.aten.native_batch_norm(y.detach(), w.detach(), b.detach(), None, None, True, 0.0,
                                                       1e-5)
    back = (torch.randn(3, 2, 3, 4, 4), y.detach(), w.detach(), b.detach(), mean, invstd, 1e-5, None, None, None,
            None, None, 0.0, compact.pack_spikes(torch.ones(3, 2, 3, 4, 4)), torch.float32, 2, 0.5, 0.2, "hard",
            False, "zif", 1.0, "fused")
    torch.library.opcheck(torch.ops.tetsnn.bn_lif_backward.default, back,
                          test_utils=("test_schema", "test_faketensor"))


def test_eager_path_equals_the_op():
    """Eager training runs the op's body through an autograd.Function that updates the running statistics
    in place (torch.compile traces the functional op): the same spikes, new running statistics and
    gradients, bit for bit, plain, with residual bits and with a downsample branch."""
    g = torch.Generator().manual_seed(7)
    y, y2 = (torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    r = (torch.rand(3, 2, 3, 4, 4, generator=g) < 0.5).double()
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    lif = (2, 0.5, 0.2, "hard", False, "zif", 1.0, "fused")
    for downsample, residual in ((False, None), (False, r), (True, None)):
        results = []
        for eager in (False, True):
            leaves = [t.clone().requires_grad_() for t in (y, w, b, y2, w * 2, b - 1, r)]
            running = [torch.rand(3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
                       for k in range(4)]
            second = (leaves[3], leaves[4], leaves[5], running[2], running[3], 0.2, 1e-5) if downsample else \
                (None, None, None, None, None, 0.0, 0.0)
            args = (*leaves[:3], running[0], running[1], 0.1, 1e-5, *second,
                    leaves[6] if residual is not None else None, *lif)
            if eager:
                s = bn_fused._BNNeuronFunction.apply(*args, None)   # no SpikePacking
                stats = running if downsample else running[:2]      # updated in place
            else:
                out = torch.ops.tetsnn.bn_lif_forward(*args)
                s, stats = out[0], [out[3], out[4], out[7], out[8]] if downsample else [out[3], out[4]]
                assert not torch.equal(stats[0], running[0])         # the op leaves its inputs alone
            s.backward(torch.randn(s.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
            used = leaves[:6] if downsample else leaves[:3] + ([leaves[6]] if residual is not None else [])
            results.append([s, *stats, *(t.grad for t in used)])
        assert 0 < results[0][0].mean() < 1
        for a, b_ in zip(*results):
            assert torch.equal(a, b_)


def test_profile_and_export_on_fused_models(tmp_path):
    model = create_model("digits_snn")
    model.train()
    tetsnn.tet_loss(model(torch.rand(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    stats = tetsnn.analysis.profile(model, torch.rand(4, 1, 8, 8))
    assert set(stats["firing_rates"]) == {"features.0.act", "features.1.act", "features.3.act", "sn"}
    assert stats["macs_ann"] > 0
    graph = tetsnn.export_nir(model, tmp_path / "m.nir", (1, 8, 8))
    assert {"features_0_fwd_module_0", "features_0_act", "features_3_act"} <= set(graph.nodes)


def test_old_state_dict_keys_load():
    """The modules and names are those of the unfused models: a checkpoint of either loads into the other."""
    for name in ("resnet19", "sew_resnet18", "vggsnn", "digits_snn"):
        a, b = create_model(name), create_model(name, fuse_bn=False)
        assert a.state_dict().keys() == b.state_dict().keys()
        a.load_state_dict(b.state_dict())
    keys = create_model("resnet19").state_dict()
    for k in ("stem.0.module.1.running_var", "layer1.0.conv1.module.1.num_batches_tracked",
              "layer2.0.downsample.module.1.weight", "fc2.module.weight"):
        assert k in keys


# --------------------------------------------------------------------------- pooling of spikes

def test_avg_pool_keeps_nothing_and_max_pool_keeps_bits():
    s = (torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.6).double()
    g = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    for lean, plain, kept in ((compact.ShapeOnlyAvgPool2d(2), nn.AvgPool2d(2), set()),
                              (compact.ShapeOnlyAvgPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1), set()),
                              (compact.SpikeMaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1), {s.numel() // 8}),
                              (compact.SpikeMaxPool2d(2), nn.MaxPool2d(2), {s.numel() // 8})):
        for x in (s, s.contiguous(memory_format=torch.channels_last)):
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            assert set(saved_activation_bytes(lean, a).values()) == kept
            out_a, out_b = lean(a), plain(b)
            assert torch.equal(out_a, out_b)
            out_a.backward(g), out_b.backward(g)
            assert torch.equal(a.grad, b.grad)
    lean, plain = compact.ShapeOnlyAdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    assert saved_activation_bytes(lean, a) == {}
    lean(a).sum().backward(), plain(b).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_relu_twins_unchanged():
    for name in ("vggsnn", "resnet19", "digits_snn"):
        m = create_model(name, neuron="relu")
        kinds = {type(x) for x in m.modules()}
        assert not kinds & {compact.ShapeOnlyAvgPool2d, compact.ShapeOnlyAdaptiveAvgPool2d, compact.SpikeMaxPool2d}
