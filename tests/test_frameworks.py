"""benchmarks/bench_frameworks.py builds the same networks in SpikingJelly, snnTorch and Norse with
tetsnn's weights: each build's outputs (and parameter gradients) equal tetsnn's in float64."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_frameworks as bf  # noqa: E402


@pytest.fixture(autouse=True)
def torch_op_kernels(monkeypatch):
    """tetsnn's fused kernels in torch ops (the numba ones equal them; their float64 compile is slow)."""
    from tetsnn.kernels import numba_kernels

    monkeypatch.setitem(numba_kernels.STATE, "numba", False)


def _installed(fw):
    pytest.importorskip(bf.PACKAGES[fw])
    return fw


@pytest.mark.parametrize("fw", bf.FRAMEWORKS)
def test_linear_lif_equal_outputs_and_gradients(fw):
    res = bf.check_equal("linear", frameworks=(_installed(fw),), tetsnn_min=False)
    assert set(res) == ({fw, f"{fw} memopt 1"} if fw == "spikingjelly" else {fw})
    for r in res.values():
        assert r["spikes"] > 0                      # the neurons fire: the comparison means something
        assert r["output_max_abs_diff"] == 0.0      # spikes: exactly equal
        # snnTorch's custom surrogate makes float32 spikes: its gradients pass through float32
        assert r["grad_max_rel_diff"] < (1e-6 if fw == "snntorch" else 1e-12), r


@pytest.mark.parametrize("net", ["vggsnn", "resnet19"])
def test_conv_networks_equal_outputs_and_gradients(net):
    fws = tuple(fw for fw in bf.FRAMEWORKS if bf.has(fw))
    if not fws:
        pytest.skip("none of spikingjelly, snntorch, norse is installed")
    # the smallest inputs the networks take; snnTorch's gradients need a tetsnn pass with a detached
    # reset, so there its outputs are compared (its gradients are in the linear test)
    res = bf.check_equal(net, frameworks=fws, memopt=False, snntorch_grads=False, tetsnn_min=False)
    assert set(res) == set(fws)
    for fw, r in res.items():
        assert r["output_max_abs_diff"] < 1e-12, (fw, r)
        if fw != "snntorch":
            assert r["grad_max_rel_diff"] < 1e-12, (fw, r)


def test_a_wrong_mapping_is_caught():
    """SpikingJelly's default decay_input=True (u = 0.5 u + 0.5 x) is not TET's LIF: the check sees it."""
    _installed("spikingjelly")
    kit = bf.SpikingJellyKit

    class DecayInput(kit):
        def lif(self):
            m = super().lif()
            m.decay_input = True
            return m
    bf.KITS["spikingjelly"] = DecayInput
    try:
        r = bf.check_equal("linear", frameworks=("spikingjelly",), memopt=False, tetsnn_min=False)["spikingjelly"]
    finally:
        bf.KITS["spikingjelly"] = kit
    assert r["output_max_abs_diff"] > 0.5


@pytest.mark.parametrize("net", ["linear", "vggsnn", "resnet19"])
def test_tetsnn_min_build_equals_the_default_bit_for_bit(net):
    """The benchmark's memory="min" row: the same weights, and outputs and gradients equal to tetsnn's
    default build exactly (the recompute is bit-identical)."""
    res = bf.check_equal(net, frameworks=())
    assert set(res) == {bf.MIN}
    r = res[bf.MIN]
    assert r["spikes"] > 0
    assert r["output_max_abs_diff"] == 0.0 and r["grad_max_rel_diff"] == 0.0, r
    model = bf.tetsnn_model(net, bf.EQUAL_SIZES[net], memory="min")
    blocks = [m for m in model.modules() if getattr(m, "memory", None) == "min"]
    assert blocks   # the build runs its blocks with memory="min" (not the default mode)
