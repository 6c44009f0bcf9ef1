"""LIF / IF neurons and surrogate spikes against a plain per-step loop written here."""
import math

import numpy as np
import pytest
import torch

import tetsnn
from conftest import GRAD_TOL, assert_grads_close, stable_seed
from tetsnn import IF, LIF


# ---------------------------------------------------------------- an independent reference

def ref_surrogate_grad(name, v, width):
    if name == "zif":
        return torch.clamp(width - v.abs(), min=0) / width / width
    if name == "sigmoid":
        s = 1 / (1 + torch.exp(-width * v))
        return width * s * (1 - s)
    if name == "atan":
        return width / 2 / (1 + (math.pi / 2 * width * v) ** 2)
    raise AssertionError(name)


class RefSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, dfn):
        ctx.save_for_backward(v)
        ctx.dfn = dfn
        return torch.where(v > 0, torch.ones_like(v), torch.zeros_like(v))

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        return g * ctx.dfn(v), None


def ref_neuron(x, tau, theta, dfn, reset, detach):
    T = x.shape[1]
    u = torch.zeros_like(x[:, 0])
    out = []
    for t in range(T):
        u = tau * u + x[:, t]
        s = RefSpike.apply(u - theta, dfn)
        r = s.detach() if detach else s
        if reset == "hard":
            u = u * (1 - r)
        else:
            u = u - theta * r
        out.append(s)
    return torch.stack(out, 1)


def custom_grad(v):
    return torch.exp(-v * v)


SURR = [("zif", 1.0), ("zif", 0.5), ("sigmoid", 4.0), ("atan", 2.0), ("atan", 3.0), ("custom", None)]


def make_input(shape, dtype, theta, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.8 + 0.5).to(dtype)
    # ties: at t=0 the membrane equals x exactly; put some inputs exactly on the threshold
    x[:, 0, ::2, ::3] = theta
    return x


def build(kind, surr, width, reset, detach, theta, tau=0.5):
    kw = dict(threshold=theta, reset=reset, detach_reset=detach)
    if surr == "custom":
        kw["surrogate"] = custom_grad
        dfn = custom_grad
    else:
        kw["surrogate"] = surr
        if surr == "zif":
            kw["gamma"] = width
        else:
            kw["alpha"] = width
        dfn = lambda v, s=surr, w=width: ref_surrogate_grad(s, v, w)  # noqa: E731
    m = LIF(tau=tau, **kw) if kind == "lif" else IF(**kw)
    return m, dfn


@pytest.mark.parametrize("dtype,tol", list(GRAD_TOL.items()))
@pytest.mark.parametrize("surr,width", SURR)
@pytest.mark.parametrize("reset", ["hard", "soft"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("kind", ["lif", "if"])
def test_neuron_matches_loop(kind, surr, width, reset, detach, dtype, tol):
    theta = 1.0 if kind == "lif" else 0.75
    tau = 0.5 if kind == "lif" else 1.0
    m, dfn = build(kind, surr, width, reset, detach, theta, tau)
    x = make_input((3, 5, 4, 6), dtype, theta, seed=stable_seed(kind, surr, reset, detach))
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1 = m(x1)
    y2 = ref_neuron(x2, tau, theta, dfn, reset, detach)
    assert y1.dtype == dtype and y1.shape == x.shape
    assert torch.equal(y1, y2)
    assert 0 < y1.mean() < 1  # both spikes and silence occur
    # ties at t=0 (u == threshold exactly) do not fire
    assert torch.all(y1[:, 0, ::2, ::3] == 0)
    w = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    (g1,) = torch.autograd.grad((y1 * w).sum(), x1)
    (g2,) = torch.autograd.grad((y2 * w).sum(), x2)
    assert g1.abs().sum() > 0
    assert_grads_close(g1, g2, tol)


def test_lif_is_stateless_and_leaves_input_alone():
    m = LIF()
    x = torch.rand(2, 4, 10) * 2
    x0 = x.clone()
    assert torch.equal(m(x), m(x))
    assert torch.equal(x, x0)


def test_known_sequence():
    # tau 0.5, threshold 1, hard reset: u = 0.6, 0.3+0.6=0.9, 0.45+0.6=1.05 -> fire, reset, 0.6
    x = torch.full((1, 4, 1), 0.6)
    assert LIF()(x).flatten().tolist() == [0, 0, 1, 0]
    # soft reset keeps the 0.05 above threshold: 0.025 + 0.6 = 0.625
    assert LIF(reset="soft")(x).flatten().tolist() == [0, 0, 1, 0]
    # IF without leak: 0.6, 1.2 fire -> 0, 0.6, 1.2 fire
    assert IF()(x).flatten().tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_integrate_in_float32(dtype):
    x = (torch.randn(4, 6, 8) + 0.5).to(dtype)
    xa = x.clone().requires_grad_()
    y = LIF()(xa)
    assert y.dtype == dtype
    xf = x.float().requires_grad_()
    yf = ref_neuron(xf, 0.5, 1.0, lambda v: ref_surrogate_grad("zif", v, 1.0), "hard", False)
    assert torch.equal(y.float(), yf)
    w = torch.randint(-4, 5, x.shape) / 4.0  # exact in every dtype
    (ga,) = torch.autograd.grad((y.float() * w).sum(), xa)
    (gf,) = torch.autograd.grad((yf * w).sum(), xf)
    torch.testing.assert_close(ga.float(), gf.to(dtype).float(), rtol=0, atol=0)


# ---------------------------------------------------------------- surrogate functions

GRID = np.linspace(-3, 3, 601)


def analytic(name, v, w):
    if name == "zif":
        return np.maximum(0.0, w - np.abs(v)) / w ** 2
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-w * v))
        return w * s * (1 - s)
    return w / 2 / (1 + (np.pi / 2 * w * v) ** 2)


@pytest.mark.parametrize("name,fn,width", [
    ("zif", tetsnn.zif, 1.0), ("zif", tetsnn.zif, 0.5), ("zif", tetsnn.zif, 2.0),
    ("sigmoid", tetsnn.sigmoid_spike, 4.0), ("sigmoid", tetsnn.sigmoid_spike, 1.5),
    ("atan", tetsnn.atan_spike, 2.0), ("atan", tetsnn.atan_spike, 0.7),
])
def test_surrogate_backward_matches_formula(name, fn, width):
    v = torch.tensor(GRID, dtype=torch.float64, requires_grad=True)
    s = fn(v, width)
    assert torch.equal(s, (v > 0).double())  # Heaviside; v == 0 gives 0
    assert s[300].item() == 0.0 and v[300].item() == 0.0
    (g,) = torch.autograd.grad(s.sum(), v)
    np.testing.assert_allclose(g.numpy(), analytic(name, GRID, width), rtol=1e-12, atol=1e-12)


def test_spike_functions_are_autograd_functions():
    for cls in (tetsnn.ZIF, tetsnn.SigmoidSpike, tetsnn.AtanSpike, tetsnn.CustomSpike):
        assert issubclass(cls, torch.autograd.Function)
    v = torch.tensor([-0.5, 0.0, 0.25], requires_grad=True)
    s = tetsnn.ZIF.apply(v, 1.0)
    s.sum().backward()
    assert s.tolist() == [0.0, 0.0, 1.0]
    assert v.grad.tolist() == [0.5, 1.0, 0.75]


def test_default_widths():
    assert LIF(surrogate="sigmoid").width == 4.0
    assert LIF(surrogate="atan").width == 2.0
    assert LIF(gamma=0.3).width == 0.3


# ---------------------------------------------------------------- bad input

def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown surrogate 'relu'"):
        LIF(surrogate="relu")
    with pytest.raises(ValueError, match="reset"):
        LIF(reset="zero")
    with pytest.raises(ValueError, match=r"\[N, T, \.\.\.\].*got shape \(5,\)"):
        LIF()(torch.zeros(5))
    with pytest.raises(ValueError, match="unknown neuron"):
        tetsnn.make_neuron("lstm")
    with pytest.raises(ValueError, match="width must be > 0"):
        LIF(surrogate="sigmoid", alpha=0)
