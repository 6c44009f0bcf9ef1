"""Firing rates, synaptic operations (SOPs) and energy of a spiking model.

The counting follows tetsnn's energy conventions (those of SNN papers, made exact):

- A Conv/Linear layer is *spike-driven* when its input carries spikes: the output of a LIF/IF/PSN
  layer, or what shape changes, pooling, and sums or products of spike tensors make from it
  (flatten, avg/max pooling, SEW-ResNet's ADD/AND), or any input whose values are all 0 or 1.
  It performs one accumulate per (nonzero input element, weight) pair it multiplies, counted
  exactly, border effects included; its SOPs are summed over all time steps.
- Every other Conv/Linear layer (the first layer fed images or normalised frames) performs its
  dense MACs at every time step it runs.
- The ANN twin runs the same network once per sample: the dense MACs of one time step.
- The attention products of the spiking transformers (``Q K^T V``, the token and channel sums of
  spike masks) count one accumulate per nonzero spike operand element and element it multiplies
  (their modules' ``spike_synops``); the ANN twin counts their dense MACs.
- Energy at 45 nm: 4.6 pJ per MAC, 0.9 pJ per accumulate (fp32). Biases and BatchNorm (folded into
  the convolution at inference) are not counted.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..neuron import ILIF, PSN, SlidingPSN, SpikingNeuron

NEURON_TYPES = (SpikingNeuron, PSN, SlidingPSN)  # the spiking layers counted as neurons

__all__ = ["profile", "format_table", "conv_synops", "linear_synops", "dense_macs", "MAC_PJ", "AC_PJ"]

MAC_PJ = 4.6   # energy of one multiply-accumulate, pJ (45 nm, fp32)
AC_PJ = 0.9    # energy of one accumulate, pJ (45 nm, fp32)

SYNAPSE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# torch functions whose output carries spikes when every tensor argument does
_SPIKE_PRESERVING = frozenset({
    "view", "reshape", "flatten", "unflatten", "contiguous", "clone", "squeeze", "unsqueeze",
    "permute", "transpose", "__getitem__", "select", "narrow", "cat", "stack", "to", "float",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
    "adaptive_max_pool2d",
})
# ... and when every operand is a spike tensor (a spike plus a constant is no longer sparse)
_SPIKE_COMBINING = frozenset({"add", "__add__", "__radd__", "mul", "__mul__", "__rmul__"})


def _tensors(args) -> List[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensors(a))
    return out


class SpikeTracker(TorchFunctionMode):
    """Follows spikes through a forward pass: ``mark`` the outputs of spiking layers, and every
    tensor computed from marked tensors by a spike-preserving function is marked too."""

    def __init__(self):
        super().__init__()
        self._marked: Dict[int, weakref.ref] = {}

    def mark(self, t: torch.Tensor) -> None:
        self._marked[id(t)] = weakref.ref(t)

    def is_marked(self, t: torch.Tensor) -> bool:
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _SPIKE_PRESERVING or name in _SPIKE_COMBINING:
            operands = _tensors(args)
            spiking = bool(operands) and all(self.is_marked(t) for t in operands)
            if name in _SPIKE_COMBINING:
                spiking = spiking and len(operands) == len(args)
            if spiking:
                for t in _tensors(out if isinstance(out, (list, tuple)) else (out,)):
                    self.mark(t)
        return out


# --------------------------------------------------------------------------- counting

def dense_macs(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a Conv/Linear ``layer`` (input ``x``, output ``y``), bias excluded."""
    if isinstance(layer, nn.Linear):
        return x.numel() * layer.out_features
    return y.numel() * layer.weight[0].numel()


def _events(x: torch.Tensor, counts: bool) -> torch.Tensor:
    """Accumulates each input element causes per weight: 1 where nonzero; with ``counts`` (a model with
    integer-valued spikes, ILIF) an integer value v causes v (C unit events accumulate per weight)."""
    indicator = (x != 0).double()
    if not counts:
        return indicator
    xd = x.double()
    return torch.where(xd == xd.round(), xd.abs(), indicator)


@torch.no_grad()
def conv_synops(conv: nn.Module, x: torch.Tensor, counts: bool = False) -> int:
    """Number of (nonzero input element, weight) pairs a convolution multiplies for input ``x``:
    the convolution of the indicator ``x != 0`` with an all-ones kernel, summed. Stride, padding
    (any padding mode), dilation, groups and the borders are those of ``conv`` itself."""
    indicator = _events(x, counts)
    ones = torch.ones(conv.weight.shape, dtype=torch.float64, device=x.device)
    return int(round(conv._conv_forward(indicator, ones, None).sum().item()))


def linear_synops(linear: nn.Linear, x: torch.Tensor, counts: bool = False) -> int:
    """(nonzero input element, weight) pairs of a Linear layer: ``nnz(x) * out_features``."""
    return int(round(_events(x, counts).sum().item())) * linear.out_features


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all().item())


# --------------------------------------------------------------------------- the profiler

@dataclass
class LayerStats:
    name: str
    kind: str                 # "conv", "linear", "product" (an attention product) or "neuron"
    synops: int = 0           # accumulates of spike-driven calls, whole input
    macs: int = 0             # dense MACs of calls not driven by spikes, whole input
    dense: int = 0            # dense MACs of every call (for the ANN twin)
    spike_calls: int = 0
    calls: int = 0
    spikes: float = 0.0       # neuron layers: spikes emitted
    elements: int = 0         # neuron layers: neuron-steps observed
    neurons: int = 0          # neuron layers: neurons per sample
    raster: Optional[torch.Tensor] = field(default=None, repr=False)


class _Profiler:
    def __init__(self, model: nn.Module, keep_raster: bool):
        self.model = model
        self.keep_raster = keep_raster
        self.tracker = SpikeTracker()
        self.stats: Dict[str, LayerStats] = {}
        for name, m in model.named_modules():
            if isinstance(m, NEURON_TYPES):
                self.stats[name] = LayerStats(name, "neuron")
            elif isinstance(m, SYNAPSE_TYPES):
                self.stats[name] = LayerStats(name, "linear" if isinstance(m, nn.Linear) else "conv")
            elif hasattr(m, "spike_synops"):   # an attention product (tetsnn.attention.SpikeProduct)
                self.stats[name] = LayerStats(name, "product")
        self.counts = any(isinstance(m, ILIF) for m in model.modules())
        if not any(s.kind == "neuron" for s in self.stats.values()):
            raise ValueError(f"{type(model).__name__} has no LIF/IF layer to profile (nor PSN / SlidingPSN)")

    def neuron_hook(self, name):
        def hook(module, inputs, out):
            st = self.stats[name]
            st.calls += 1
            st.spikes += float(out.sum().item())
            st.elements += out.numel()
            st.neurons = out[0, 0].numel()
            if self.keep_raster and st.raster is None:
                st.raster = out[0].reshape(out.shape[1], -1).detach().to("cpu", torch.uint8)
            self.tracker.mark(out)
        return hook

    def synapse_hook(self, name):
        def hook(module, inputs, out):
            st, x = self.stats[name], inputs[0]
            st.calls += 1
            dense = dense_macs(module, x, out)
            st.dense += dense
            if self.tracker.is_marked(x) or is_binary(x):
                st.spike_calls += 1
                synops = linear_synops if st.kind == "linear" else conv_synops
                st.synops += synops(module, x, self.counts)
            else:
                st.macs += dense
        return hook

    def product_hook(self, name):
        def hook(module, inputs, out):
            st = self.stats[name]
            st.calls += 1
            dense = module.dense_macs(*inputs)
            st.dense += dense
            if all(self.tracker.is_marked(x) or is_binary(x) for x in inputs if isinstance(x, torch.Tensor)):
                st.spike_calls += 1
                st.synops += module.spike_synops(*inputs)
            else:
                st.macs += dense
        return hook

    def run(self, batches: Iterable[torch.Tensor]):
        """Run every batch; return the number of samples and the first batch."""
        modules = dict(self.model.named_modules())
        hooks = {"neuron": self.neuron_hook, "product": self.product_hook}
        handles = [modules[name].register_forward_hook(hooks.get(st.kind, self.synapse_hook)(name))
                   for name, st in self.stats.items()]
        samples, first = 0, None
        try:
            with torch.no_grad(), self.tracker:
                for x in batches:
                    self.model(x)
                    samples += x.shape[0]
                    first = x if first is None else first
        finally:
            for h in handles:
                h.remove()
        return samples, first


def _batches(inputs) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    return inputs


def profile(model: nn.Module, inputs: Union[torch.Tensor, Iterable[torch.Tensor]], *, T: Optional[int] = None,
            mac_pj: float = MAC_PJ, ac_pj: float = AC_PJ, raster: bool = False) -> dict:
    """Run ``model`` (in eval mode, without gradients) on a batch or an iterable of batches and count
    firing rates, synaptic operations, MACs and energy.

    Args:
        model: a spiking model whose neurons are ``tetsnn.LIF`` / ``tetsnn.IF`` / ``tetsnn.PSN`` /
            ``tetsnn.SlidingPSN`` modules.
        inputs: a batch ``[N, C, H, W]`` / ``[N, T, C, H, W]``, or an iterable of such batches.
        T: time steps per sample; by default ``x.shape[1]`` of a sequence input, else ``model.T``.
        mac_pj: energy of one multiply-accumulate (MAC) in pJ.
        ac_pj: energy of one accumulate in pJ.
        raster: also return the spikes of the first sample (``result["raster"]``:
            {layer: uint8 tensor [T, neurons]}).

    Returns a dict: ``firing_rates`` {layer: mean spike rate}, ``synops`` (all samples, all steps),
    ``synops_per_sample``, ``macs_snn`` and ``macs_ann`` (per sample), ``energy_snn_pj`` and
    ``energy_ann_pj`` (per sample), ``samples``, ``T``, ``mac_pj``, ``ac_pj`` and ``layers``
    (one row per layer, in module order).
    """
    batches = _batches(inputs)
    prof = _Profiler(model, raster)
    was_training = model.training
    model.eval()
    try:
        samples, x0 = prof.run(batches)
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("profile needs at least one input batch")
    if T is None:
        T = x0.shape[1] if x0.dim() == 5 else getattr(model, "T", None)
    if T is None:
        raise ValueError(f"cannot tell the number of time steps of {type(model).__name__}: pass T=")
    return _summary(prof.stats.values(), samples, int(T), mac_pj, ac_pj, raster)


def _summary(stats, samples: int, T: int, mac_pj: float, ac_pj: float, raster: bool) -> dict:
    stats = list(stats)
    neurons = [s for s in stats if s.kind == "neuron" and s.calls]
    synapses = [s for s in stats if s.kind != "neuron" and s.calls]
    synops = sum(s.synops for s in synapses)
    macs_snn = sum(s.macs for s in synapses) / samples
    macs_ann = sum(s.dense for s in synapses) / samples / T
    rows = []
    for s in stats:
        if not s.calls:
            continue
        row = {"layer": s.name, "type": s.kind}
        if s.kind == "neuron":
            row.update(neurons=s.neurons, firing_rate=s.spikes / s.elements)
        else:
            row.update(spike_driven=s.spike_calls == s.calls, synops_per_sample=s.synops / samples,
                       macs_per_sample=s.macs / samples, dense_macs_per_step=s.dense / samples / T)
        rows.append(row)
    result = {
        "firing_rates": {s.name: s.spikes / s.elements for s in neurons},
        "synops": synops,
        "synops_per_sample": synops / samples,
        "macs_snn": macs_snn,
        "macs_ann": macs_ann,
        "energy_snn_pj": mac_pj * macs_snn + ac_pj * synops / samples,
        "energy_ann_pj": mac_pj * macs_ann,
        "samples": samples,
        "T": T,
        "mac_pj": mac_pj,
        "ac_pj": ac_pj,
        "layers": rows,
    }
    if raster:
        result["raster"] = {s.name: s.raster for s in neurons}
    return result


def format_table(result: dict) -> str:
    """The per-layer table of a ``profile`` result, and its totals, as text."""
    lines = [f"{'layer':<32} {'type':<7} {'driven by':<9} {'rate':>7} {'SOPs/sample':>13} {'MACs/sample':>13}"]
    for r in result["layers"]:
        if r["type"] == "neuron":
            lines.append(f"{r['layer']:<32} {'neuron':<7} {'':<9} {r['firing_rate']:>7.4f} {'':>13} {'':>13}")
        else:
            driven = "spikes" if r["spike_driven"] else "dense"
            lines.append(f"{r['layer']:<32} {r['type']:<7} {driven:<9} {'':>7} "
                         f"{r['synops_per_sample']:>13.4g} {r['macs_per_sample']:>13.4g}")
    lines += [
        "",
        f"samples {result['samples']}, T = {result['T']}",
        f"SOPs per sample  {result['synops_per_sample']:.4g}   (all samples: {result['synops']})",
        f"MACs per sample  SNN {result['macs_snn']:.4g}   ANN twin {result['macs_ann']:.4g}",
        f"energy per sample  SNN {result['energy_snn_pj'] / 1e6:.4g} uJ   ANN twin {result['energy_ann_pj'] / 1e6:.4g} uJ"
        f"   ({result['mac_pj']} pJ/MAC, {result['ac_pj']} pJ/AC)",
    ]
    return "\n".join(lines)
