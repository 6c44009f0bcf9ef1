"""Every LIF backend against the per-step loop (`backend="loop"`), forward and backward.

The Triton kernels run on the CPU through Triton's interpreter, switched on before they are built.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import tetsnn  # noqa: E402
from conftest import GRAD_TOL, assert_grads_close, stable_seed  # noqa: E402
from tetsnn import IF, LIF  # noqa: E402
from tetsnn.kernels import numba_kernels, ops  # noqa: E402

BACKENDS = ["fused", "triton"]
SURROGATES = [("zif", {}), ("zif", {"gamma": 0.5}), ("sigmoid", {}), ("atan", {"alpha": 3.0})]
TOL = {**GRAD_TOL, torch.float64: 1e-12}


def custom_grad(v):
    return torch.exp(-v * v)


def membranes(x, tau, threshold, reset):
    """Pre-reset membranes of the loop, in float64, to keep random inputs away from the threshold."""
    x = x.double()
    u, hs = torch.zeros_like(x[:, 0]), []
    for t in range(x.shape[1]):
        h = tau * u + x[:, t]
        s = (h > threshold).double()
        u = h * (1 - s) if reset == "hard" else h - threshold * s
        hs.append(h)
    return torch.stack(hs, 1)


def random_input(shape, dtype, tau=0.5, threshold=1.0, reset="hard", ties=True, seed=0):
    """Random input; with ``ties`` some steps land exactly on the threshold, without them every
    membrane stays more than 1e-4 away from it (where a fused multiply-add may round differently)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.8 + 0.5
    if ties:
        x[:, 0, ::2] = threshold
    else:
        for t in range(shape[1]):
            near = (membranes(x, tau, threshold, reset)[:, t] - threshold).abs() < 1e-3
            x[:, t][near] += 0.01
    return x.to(dtype)


def run(m, x, grad_out):
    x = x.clone().requires_grad_()
    y = m(x)
    (g,) = torch.autograd.grad(y, x, grad_out)
    return y, g


def compare(backend, x, dtype=None, tol=None, **kw):
    """Forward exactly equal, backward within ``tol`` (by default the dtype's, of the largest
    gradient) against the loop on the same module settings."""
    cls = IF if kw.pop("kind", "lif") == "if" else LIF
    fast, loop = cls(backend=backend, **kw), cls(backend="loop", **kw)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    y1, g1 = run(fast, x, grad_out)
    y2, g2 = run(loop, x, grad_out)
    assert y1.dtype == x.dtype and torch.equal(y1, y2)
    assert 0 < y1.float().mean() < 1
    assert g1.abs().sum() > 0
    assert_grads_close(g1, g2, TOL[x.dtype] if tol is None else tol)
    return y1, g1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("surrogate,skw", SURROGATES)
def test_matches_loop(backend, reset, detach, surrogate, skw):
    kw = dict(reset=reset, detach_reset=detach, surrogate=surrogate, **skw)
    ties = backend == "fused"  # the numba kernel performs the loop's own roundings
    x = random_input((3, 6, 4, 5), torch.float32, reset=reset, ties=ties, seed=stable_seed(kw))
    compare(backend, x, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("surrogate", ["zif", "sigmoid", "atan"])
def test_every_T_and_dtype(backend, dtype, reset, surrogate):
    for T in range(1, 9):
        for kind, tau, threshold in [("lif", 0.5, 1.0), ("if", 1.0, 0.75)]:
            x = random_input((2, T, 3, 7), torch.float64, tau, threshold, reset, ties=False, seed=T)
            kw = dict(threshold=threshold, reset=reset, detach_reset=T % 2 == 0, surrogate=surrogate)
            if kind == "lif":
                kw["tau"] = tau
            if dtype in TOL:
                compare(backend, x.to(dtype), tol=TOL[dtype], kind=kind, **kw)
                continue
            # half precision integrates in float32: the same as the loop on the upcast input
            xh = x.to(dtype)
            cls = IF if kind == "if" else LIF
            grad_out = torch.randint(-4, 5, x.shape, generator=torch.Generator().manual_seed(T)) / 4.0
            y1, g1 = run(cls(backend=backend, **kw), xh, grad_out.to(dtype))
            y2, g2 = run(cls(backend="loop", **kw), xh.float(), grad_out)
            assert y1.dtype == dtype and g1.dtype == dtype and torch.equal(y1.float(), y2)
            tol = 1e-2 if surrogate == "sigmoid" else 0  # exp may round differently: one half-precision step
            torch.testing.assert_close(g1.float(), g2.to(dtype).float(), rtol=tol, atol=tol * 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_exact_ties(backend, reset):
    # multiples of 1/8 with tau 0.5: every membrane is exact, many land on the threshold mid-sequence
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 9, (4, 8, 64), generator=g) / 8.0
    h = membranes(x, 0.5, 1.0, reset)
    assert (h[:, 1:] == 1.0).sum() >= 5
    y, _ = compare(backend, x, reset=reset)
    assert torch.all(y[h == 1.0] == 0)


def test_custom_surrogate_runs_fused_only():
    x = random_input((3, 4, 10), torch.float32)
    compare("fused", x, surrogate=custom_grad)
    compare("fused", x, surrogate=custom_grad, reset="soft", detach_reset=True)
    with pytest.raises(ValueError, match="triton"):
        LIF(surrogate=custom_grad, backend="triton")


def test_auto_is_fused_on_cpu():
    assert LIF().resolve_backend(torch.zeros(1, 2)) == "fused"
    assert LIF(backend="loop").resolve_backend(torch.zeros(1, 2)) == "loop"
    with pytest.raises(ValueError, match="backend"):
        LIF(backend="numba")


def test_torch_op_fallback_matches_loop(monkeypatch):
    monkeypatch.setitem(numba_kernels.STATE, "numba", False)  # as if numba were missing
    assert not numba_kernels.available()
    for reset in ["hard", "soft"]:
        compare("fused", random_input((3, 5, 4, 6), torch.float32), reset=reset, surrogate="sigmoid")


def test_kernel_failure_warns_and_falls_back(monkeypatch):
    def broken(key):
        raise RuntimeError("no compiler")

    monkeypatch.setitem(numba_kernels.STATE, "numba", numba_kernels.STATE["numba"])  # restored after the test
    monkeypatch.setattr(numba_kernels, "kernel", broken)
    with pytest.warns(RuntimeWarning, match="falling back to torch ops"):
        compare("fused", random_input((2, 4, 9), torch.float32))
    assert not numba_kernels.available()


def saved_bytes(fn, x):
    """Bytes of the distinct storages that autograd saves while ``fn(x)`` runs."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_one_membrane_per_step(backend):
    x = torch.randn(4, 6, 32, requires_grad=True)
    fast = saved_bytes(LIF(backend=backend), x)
    assert fast == x.numel() * 4
    assert fast * 3 <= saved_bytes(LIF(backend="loop"), x)
    half = x.detach().bfloat16().requires_grad_()  # kept as it came, integrated in float32
    assert saved_bytes(LIF(backend=backend), half) == x.numel() * 2


def test_custom_op_registration():
    x = random_input((2, 3, 5), torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.tetsnn.lif_forward.default,
                          (x, 0.5, 1.0, "hard", False, "zif", 1.0, "fused"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_eager_path_equals_the_op():
    """Eager code runs the op's body through an autograd.Function (torch.compile traces the op): the
    same spikes and input gradient, bit for bit."""
    def eager(x, *args):
        return ops._NeuronFunction.apply(x, *args, None)   # no SpikePacking
    x = random_input((3, 5, 7), torch.float64)
    g = torch.randn(3, 5, 7, dtype=torch.float64)
    for args in ((0.5, 1.0, "hard", False, "zif", 1.0, "fused"), (0.7, 0.4, "soft", True, "atan", 2.0, "fused")):
        results = []
        for call in (torch.ops.tetsnn.lif_forward, eager):
            xi = x.clone().requires_grad_()
            s = call(xi, *args)
            s.backward(g)
            results.append((s, xi.grad))
        assert 0 < results[0][0].mean() < 1 and results[0][1].abs().sum() > 0
        for a, b in zip(*results):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input(backend):
    """A non-contiguous input (a permuted or channels_last tensor) gives the loop's results."""
    x = random_input((3, 4, 5, 6), torch.float32, ties=False, seed=5).permute(0, 1, 3, 2)
    assert not x.is_contiguous()
    compare(backend, x)


def test_channels_last_model_gradients_match_loop():
    grads = {}
    for backend in ("fused", "loop"):
        torch.manual_seed(0)
        m = tetsnn.create_model("digits_snn", backend=backend).to(memory_format=torch.channels_last)
        x = torch.rand(4, 1, 8, 8) * 3
        tetsnn.tet_loss(m(x), torch.tensor([0, 1, 2, 3])).backward()
        grads[backend] = m.features[0].fwd.module[0].weight.grad
    torch.testing.assert_close(grads["fused"], grads["loop"], rtol=1e-5, atol=1e-6)


def test_numba_can_be_turned_off_by_the_environment():
    """TETSNN_NUMBA=0: the planner picks the torch-op paths and no numba kernel is built."""
    import subprocess
    import sys
    code = ("import torch, tetsnn\n"
            "from tetsnn.kernels import numba_kernels\n"
            "from tetsnn.kernels.plan import plan\n"

            "n = tetsnn.LIF(); x = torch.randn(2, 3, 4)\n"
            "bn = torch.nn.BatchNorm2d(4).train()\n"
            "print(plan(n.spec, x).name, plan(n.spec, x, bn).name)\n"
            "m = tetsnn.create_model('digits_snn'); m(torch.rand(2, 4, 1, 8, 8)).sum().backward()\n"
            "print(len(numba_kernels._KERNELS))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TETSNN_NUMBA": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["TORCH_OPS", "BN_TORCH", "0"]
    assert "numba" not in res.stderr   # off on purpose: no fallback warning
