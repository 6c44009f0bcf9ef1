"""Export a tetsnn model to NIR, the Neuromorphic Intermediate Representation (the ``nir`` package).

A NIR graph describes the network in continuous time; a simulator integrates it by forward Euler with
a step ``dt`` (``dt = 1e-4`` by default, the step snnTorch and SpikingJelly assume). The neurons are
written so that one Euler step computes tetsnn's step with the membrane scaled by ``1 - decay``
("scaled-membrane" encoding; ``v = (1 - decay) * u``). For ``LIF(decay, threshold)``,
``u = decay * u + x``, spike when ``u > threshold``, hard reset to 0:

- ``nir.LIF(tau = dt / (1 - decay), r = 1, v_leak = 0, v_threshold = threshold * (1 - decay), v_reset = 0)``:
  the Euler step ``v + dt / tau * (v_leak - v + r * x) = decay * v + (1 - decay) * x`` is
  ``(1 - decay) * (decay * u + x)``, and ``v > threshold * (1 - decay)`` exactly when ``u > threshold``.
  For TET's decay 0.5 the scale is a power of two, so every rounding (and every tie) is unchanged.
- ``IF(threshold)``, ``u = u + x``: ``nir.IF(r = 1 / dt, v_threshold = threshold, v_reset = 0)``
  (``v + dt * r * x = u + x``).
- Conv2d / Linear with the BatchNorm that follows them folded in: ``nir.Conv2d``; ``nir.Affine`` for a
  Linear with a bias, ``nir.Linear`` for one without. tdBN folds as BatchNorm; TEBN folds when its
  per-step scale is the same at every step (one graph serves every step) and is refused otherwise.
  PSN / SlidingPSN (a mix over all steps at once) are refused.
- AvgPool2d and AdaptiveAvgPool2d: ``nir.AvgPool2d``, or with ``avgpool="sum"`` ``nir.SumPool2d``
  with the ``1/k^2`` folded into the weights of the Conv2d/Linear after it (for simulators without
  average pooling). Flatten: ``nir.Flatten`` (NIR shapes have no batch dimension). MaxPool2d of
  spikes: ``nir.SumPool2d`` then ``nir.Threshold(0)`` (the max of 0/1 values is 1 exactly when their
  sum is above 0).
- ``tetsnn.Threshold`` (stateless spike): ``nir.Threshold``; AvgPool2d with ``divisor_override=1``:
  ``nir.SumPool2d``. These two are how graphs imported by :func:`tetsnn.from_nir` export again.
- A sum of two tensors (a residual connection, SEW-ResNet's ADD): edges from both into the consumer,
  since NIR sums a node's incoming edges.

Node names are the PyTorch module names with ``.`` replaced by ``_`` (NIR importers build modules
named after nodes, and module names cannot contain dots). The graph's metadata holds ``dt`` and
``encoding``. What NIR cannot express raises a ValueError naming the layer: soft reset (NIR neurons
reset to ``v_reset``), element-wise products (SEW-ResNet's AND and IAND), max pooling of non-spikes,
and decay factors outside [0, 1]. Surrogate gradients are training-only and not exported. The graph
is fed one frame per time step (a static image: the same frame at every step), and its neuron state
must start at 0 for every sample, as tetsnn's does.

``nir`` is imported only when a graph is built, so ``import tetsnn`` works without it.
"""
from __future__ import annotations

import importlib
import itertools
import math
import operator
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .layers import SeqToANNContainer, Threshold
from .neuron import LIF, PSN, SlidingPSN, SpikingNeuron
from .norm import TEBN
from .utils import atomic_path

__all__ = ["export_nir", "to_nir", "ENCODING", "DEFAULT_DT"]

ENCODING = "scaled-membrane"   # metadata["encoding"]: v = (1 - decay) * u, see above
DEFAULT_DT = 1e-4

_SUMS = (operator.add, operator.iadd, torch.add)
_PRODUCTS = (operator.mul, operator.imul, torch.mul, operator.sub, operator.isub, torch.sub)
_PASS_THROUGH = (nn.Identity, nn.Dropout)


def nir_module():
    """The ``nir`` package, imported on first use."""
    try:
        return importlib.import_module("nir")
    except ImportError:
        raise ImportError("NIR export and import need the nir package: pip install nir") from None


def check_dt(dt) -> float:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt must be a positive number, got {dt!r}")
    return float(dt)


def node_name(module_name: str) -> str:
    """NIR node name of a module: dots (invalid in the PyTorch module names importers create) become '_'."""
    return module_name.replace(".", "_")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _pair(v) -> np.ndarray:
    return np.array(v if isinstance(v, (tuple, list)) else (v, v))


class _Tracer(fx.Tracer):
    """Keeps neurons and per-step containers whole: they become graph nodes of their own."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (SpikingNeuron, PSN, SlidingPSN, SeqToANNContainer, Threshold)) or super().is_leaf_module(m, qualname)


class _Steps(nn.Module):
    """The model's sequence path ``[N, T, ...] -> [N, T, classes]``, without the static-input branch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_seq(x) if hasattr(self.model, "forward_seq") else self.model(x)


class _Value:
    """What a traced tensor is in the NIR graph: ``scale`` times the sum of the outputs of ``sources``.

    ``scale`` is not 1 only after an average pooling written as a sum pooling; the Conv2d/Linear that
    consumes the value multiplies its weights by it.
    """

    def __init__(self, sources: List[str], shape: Tuple[int, ...], spikes: bool = False, scale: float = 1.0):
        self.sources, self.shape, self.spikes, self.scale = sources, tuple(shape), spikes, scale


class _Builder:
    def __init__(self, dt: float, avgpool: str):
        self.dt, self.avgpool = dt, avgpool
        self.nodes: Dict[str, "nir.NIRNode"] = {}
        self.edges: List[Tuple[str, str]] = []

    def add(self, name: str, node, sources: Sequence[str]) -> List[str]:
        name = node_name(name)
        if name in self.nodes:
            raise ValueError(f"two layers map to the NIR node name {name!r}; rename one of them")
        self.nodes[name] = node
        self.edges += [(s, name) for s in sources]
        return [name]


def _unscaled(value: _Value, what: str) -> _Value:
    if value.scale != 1.0:
        raise ValueError(f"{what}: an average pooling written as SumPool2d (avgpool='sum') must be followed by a "
                         f"Conv2d or Linear to take its 1/k^2; export with avgpool='avg'")
    return value


# --------------------------------------------------------------------------- single layers

def neuron_node(name: str, neuron: LIF, shape, dt: float = DEFAULT_DT):
    """The NIR neuron that, integrated by forward Euler with step ``dt``, matches ``neuron`` (membrane
    scaled by ``1 - decay``)."""
    nir = nir_module()
    if not isinstance(neuron, LIF):
        raise ValueError(f"layer {name!r}: {type(neuron).__name__} has no NIR neuron (NIR's neurons emit binary "
                         f"spikes); export a model of LIF, PLIF or IF neurons")
    if neuron.decay_input:
        raise ValueError(f"layer {name!r}: decay_input=True scales the input by 1 - tau, which tetsnn's NIR "
                         f"mapping does not express; export a model trained with decay_input=False")
    if neuron.reset != "hard":
        raise ValueError(f"layer {name!r}: {neuron.reset} reset cannot be expressed in NIR, whose LIF/IF "
                         f"neurons reset to v_reset (hard reset); train with reset='hard' to export")
    full = lambda v: np.full(shape, v, dtype=np.float32)  # noqa: E731
    decay = neuron.tau
    if decay == 1.0:
        return nir.IF(r=full(1.0 / dt), v_threshold=full(neuron.threshold), v_reset=full(0.0))
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"layer {name!r}: decay factor tau={decay} has no NIR LIF equivalent "
                         f"(needs 0 <= tau < 1, or tau = 1 for IF)")
    return nir.LIF(tau=full(dt / (1.0 - decay)), r=full(1.0), v_leak=full(0.0),
                   v_threshold=full(neuron.threshold * (1.0 - decay)), v_reset=full(0.0))


def fold_batchnorm(weight: torch.Tensor, bias, bn: nn.modules.batchnorm._BatchNorm, name: str):
    """Weight and bias of a Conv2d/Linear followed by ``bn`` (inference statistics) as one layer."""
    if bn.running_mean is None:
        raise ValueError(f"layer {name!r}: BatchNorm without running statistics cannot be folded")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * scale.view(-1, *[1] * (weight.dim() - 1)), bias * scale + shift


def _pool_nodes(b: _Builder, name: str, k, s, padding) -> Tuple[list, float]:
    """An average pooling as ``nir.AvgPool2d``, or as ``nir.SumPool2d`` and a pending factor 1/k^2."""
    nir = nir_module()
    if b.avgpool == "sum":
        return [(name, nir.SumPool2d(k, s, padding))], 1.0 / float(np.prod(k))
    return [(name, nir.AvgPool2d(k, s, padding))], 1.0


def _layer_nodes(b: _Builder, name: str, m: nn.Module, bn, shape, value: _Value):
    """NIR node(s) for one layer ``m`` (and the BatchNorm ``bn`` folded into it) on input ``shape``,
    and the factor still pending on its output."""
    nir = nir_module()
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        weight, bias = m.weight, m.bias
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn, name)
        weight = weight * value.scale
        if isinstance(m, nn.Linear):
            return [(name, nir.Linear(_np(weight)) if bias is None else nir.Affine(_np(weight), _np(bias)))], 1.0
        if m.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: padding_mode={m.padding_mode!r} cannot be expressed in NIR")
        bias = torch.zeros_like(weight[:, 0, 0, 0]) if bias is None else bias
        padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        return [(name, nir.Conv2d(tuple(shape[1:]), _np(weight), tuple(m.stride), padding, tuple(m.dilation),
                                  m.groups, _np(bias)))], 1.0
    if isinstance(m, nn.Flatten):
        if m.start_dim == 0:
            raise ValueError(f"layer {name!r}: Flatten(start_dim=0) flattens the batch dimension")
        end = m.end_dim - 1 if m.end_dim > 0 else m.end_dim
        return [(name, nir.Flatten({"input": np.array(shape)}, m.start_dim - 1, end))], value.scale
    _unscaled(value, f"layer {name!r}")
    if isinstance(m, nn.AvgPool2d):
        k = _pair(m.kernel_size)
        s = k if m.stride is None else _pair(m.stride)
        if m.divisor_override == 1 and not m.ceil_mode:         # a sum pooling
            return [(name, nir.SumPool2d(k, s, _pair(m.padding)))], 1.0
        if m.ceil_mode or m.divisor_override or (not m.count_include_pad and np.any(_pair(m.padding))):
            raise ValueError(f"layer {name!r}: ceil_mode, divisor_override other than 1 and count_include_pad=False "
                             f"cannot be expressed in NIR")
        return _pool_nodes(b, name, k, s, _pair(m.padding))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = np.array(shape[1:])
        out = np.where(np.array([v is None for v in _pair(m.output_size)]), size,
                       [v or 0 for v in _pair(m.output_size)])
        if np.any(size % out):
            raise ValueError(f"layer {name!r}: adaptive pooling of {tuple(size)} to {tuple(out)} has no "
                             f"fixed kernel; NIR needs one")
        k = size // out
        return _pool_nodes(b, name, k, k, np.array([0, 0]))
    if isinstance(m, nn.MaxPool2d):
        if not value.spikes:
            raise ValueError(f"layer {name!r}: NIR has no max pooling; tetsnn exports the max pooling of "
                             f"spikes only (as sum pooling and a threshold at 0)")
        if m.ceil_mode or np.any(_pair(m.dilation) != 1):
            raise ValueError(f"layer {name!r}: max pooling with ceil_mode or dilation cannot be expressed in NIR")
        k = _pair(m.kernel_size)
        s = k if m.stride is None else _pair(m.stride)
        return [(name, nir.SumPool2d(k, s, _pair(m.padding))),
                (f"{name}.threshold", nir.Threshold(np.zeros(_output_shape(m, shape), dtype=np.float32)))], 1.0
    raise ValueError(f"layer {name!r}: {type(m).__name__} cannot be exported to NIR")


@torch.no_grad()
def _output_shape(m: nn.Module, shape) -> Tuple[int, ...]:
    """Per-sample output shape of layer ``m`` for per-sample input ``shape`` (on the layer's device and dtype)."""
    p = next(itertools.chain(m.parameters(), m.buffers()), None)
    kw = {} if p is None or not p.is_floating_point() else dict(device=p.device, dtype=p.dtype)
    return tuple(m(torch.zeros(1, *shape, **kw)).shape[1:])


def _container_layers(name: str, c: SeqToANNContainer) -> List[Tuple[str, nn.Module]]:
    if isinstance(c.module, nn.Sequential):
        return [(f"{name}.module.{i}", m) for i, m in enumerate(c.module)]
    return [(f"{name}.module", c.module)]


def _add_layers(b: _Builder, layers: List[Tuple[str, nn.Module]], value: _Value) -> _Value:
    """Append per-step layers (a BatchNorm is folded into the Conv2d/Linear before it) to the graph."""
    i = 0
    while i < len(layers):
        name, m = layers[i]
        bn = None
        if isinstance(m, (nn.Conv2d, nn.Linear)) and i + 1 < len(layers) and \
                isinstance(layers[i + 1][1], (nn.BatchNorm1d, nn.BatchNorm2d, TEBN)):
            bn = layers[i + 1][1]
            if isinstance(bn, TEBN):  # one BatchNorm when every step has the same scale
                bn = bn.folded_batchnorm(layers[i + 1][0])
            i += 1
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, TEBN)):
            raise ValueError(f"layer {name!r}: a BatchNorm not right after a Conv2d/Linear cannot be folded; "
                             f"NIR has no BatchNorm node")
        i += 1
        if isinstance(m, _PASS_THROUGH):
            continue
        out_shape = _output_shape(m, value.shape)
        nodes, scale = _layer_nodes(b, name, m, bn, value.shape, value)
        sources = value.sources
        for nname, node in nodes:
            sources = b.add(nname, node, sources)
        spikes = value.spikes and isinstance(m, (nn.Flatten, nn.MaxPool2d))
        value = _Value(sources, out_shape, spikes, scale)
    return value


# --------------------------------------------------------------------------- whole models

def to_nir(model: nn.Module, input_shape: Sequence[int], dt: float = DEFAULT_DT, avgpool: str = "avg"):
    """The NIR graph of ``model`` for one sample and one time step of shape ``input_shape`` ``(C, H, W)``,
    for forward-Euler simulation with step ``dt``. ``avgpool="sum"`` writes average pooling as
    ``SumPool2d`` with its ``1/k^2`` folded into the next Conv2d/Linear. Nodes are in topological order.
    """
    nir = nir_module()
    dt = check_dt(dt)
    if avgpool not in ("avg", "sum"):
        raise ValueError(f"avgpool must be 'avg' or 'sum', got {avgpool!r}")
    input_shape = tuple(int(v) for v in input_shape)
    for name, m in model.named_modules():
        if getattr(m, "multiplies_activations", False):
            raise ValueError(f"layer {name!r}: {type(m).__name__} multiplies two activations (attention); NIR has "
                             f"no such product, so the model cannot be exported to NIR")
    was_training = model.training
    model.eval()
    try:
        try:
            graph = _Tracer().trace(_Steps(model))
        except Exception as e:  # data-dependent control flow and the like
            raise ValueError(f"{type(model).__name__} cannot be traced for export: "
                             f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
        b = _Builder(dt, avgpool)
        modules = dict(model.named_modules())
        env: Dict[fx.Node, _Value] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node] = _Value(b.add("input", nir.Input({"input": np.array(input_shape)}), []), input_shape)
            elif node.op == "call_module":
                name = node.target.removeprefix("model.")
                m, arg = modules[name], env[node.args[0]]
                if isinstance(m, SpikingNeuron):
                    _unscaled(arg, f"layer {name!r}")
                    env[node] = _Value(b.add(name, neuron_node(name, m, arg.shape, dt), arg.sources), arg.shape, True)
                elif isinstance(m, (PSN, SlidingPSN)):
                    raise ValueError(f"layer {name!r}: {type(m).__name__} mixes all time steps at once (no NIR "
                                     f"neuron does); it cannot be exported to NIR")
                elif isinstance(m, Threshold):
                    _unscaled(arg, f"layer {name!r}")
                    thr = nir.Threshold(np.full(arg.shape, m.threshold, dtype=np.float32))
                    env[node] = _Value(b.add(name, thr, arg.sources), arg.shape, True)
                elif isinstance(m, SeqToANNContainer):
                    env[node] = _add_layers(b, _container_layers(name, m), arg)
                else:
                    env[node] = _add_layers(b, [(name, m)], arg)
            elif node.op == "call_function" and node.target in _SUMS:
                env[node] = _sum(node, env)
            elif node.op == "output":
                out = _unscaled(env[node.args[0]], "output")
                b.add("output", nir.Output({"output": np.array(out.shape)}), out.sources)
            elif node.op == "call_function" and node.target in _PRODUCTS:
                raise ValueError(f"{type(model).__name__}: {node.name} multiplies or subtracts tensors; NIR sums "
                                 f"incoming edges but has no element-wise product, so SEW-ResNet's AND/IAND "
                                 f"connections cannot be exported (ADD can)")
            else:
                raise ValueError(f"{type(model).__name__}: {node.op} {node.target} has no NIR counterpart")
    finally:
        model.train(was_training)
    return nir.NIRGraph(b.nodes, b.edges, metadata={"exporter": "tetsnn", "dt": dt, "encoding": ENCODING,
                                                   "model": type(model).__name__})


def _sum(node: fx.Node, env) -> _Value:
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        raise ValueError(f"{node.name}: only the sum of two tensors can be expressed in NIR (as edges)")
    a, b = (env[x] for x in node.args)
    _unscaled(a, node.name), _unscaled(b, node.name)
    if a.shape != b.shape or set(a.sources) & set(b.sources):
        raise ValueError(f"{node.name}: a sum of tensors of shapes {a.shape} and {b.shape} from sources "
                         f"{a.sources} and {b.sources} cannot be expressed as NIR edges")
    return _Value(a.sources + b.sources, a.shape)


def export_nir(model: nn.Module, path, input_shape: Sequence[int], dt: float = DEFAULT_DT, avgpool: str = "avg"):
    """Write ``model`` as a NIR graph to ``path`` (HDF5, read back with ``nir.read``) and return the graph.

    ``input_shape`` is the shape of one sample at one time step, ``(C, H, W)``; ``dt`` the simulator's
    Euler step; ``avgpool`` as in :func:`to_nir`.
    """
    graph = to_nir(model, input_shape, dt, avgpool)
    with atomic_path(path) as tmp:
        nir_module().write(tmp, graph)
    return graph
