"""Spiking neurons: the neuron contract (:mod:`.spec`), the recurrent neurons (:mod:`.lif`) and the
registry :func:`make_neuron` reads. Their surrogate spike functions are in ``tetsnn.surrogate``."""
from __future__ import annotations

from torch import nn

from ..surrogate import (SURROGATES, AtanSpike, CustomSpike, SigmoidSpike, ZIF, atan_grad, atan_spike,
                         resolve_surrogate, sigmoid_grad, sigmoid_spike, zif, zif_grad)
from .lif import IF, ILIF, LIF, PLIF, ReLUNeuron, SpikingNeuron, lif_loop
from .psn import PSN, SlidingPSN
from .spec import NeuronSpec

__all__ = [
    "ZIF", "SigmoidSpike", "AtanSpike", "CustomSpike",
    "zif", "sigmoid_spike", "atan_spike",
    "zif_grad", "sigmoid_grad", "atan_grad",
    "SURROGATES", "resolve_surrogate", "lif_loop", "NeuronSpec", "SpikingNeuron",
    "LIF", "PLIF", "IF", "ILIF", "ReLUNeuron", "PSN", "SlidingPSN", "make_neuron", "NEURONS", "spike_levels",
]

NEURONS = {"lif": LIF, "plif": PLIF, "if": IF, "ilif": ILIF, "relu": ReLUNeuron, "psn": PSN,
           "sliding_psn": SlidingPSN}


def make_neuron(neuron: str = "lif", T: int = None, **kw) -> nn.Module:
    """Build a neuron by name (a key of ``NEURONS``); keyword arguments go to the spiking ones.
    ``T``, the model's number of time steps, is read by "psn" only."""
    if neuron not in NEURONS:
        raise ValueError(f"unknown neuron {neuron!r}: expected one of {sorted(NEURONS)}")
    if neuron == "relu":
        return ReLUNeuron()
    if neuron == "if":
        kw.pop("tau", None)
    if neuron == "psn":
        if T is None:
            raise ValueError("neuron 'psn' needs the number of time steps T")
        return PSN(T, **kw)
    if neuron == "sliding_psn" and "order" not in kw:
        raise ValueError("neuron 'sliding_psn' needs its order k (model_kw {order: K})")
    return NEURONS[neuron](**kw)


def spike_levels(neuron: str = "lif", **kw) -> int:
    """The largest value neuron ``neuron`` emits (what spike-fed layers keep bits for): 0 for "relu" (no
    spikes), ``max_level`` for "ilif", 1 otherwise."""
    if neuron == "relu":
        return 0
    if neuron == "ilif":
        return int(kw.get("max_level", 4))
    return 1
