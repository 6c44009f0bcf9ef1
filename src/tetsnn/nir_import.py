"""Build a tetsnn model from a NIR graph: ``tetsnn.from_nir(graph_or_path, dt=None)``.

A NIR graph is continuous in time; tetsnn runs it as forward Euler with step ``dt`` (an explicit
``dt``, else the graph's ``metadata["dt"]``, else 1e-4). One Euler step of a NIR neuron is

- ``LIF``: ``v' = v + dt / tau * (v_leak - v + r * x) = decay * v + g * x`` with ``v_leak = 0``,
  ``decay = 1 - dt / tau`` and the input gain ``g = r * dt / tau``;
- ``IF``: ``v' = v + r * dt * x``: ``decay = 1``, ``g = r * dt``;
- ``CubaLIF`` with ``tau_syn = dt``: the synaptic current ``I' = I + dt / tau_syn * (w_in * x - I)`` is
  ``w_in * x`` of the same step, so it is the LIF above with ``g = r * w_in * dt / tau_mem``.

With ``u = v / g`` this is tetsnn's ``u' = decay * u + x`` firing when ``u > v_threshold / g``, with a
hard reset to ``v_reset = 0``: the gain is folded into the threshold, and spikes are unchanged. The
step factors are computed in float32 from the float32 parameters, as the simulators compute them,
so that a graph exported by tetsnn (decay 0.5, dt = 1e-4) comes back with decay 0.5 and its
threshold exactly.

Nodes: LIF, IF, CubaLIF (tau_syn = dt), Conv2d, Linear, Affine, AvgPool2d, SumPool2d, Flatten,
Threshold (a stateless spike ``x > threshold`` with the neuron's surrogate gradient), Input, Output.
A node with several incoming edges receives their sum (residual connections). Neuron parameters must
be the same for every neuron of a node; anything else (a leak or reset other than 0, a decay outside
[0, 1], recurrent edges, nested graphs, other node types) is a ValueError naming the node.

The model runs layer by layer over the whole sequence ``[N, T, ...]``, as every tetsnn model does, so
it trains with TET like any other (surrogate and backend keywords go to its neurons).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .export import DEFAULT_DT, check_dt, nir_module, node_name
from .layers import SeqToANNContainer, Threshold, add_time_dim
from .models.base import SpikingModel
from .neuron import LIF

__all__ = ["from_nir", "NIRModel"]


def _read(graph_or_path):
    nir = nir_module()
    if isinstance(graph_or_path, (str, os.PathLike)):
        try:
            return nir.read(os.fspath(graph_or_path))
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{os.fspath(graph_or_path)}: not a readable NIR graph ({e})") from None
    if not isinstance(graph_or_path, nir.NIRGraph):
        raise ValueError(f"from_nir expects a nir.NIRGraph or a path, got {type(graph_or_path).__name__}")
    return graph_or_path


def _uniform(name: str, node, field: str) -> np.float32:
    """The one value of the per-neuron parameter ``field`` (an error unless all neurons share it)."""
    a = np.asarray(getattr(node, field), dtype=np.float32)
    if a.size == 0 or np.any(a != a.flat[0]):
        raise ValueError(f"node {name!r}: {field} differs between neurons; tetsnn neurons share one value per layer")
    return a.flat[0]


def _neuron(name: str, node, dt: float, neuron_kw) -> LIF:
    """The tetsnn LIF/IF that one Euler step of ``node`` amounts to (see the module docstring)."""
    nir = nir_module()
    f = lambda field: _uniform(name, node, field)  # noqa: E731
    dt32 = np.float32(dt)
    if isinstance(node, nir.IF):
        decay, gain = np.float32(1.0), f("r") * dt32
    elif isinstance(node, nir.LIF):
        decay, gain = np.float32(1.0) - dt32 / f("tau"), f("r") * dt32 / f("tau")
    else:  # CubaLIF
        if f("tau_syn") != dt32:
            raise ValueError(f"node {name!r}: CubaLIF with tau_syn={float(f('tau_syn'))} != dt={dt} has a "
                             f"synaptic current that tetsnn's LIF cannot express (tau_syn = dt reduces to LIF)")
        decay, gain = np.float32(1.0) - dt32 / f("tau_mem"), f("r") * f("w_in") * dt32 / f("tau_mem")
    for field in ("v_leak", "v_reset"):
        if hasattr(node, field) and f(field) != 0:
            raise ValueError(f"node {name!r}: {field}={float(f(field))}; tetsnn neurons have no leak potential "
                             f"and reset to 0")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"node {name!r}: decay 1 - dt/tau = {float(decay)} at dt={dt} is outside [0, 1] "
                         f"(forward Euler with a step longer than tau)")
    if not gain > 0:
        raise ValueError(f"node {name!r}: input gain r*dt/tau = {float(gain)} is not positive")
    return LIF(tau=float(decay), threshold=float(f("v_threshold") / gain), reset="hard", **neuron_kw)


def _ints(v, n=2):
    v = np.asarray(v).astype(int).reshape(-1)
    return tuple(int(i) for i in (np.repeat(v, n) if v.size == 1 else v))


def _layer(name: str, node, dt: float, neuron_kw) -> Optional[nn.Module]:
    """The tetsnn module of one NIR node (None for Input/Output, which pass their input on)."""
    nir = nir_module()
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    if isinstance(node, (nir.Input, nir.Output)):
        return None
    if isinstance(node, (nir.LIF, nir.IF, nir.CubaLIF)):
        return _neuron(name, node, dt, neuron_kw)
    if isinstance(node, nir.Conv2d):
        w = t(node.weight)
        padding = node.padding if isinstance(node.padding, str) else _ints(node.padding)
        conv = nn.utils.skip_init(nn.Conv2d, w.shape[1] * int(node.groups), w.shape[0], tuple(w.shape[2:]),
                                  _ints(node.stride), padding, _ints(node.dilation), int(node.groups),
                                  bias=node.bias is not None)       # no random init: the weights are copied in
        with torch.no_grad():
            conv.weight.copy_(w)
            if node.bias is not None:
                conv.bias.copy_(t(node.bias).reshape(-1))
        return SeqToANNContainer(conv)
    if isinstance(node, (nir.Linear, nir.Affine)):
        w = t(node.weight)
        bias = getattr(node, "bias", None)
        fc = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            fc.weight.copy_(w)
            if bias is not None:
                fc.bias.copy_(t(bias).reshape(-1))
        return SeqToANNContainer(fc)
    if isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
        summed = isinstance(node, nir.SumPool2d)
        return SeqToANNContainer(nn.AvgPool2d(_ints(node.kernel_size), _ints(node.stride), _ints(node.padding),
                                              divisor_override=1 if summed else None))
    if isinstance(node, nir.Flatten):    # NIR dims exclude the batch; here the batch is N*T
        end = int(node.end_dim)
        return SeqToANNContainer(nn.Flatten(int(node.start_dim) + 1, end + 1 if end >= 0 else end))
    if isinstance(node, nir.Threshold):
        kw = {k: v for k, v in neuron_kw.items() if k in ("surrogate", "gamma", "alpha")}
        return Threshold(_uniform(name, node, "threshold"), **kw)
    raise ValueError(f"node {name!r}: NIR {type(node).__name__} has no tetsnn counterpart")


def _topological(graph):
    """Node names in an order where every node comes after its inputs, and each node's inputs."""
    preds: Dict[str, List[str]] = {n: [] for n in graph.nodes}
    for src, dst in graph.edges:
        if src not in preds or dst not in preds:
            raise ValueError(f"edge {src!r} -> {dst!r} names a node the graph does not have")
        preds[dst].append(src)
    order, done = [], set()
    while len(order) < len(preds):
        ready = [n for n in preds if n not in done and all(p in done for p in preds[n])]
        if not ready:
            stuck = sorted(n for n in preds if n not in done)
            raise ValueError(f"nodes {stuck} lie on or after a cycle (recurrent connections); tetsnn models "
                             f"are feed-forward")
        order += ready
        done |= set(ready)
    return order, preds


class NIRModel(SpikingModel):
    """A feed-forward network read from a NIR graph (built by :func:`from_nir`)."""

    def __init__(self, graph, dt: float = DEFAULT_DT, T: int = 4, **neuron_kw):
        super().__init__(T)
        nir = nir_module()
        order, preds = _topological(graph)
        inputs = [n for n in order if isinstance(graph.nodes[n], nir.Input)]
        outputs = [n for n in order if isinstance(graph.nodes[n], nir.Output)]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"the graph needs one Input and one Output node, has inputs {inputs} and "
                             f"outputs {outputs}")
        self.dt = dt
        self.layers = nn.ModuleDict()
        self.steps = []          # (key, keys of its inputs), in topological order
        keys: Dict[str, str] = {}
        for name in order:
            node = graph.nodes[name]
            if isinstance(node, nir.NIRGraph):
                raise ValueError(f"node {name!r}: nested NIR graphs are not supported")
            key = node_name(name)
            if key in keys.values():
                raise ValueError(f"node {name!r}: its name clashes with another node's after '.' -> '_'")
            keys[name] = key
            if name != inputs[0] and not preds[name]:
                raise ValueError(f"node {name!r} has no incoming edge")
            layer = _layer(name, node, dt, neuron_kw)
            if layer is not None:
                self.layers[key] = layer
            self.steps.append((key, [keys[p] for p in preds[name]]))
        self.input_key, self.output_key = keys[inputs[0]], keys[outputs[0]]
        self.input_shape = tuple(int(v) for v in np.asarray(graph.nodes[inputs[0]].input_type["input"]).reshape(-1))
        out_type = np.asarray(graph.nodes[outputs[0]].output_type.get("output", []), dtype=object).reshape(-1)
        if out_type.size and all(v is not None for v in out_type):
            self.output_shape = tuple(int(v) for v in out_type)
        else:                   # the graph does not say: one step of one sample tells
            with torch.no_grad():
                self.output_shape = tuple(self.forward_seq(torch.zeros(1, 1, *self.input_shape)).shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A static batch ``[N, *input_shape]`` (repeated T times) or a sequence ``[N, T, *input_shape]``."""
        d = len(self.input_shape)
        if x.dim() == d + 1:
            x = add_time_dim(x, self.T)
        elif x.dim() != d + 2:
            raise ValueError(f"the NIR graph's input is {self.input_shape}: expected a static batch of "
                             f"{d + 1} dims or a sequence of {d + 2}, got shape {tuple(x.shape)}")
        return self.forward_seq(x)

    def forward_seq(self, x: torch.Tensor) -> torch.Tensor:
        values, uses = {}, {}
        for _, srcs in self.steps:
            for s in srcs:
                uses[s] = uses.get(s, 0) + 1
        for key, srcs in self.steps:
            if key == self.input_key:
                v = x
            else:
                v = values[srcs[0]]
                for s in srcs[1:]:
                    v = v + values[s]
                for s in srcs:              # free what no later node reads
                    uses[s] -= 1
                    if uses[s] == 0 and s != self.output_key:
                        del values[s]
            values[key] = self.layers[key](v) if key in self.layers else v
        return values[self.output_key]


def from_nir(graph_or_path, dt: Optional[float] = None, T: int = 4, **neuron_kw) -> NIRModel:
    """A tetsnn model computing what ``graph_or_path`` (a ``nir.NIRGraph`` or a NIR file) computes
    under forward Euler with step ``dt``: an explicit ``dt``, else the graph's ``metadata["dt"]``, else
    1e-4. ``T`` is the number of steps a static input is repeated for; ``neuron_kw`` (surrogate, gamma,
    alpha, backend, detach_reset) go to every neuron. A static batch ``[N, C, H, W]`` or a sequence
    ``[N, T, C, H, W]`` gives per-step outputs ``[N, T, ...]``.
    """
    graph = _read(graph_or_path)
    if dt is None:
        dt = (graph.metadata or {}).get("dt", DEFAULT_DT)
        dt = dt.item() if isinstance(dt, np.ndarray) or isinstance(dt, np.generic) else dt
    return NIRModel(graph, check_dt(dt), T, **neuron_kw)
