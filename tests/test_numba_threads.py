"""The numba kernels compiled for all threads (what runs by default) and for one thread
(``TETSNN_NUMBA_PARALLEL=0``, which the rest of the test suite uses to halve its compile time) give the
same bits: every kind of kernel whose outer loop takes work items, on inputs spanning several work
items (several samples, more neurons than one block, a ragged tail)."""
import pytest
import torch
from torch import nn

import tetsnn
from tetsnn.kernels import levels, numba_kernels as nk
from tetsnn.kernels.ops import bn_neuron, pack_spikes, unpack_spikes
from tetsnn.neuron.spec import NeuronSpec

pytestmark = pytest.mark.skipif(not nk.available(), reason="numba is not installed")


def on_both(monkeypatch, fn, kinds):
    """``fn()`` with the kernels compiled for all threads, then for one; both results. The numba kernels
    of each kind in ``kinds`` must have run in both settings (not a torch-op fallback)."""
    out = []
    for parallel in (True, False):
        monkeypatch.setitem(nk.STATE, "parallel", parallel)
        torch.manual_seed(0)
        out.append(fn())
        built = {key[0] for key, par in nk._KERNELS if par is parallel}
        assert set(kinds) <= built, f"{set(kinds) - built} did not run with parallel={parallel}"
    assert nk.available()   # no kernel failed (a failure switches numba off)
    return out


def assert_same_bits(a, b):
    a, b = (a,) if torch.is_tensor(a) else a, (b,) if torch.is_tensor(b) else b
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v)


def test_the_setting_is_read_from_the_environment(monkeypatch):
    for value, expected in (("0", False), ("1", True), ("", True)):
        monkeypatch.setitem(nk.STATE, "parallel", None)
        monkeypatch.setenv("TETSNN_NUMBA_PARALLEL", value)
        assert nk.parallel() is expected
    monkeypatch.setitem(nk.STATE, "parallel", True)
    threads = nk.kernel(("pack", False))
    monkeypatch.setitem(nk.STATE, "parallel", False)
    one = nk.kernel(("pack", False))
    assert threads is not one    # one kernel per setting
    assert threads.targetoptions["parallel"] is True and one.targetoptions["parallel"] is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neuron_forward_and_backward_with_a_learnable_decay(monkeypatch, dtype):
    """3 samples x 2 blocks of neurons (the second one ragged): spikes, input gradient and the decay's
    gradient (summed from one share per work item)."""
    x = torch.randn(3, 5, 2 * nk.BLOCK + 40, dtype=dtype) * 1.5 + 0.6

    def step():
        neuron = tetsnn.PLIF(surrogate="sigmoid").to(dtype)
        xi = x.clone().requires_grad_()
        s = neuron(xi)
        (s * torch.linspace(-1, 1, s.shape[-1], dtype=dtype)).sum().backward()
        return s, xi.grad, next(neuron.parameters()).grad
    a, b = on_both(monkeypatch, step, ["fwd", "bwd"])
    assert 0 < a[0].mean() < 1 and a[2].abs() > 0
    assert_same_bits(a, b)


def test_batchnorm_neuron_with_a_residual(monkeypatch):
    """The fused BatchNorm-neuron forward and backward (the "bn+bits" source) over 2 samples."""
    spec = NeuronSpec(surrogate="zif")
    y = torch.randn(2 * 3, 4, 30, 40)
    res = (torch.rand(2, 3, 4, 30, 40) > 0.6).float()

    def step():
        bn = nn.BatchNorm2d(4).train()
        yi = y.clone().requires_grad_()
        s = bn_neuron(yi, bn, spec, "fused", 3, residual=res)
        (s * torch.randn(s.shape)).sum().backward()
        return s, yi.grad, bn.weight.grad, bn.running_var
    assert_same_bits(*on_both(monkeypatch, step, ["fwd", "bwd", "pack"]))


def test_packing_and_unpacking(monkeypatch):
    n = 3 * nk.PACK_BLOCK + 13
    spikes = (torch.rand(n) > 0.5).float()
    counts = torch.randint(0, 4, (n,)).double()

    def run():
        bits = pack_spikes(spikes)
        planes = levels.pack_counts(counts, 3)
        return (bits, unpack_spikes(bits, [n], torch.float32), planes,
                levels.unpack_counts(planes, [n], torch.float64))
    a, b = on_both(monkeypatch, run, ["pack", "unpack", "pack_counts", "unpack_counts"])
    assert torch.equal(a[1], spikes) and torch.equal(a[3], counts)
    assert_same_bits(a, b)


def test_parallel_spiking_neuron(monkeypatch):
    x = torch.randn(2, 4, 2500, dtype=torch.float64)

    def step():
        psn = tetsnn.PSN(T=4, surrogate="atan").double()
        xi = x.clone().requires_grad_()
        s = psn(xi)
        (s * torch.randn(s.shape, dtype=s.dtype)).sum().backward()
        return (s, xi.grad) + tuple(p.grad for p in psn.parameters())
    a, b = on_both(monkeypatch, step, ["psn"])
    assert 0 < a[0].mean() < 1
    assert_same_bits(a, b)
