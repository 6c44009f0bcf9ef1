"""tetsnn against SpikingJelly, snnTorch and Norse on the same networks with the same weights.

    python benchmarks/bench_frameworks.py [--rounds 7] [--quick] [--nets vggsnn resnet19 linear]

Networks (float32 on the CPU; ``--quick`` shrinks every size to check the script in seconds):

- ``vggsnn``: TET's VGGSNN, T=10, [N, 2, 48, 48] sequences;
- ``resnet19``: TET's ResNet19, T=4, [N, 3, 32, 32] repeated over time;
- ``linear``: one Linear layer into 4,096 LIF neurons, batch 16, T=250, 128 inputs per step. The
  public Open Neuromorphic framework benchmark runs 16,384 neurons for T=500; this is that layer
  scaled down 4x in width and 2x in time for a 2-core CPU, with a narrow input so that the neuron,
  not the matrix product, takes the time. Its loss is the sum of the output spikes, as in that
  benchmark (``output.sum()`` before ``backward`` in every framework's timed pass), so the loss keeps
  nothing and the bytes kept for backward are the layer's own.

Settings: tetsnn (default model), tetsnn with ``memory="min"`` (each spiking block keeps only its input,
as bits where it is spikes, and recomputes the rest in backward; bit-identical to the default mode, so
it is proven equal to tetsnn's default build; for ``linear`` the Linear + LIF pair is one block), its
ANN twin (``neuron="relu"``, the same layers with ReLU: the floor for this design), SpikingJelly 2.0 (plain, and ``memopt.optimize_memory(level=1)``:
checkpointing plus spike compression; levels 2-4 search CUDA memory), snnTorch 1.0 and Norse 1.1.
Every framework build copies tetsnn's weights and is first proven equal to tetsnn in float64
(:func:`check_equal`: outputs and every parameter gradient). How each framework's conventions are
mapped (see :data:`CONVENTIONS`):

- layout: tetsnn is batch-first ``[N, T, ...]``; the others run time-first ``[T, N, ...]`` (their
  builds transpose in and out, as their users do). Conv, BatchNorm and Linear run on all ``T*N``
  samples at once in every build, so BatchNorm pools its statistics over batch and time as TET's does
  (SpikingJelly: ``layer.SeqToANNContainer``; snnTorch and Norse, which step the whole network one
  time step at a time, would normalise each step on its own: their builds run those layers over the
  flattened sequence and loop the neuron over time);
- LIF: tetsnn ``u = 0.5 u + x``, fire on ``u > 1``, hard reset to 0, TET's triangle surrogate
  ``max(0, 1 - |u - 1|)``, gradient through the reset;
- SpikingJelly ``LIFNode(tau=2.0, decay_input=False, v_reset=0.0)``: tau is a time constant, the
  decay is ``1 - 1/tau = 0.5``; it fires on ``>=``: ``v_threshold`` is the next float above 1.0
  (``math.nextafter``), so ``u >= v_threshold`` iff ``u > 1`` in float64; surrogate
  ``PiecewiseQuadratic(alpha=1)`` is the same triangle;
- snnTorch ``Leaky(beta=0.5, reset_mechanism="zero")``: its default is reset by subtraction; with
  ``"zero"`` (and the default ``reset_delay=True``) it zeroes the membrane of a neuron that fired
  at the previous step before integrating, which is TET's hard reset. Its reset is always detached
  from the graph, so its gradients equal tetsnn's with ``detach_reset=True`` (outputs are equal
  either way). The triangle is a ``surrogate.custom_surrogate``, whose spikes are float32: they are
  cast to the membrane's dtype;
- Norse ``LIFBoxCell`` (LIF without a synaptic current) integrates ``v += dt * tau_mem_inv *
  (v_leak - v + i)``: with ``dt * tau_mem_inv = 0.5`` that is ``v = 0.5 v + 0.5 i``, so its input
  current is twice TET's input: the factor 2 is folded into the weights of every BatchNorm and
  Linear that feeds a neuron (exact in floating point) and into the residual identity; ``v_th=1``,
  ``v_reset=0``, ``method="triangle", alpha=1``. It fires on ``>``.

Each setting's training step (forward + TET loss or, for ``linear``, the sum of the output spikes,
backward and an SGD step with momentum) is timed interleaved: every round times each setting once,
in an order rotated from round to round; the ratio to tetsnn is taken within each round and the
median over rounds quoted. Bytes kept for backward: the distinct storages ``saved_tensors_hooks``
sees packed during one training forward, parameters and buffers excluded (``bench_lif.saved_bytes``;
a checkpoint's inputs are saved through the same hooks).
Writes benchmarks/results/bench_frameworks.json and its section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lif import mib, saved_bytes, sync, train_step  # noqa: E402

NAME = "bench_frameworks"
FRAMEWORKS = ("spikingjelly", "snntorch", "norse")
PACKAGES = {"spikingjelly": "spikingjelly", "snntorch": "snntorch", "norse": "norse"}

# net -> sizes: T, the input per sample (after the time dim for sequences), batch, and for linear
# the width; "static" input is repeated over T (ResNet19's direct encoding)
NETS = {
    "vggsnn": dict(T=10, input=(2, 48, 48), batch=1, sequence=True),
    "resnet19": dict(T=4, input=(3, 32, 32), batch=1, sequence=False),
    "linear": dict(T=250, input=(128,), batch=16, neurons=4096, sequence=True),
}
QUICK = {
    "vggsnn": dict(T=2, input=(2, 16, 16), batch=1, sequence=True),
    "resnet19": dict(T=2, input=(3, 16, 16), batch=1, sequence=False),
    "linear": dict(T=16, input=(16,), batch=4, neurons=64, sequence=True),
}
EQUAL_SIZES = {  # the float64 equality check (small: it also runs in the tests)
    "vggsnn": dict(T=2, input=(2, 16, 16), batch=1, sequence=True),
    "resnet19": dict(T=2, input=(3, 8, 8), batch=1, sequence=False),
    "linear": dict(T=12, input=(24,), batch=3, neurons=40, sequence=True),
}

CONVENTIONS = {
    "tetsnn": "batch-first [N, T, ...]; u = 0.5 u + x; fires on u > 1; hard reset; triangle surrogate; "
              "gradient through the reset",
    "spikingjelly": "time-first; LIFNode(tau=2.0, decay_input=False, v_reset=0.0): decay 1 - 1/tau = 0.5; fires "
                    "on >=, so v_threshold = nextafter(1.0, inf); PiecewiseQuadratic(alpha=1) = the triangle",
    "snntorch": "time-first loop; Leaky(beta=0.5, reset_mechanism='zero') (default 'subtract'); reset always "
                "detached: gradients equal tetsnn's with detach_reset=True; custom_surrogate triangle, its "
                "float32 spikes cast to the membrane's dtype",
    "norse": "time-first loop; LIFBoxCell with dt * tau_mem_inv = 0.5: v = 0.5 v + 0.5 i, so the input current "
             "is 2x: folded into each BatchNorm / Linear feeding a neuron and the residual identity; "
             "v_th=1, v_reset=0, method='triangle', alpha=1",
}
CANNOT_BUILD = {}  # (framework, net) -> reason; every pair below builds exactly


def has(framework: str) -> bool:
    return importlib.util.find_spec(PACKAGES[framework]) is not None


# --------------------------------------------------------------------------- tetsnn builds

MIN = "tetsnn memory=min"


class LinearBlock(nn.Sequential):
    """Linear + LIF run as one ``memory`` block (:func:`tetsnn.memory.run_block`): with ``"min"`` it keeps
    the layer's input (not spikes: kept as it is) and recomputes the rest in backward."""

    def __init__(self, *modules, memory="default"):
        super().__init__(*modules)
        self.memory = memory

    def forward(self, x):
        from tetsnn.memory import run_block

        return run_block(super().forward, x, 0, self.memory, (self,))


def tetsnn_model(net: str, sizes: dict, **kw) -> nn.Module:
    """tetsnn's network: a registry model, or Linear + LIF for ``linear`` (batch-first)."""
    from tetsnn import LIF, SeqToANNContainer, create_model, make_neuron

    torch.manual_seed(0)
    if net == "linear":
        neuron, memory = kw.pop("neuron", "lif"), kw.pop("memory", "default")
        return LinearBlock(SeqToANNContainer(nn.Linear(sizes["input"][0], sizes["neurons"])),
                           make_neuron(neuron, **kw) if neuron != "lif" else LIF(**kw), memory=memory)
    extra = dict(size=sizes["input"][-1]) if net == "vggsnn" else {}
    return create_model(net, num_classes=10, T=sizes["T"], **extra, **kw)


# --------------------------------------------------------------------------- framework builds

class TimeFlat(nn.Module):
    """Ordinary layers on every step of a time-first ``[T, N, ...]`` sequence at once."""

    def __init__(self, *modules):
        super().__init__()
        self.module = modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    def forward(self, x):
        y = self.module(x.flatten(0, 1))
        return y.view(x.shape[0], x.shape[1], *y.shape[1:])


class Kit:
    """What differs between the framework builds: the per-step container, the LIF over a time-first
    sequence, and the input gain of the LIF (Norse: 2)."""
    gain = 1.0

    def seq(self, *modules):
        return TimeFlat(*modules)

    def lif(self) -> nn.Module:
        raise NotImplementedError

    def reset(self, model):
        pass


class SpikingJellyKit(Kit):
    def __init__(self, detach_reset=False):
        from spikingjelly.activation_based import functional, layer, neuron, surrogate

        self.functional, self.layer, self.neuron, self.surrogate = functional, layer, neuron, surrogate
        self.detach_reset = detach_reset

    def seq(self, *modules):
        return self.layer.SeqToANNContainer(*modules)

    def lif(self):
        return self.neuron.LIFNode(tau=2.0, decay_input=False, v_threshold=math.nextafter(1.0, math.inf),
                                   v_reset=0.0, surrogate_function=self.surrogate.PiecewiseQuadratic(alpha=1.0),
                                   detach_reset=self.detach_reset, step_mode="m")

    def reset(self, model):
        self.functional.reset_net(model)


def _triangle(input_, grad_input, spikes):
    return grad_input * (1.0 - input_.abs()).clamp_min(0)


class SnnTorchLIF(nn.Module):
    def __init__(self):
        super().__init__()
        import snntorch
        from snntorch import surrogate

        spike = surrogate.custom_surrogate(_triangle)
        self.leaky = snntorch.Leaky(beta=0.5, threshold=1.0, reset_mechanism="zero",
                                    spike_grad=lambda v: spike(v).to(v.dtype))

    def forward(self, x):
        mem, out = torch.zeros_like(x[0]), []
        for t in range(x.shape[0]):
            spk, mem = self.leaky(x[t], mem)
            out.append(spk)
        return torch.stack(out)


class SnnTorchKit(Kit):
    def lif(self):
        return SnnTorchLIF()


class NorseLIF(nn.Module):
    def __init__(self):
        super().__init__()
        from norse.torch import LIFBoxCell, LIFBoxParameters

        p = LIFBoxParameters(tau_mem_inv=torch.as_tensor(0.5), v_leak=torch.as_tensor(0.0),
                             v_th=torch.as_tensor(1.0), v_reset=torch.as_tensor(0.0), method="triangle", alpha=1.0)
        self.cell = LIFBoxCell(p, dt=1.0)

    def forward(self, x):
        from norse.torch.functional.lif_box import LIFBoxFeedForwardState

        state, out = LIFBoxFeedForwardState(v=torch.zeros_like(x[0])), []
        for t in range(x.shape[0]):
            z, state = self.cell(x[t], state)
            out.append(z)
        return torch.stack(out)


class NorseKit(Kit):
    gain = 2.0

    def lif(self):
        return NorseLIF()


KITS = {"spikingjelly": SpikingJellyKit, "snntorch": SnnTorchKit, "norse": NorseKit}


def _feeds_lif(m: nn.Module) -> nn.Module:
    m.feeds_lif = True   # its weights take the kit's gain
    return m


class ConvBNLIF(nn.Module):
    def __init__(self, kit, cin, cout, bias):
        super().__init__()
        self.fwd = kit.seq(nn.Conv2d(cin, cout, 3, 1, 1, bias=bias), _feeds_lif(nn.BatchNorm2d(cout)))
        self.lif = kit.lif()

    def forward(self, x):
        return self.lif(self.fwd(x))


class LinearLIF(nn.Module):
    def __init__(self, kit, cin, cout):
        super().__init__()
        self.fwd = kit.seq(_feeds_lif(nn.Linear(cin, cout)))
        self.lif = kit.lif()

    def forward(self, x):
        return self.lif(self.fwd(x))


class BasicBlock(nn.Module):
    """TET's ResNet block, spike after the residual add (same module order as tetsnn's)."""

    def __init__(self, kit, cin, cout, stride):
        super().__init__()
        self.gain = kit.gain
        self.conv1 = kit.seq(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _feeds_lif(nn.BatchNorm2d(cout)))
        self.sn1 = kit.lif()
        self.conv2 = kit.seq(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _feeds_lif(nn.BatchNorm2d(cout)))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = kit.seq(nn.Conv2d(cin, cout, 1, stride, bias=False), _feeds_lif(nn.BatchNorm2d(cout)))
        self.sn2 = kit.lif()

    def forward(self, x):
        if self.downsample is not None:
            identity = self.downsample(x)
        else:
            identity = x if self.gain == 1.0 else x * self.gain
        return self.sn2(self.conv2(self.sn1(self.conv1(x))) + identity)


class FrameworkNet(nn.Module):
    """A network for a time-first framework, called like tetsnn's: batch-first in and out."""

    def __init__(self, kit, net, sizes):
        super().__init__()
        self.kit = kit
        if net == "vggsnn":
            pool = lambda: kit.seq(nn.AvgPool2d(2))  # noqa: E731
            c = sizes["input"][0]
            blocks = []
            for cin, cout, pooled in ((c, 64, False), (64, 128, True), (128, 256, False), (256, 256, True),
                                      (256, 512, False), (512, 512, True), (512, 512, False), (512, 512, True)):
                blocks.append(ConvBNLIF(kit, cin, cout, bias=True))
                if pooled:
                    blocks.append(pool())
            side = sizes["input"][-1] // 16
            self.body = nn.Sequential(*blocks, kit.seq(nn.Flatten(), nn.Linear(512 * side * side, 10)))
        elif net == "resnet19":
            stem = kit.seq(nn.Conv2d(3, 64, 3, 1, 1, bias=False), _feeds_lif(nn.BatchNorm2d(64)))
            layers = [nn.Sequential(stem, kit.lif())]
            for cin, cout, n, stride in ((64, 128, 3, 1), (128, 256, 3, 2), (256, 512, 2, 2)):
                layers += [BasicBlock(kit, cin, cout, stride)] + [BasicBlock(kit, cout, cout, 1) for _ in range(n - 1)]
            layers += [kit.seq(nn.AdaptiveAvgPool2d(1), nn.Flatten()), LinearLIF(kit, 512, 256),
                       kit.seq(nn.Linear(256, 10))]
            self.body = nn.Sequential(*layers)
        else:
            self.body = nn.Sequential(LinearLIF(kit, sizes["input"][0], sizes["neurons"]))

    def forward(self, x):
        self.kit.reset(self)
        return self.body(x.transpose(0, 1).contiguous()).transpose(0, 1)


WEIGHTED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def weighted(model) -> list:
    return [m for m in model.modules() if isinstance(m, WEIGHTED)]


def copy_weights(src: nn.Module, dst: FrameworkNet) -> None:
    """tetsnn's weights (and BatchNorm running statistics) into the framework build, module by
    module in definition order; a BatchNorm or Linear feeding a neuron takes the kit's gain."""
    pairs = list(zip(weighted(src), weighted(dst), strict=True))
    with torch.no_grad():
        for s, d in pairs:
            if type(d) is not type(s) and not isinstance(s, type(d)):
                raise TypeError(f"module order differs: {type(s).__name__} -> {type(d).__name__}")
            d.load_state_dict(s.state_dict())
            if getattr(d, "feeds_lif", False) and dst.kit.gain != 1.0:
                d.weight.mul_(dst.kit.gain)
                if d.bias is not None:
                    d.bias.mul_(dst.kit.gain)


def framework_model(framework: str, net: str, sizes: dict, src: nn.Module, memopt_level: int = 0,
                    example=None, detach_reset=False) -> FrameworkNet:
    kit = KITS[framework](detach_reset) if framework == "spikingjelly" else KITS[framework]()
    model = FrameworkNet(kit, net, sizes)
    copy_weights(src, model)
    model.to(dtype=next(src.parameters()).dtype, device=next(src.parameters()).device).train()
    if memopt_level:
        from spikingjelly.activation_based import memopt

        from spikingjelly.activation_based import neuron

        # levels 2-4: split a conv/linear block into its layers and the neuron, chunk neurons over time
        memopt.optimize_memory(model, (ConvBNLIF, LinearLIF, BasicBlock), lambda m: m(example), level=memopt_level,
                               split_fn=lambda m: (m.fwd, m.lif) if isinstance(m, (ConvBNLIF, LinearLIF)) else (),
                               can_chunk=lambda m: isinstance(m, neuron.BaseNode))
    return model


# --------------------------------------------------------------------------- inputs, loss, step

def make_batch(net, sizes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n, T = sizes["batch"], sizes["T"]
    if net == "linear":
        x = torch.rand(n, T, *sizes["input"], generator=g) * 4.0
        return x.to(dtype=dtype, device=device), None   # no target: the loss is the output's sum
    else:
        shape = (n, T, *sizes["input"]) if sizes["sequence"] else (n, *sizes["input"])
        x = torch.rand(shape, generator=g) * (1.0 if net == "vggsnn" else 2.0) - (0.0 if net == "vggsnn" else 1.0)
        if not sizes["sequence"]:
            x = x.unsqueeze(1).repeat(1, T, 1, 1, 1)   # direct encoding, as tetsnn's model does
        y = torch.randint(0, 10, (n,), generator=g)
    return x.to(dtype=dtype, device=device), y.to(device)


def loss_fn(net, out, y):
    from tetsnn import tet_loss

    # linear: the Open Neuromorphic framework benchmark's loss, the sum of the output
    return out.sum() if net == "linear" else tet_loss(out, y)


# --------------------------------------------------------------------------- equality in float64

def check_equal(net: str, frameworks=FRAMEWORKS, sizes=None, memopt=True, snntorch_grads=True,
                device="cpu", tetsnn_min=True) -> dict:
    """Each framework build against tetsnn in float64 on one small batch: the largest output
    difference and the largest parameter-gradient difference relative to the largest gradient.
    snnTorch's reset is always detached, so its gradients are compared with tetsnn's at
    ``detach_reset=True`` (one more tetsnn pass; ``snntorch_grads=False`` compares its outputs only).
    ``memopt`` adds SpikingJelly with ``memopt.optimize_memory(level=1)``; ``tetsnn_min`` adds tetsnn's
    ``memory="min"`` build (bit-identical to the default: both differences are 0). Frameworks whose
    package is absent are left out."""
    sizes = sizes or EQUAL_SIZES[net]
    x, y = make_batch(net, sizes, torch.float64, device, seed=1)
    refs, out = {}, {}

    def reference(detach):
        if detach not in refs:
            ref = tetsnn_model(net, sizes, detach_reset=detach).to(device, torch.float64).train()
            o = ref(x)
            loss_fn(net, o, y).backward()
            refs[detach] = (ref, o.detach())
        return refs[detach]

    for fw in frameworks:
        if not has(fw):
            continue
        grads = fw != "snntorch" or snntorch_grads
        ref, ref_out = reference(fw == "snntorch" and grads)
        for level in ((0, 1) if fw == "spikingjelly" and memopt else (0,)):
            model = framework_model(fw, net, sizes, ref, level, example=x)
            o = model(x)
            res = dict(output_max_abs_diff=(o - ref_out).abs().max().item(), spikes=int(ref_out.ne(0).sum()))
            if grads:
                loss_fn(net, o, y).backward()
                diffs, scale = [0.0], 0.0
                for s, d in zip(weighted(ref), weighted(model), strict=True):
                    gain = model.kit.gain if getattr(d, "feeds_lif", False) else 1.0
                    for name in ("weight", "bias"):
                        ps, pd = getattr(s, name, None), getattr(d, name, None)
                        if ps is not None and ps.grad is not None:
                            diffs.append((ps.grad - pd.grad * gain).abs().max().item())
                            scale = max(scale, ps.grad.abs().max().item())
                res.update(grad_max_rel_diff=max(diffs) / (scale or 1.0),
                           reference="tetsnn, detach_reset=True" if fw == "snntorch" else "tetsnn")
            out[fw if level == 0 else f"{fw} memopt {level}"] = res
    if tetsnn_min:
        ref, ref_out = reference(False)
        low = tetsnn_model(net, sizes, memory="min").to(device, torch.float64).train()
        low.load_state_dict(tetsnn_model(net, sizes).state_dict())   # the reference's weights, before its step
        o = low(x)
        loss_fn(net, o, y).backward()
        diffs = [(a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), low.parameters(), strict=True)]
        scale = max(a.grad.abs().max().item() for a in ref.parameters())
        out[MIN] = dict(output_max_abs_diff=(o - ref_out).abs().max().item(), spikes=int(ref_out.ne(0).sum()),
                        grad_max_rel_diff=max(diffs) / (scale or 1.0), reference="tetsnn")
    return out


# --------------------------------------------------------------------------- timing and saved bytes

def settings(net: str, sizes: dict, x, memopt_levels=(1,), device="cpu", failed=None) -> dict:
    """Setting name -> float32 model on ``device``, every one with tetsnn's weights. A memopt level
    that SpikingJelly cannot apply is left out, its error in ``failed`` (a dict) when given, else raised."""
    out = {"tetsnn": tetsnn_model(net, sizes).to(device).train()}
    src = out["tetsnn"]
    ann = tetsnn_model(net, sizes, neuron="relu").to(device).train()
    ann.load_state_dict(src.state_dict())
    out["tetsnn ANN twin (ReLU)"] = ann
    low = tetsnn_model(net, sizes, memory="min").to(device).train()
    low.load_state_dict(src.state_dict())
    out[MIN] = low
    for fw in FRAMEWORKS:
        if not has(fw) or (fw, net) in CANNOT_BUILD:
            continue
        out[LABELS[fw]] = framework_model(fw, net, sizes, src)
        if fw == "spikingjelly":
            for level in memopt_levels:
                name = f"{LABELS[fw]}, memopt level {level}"
                try:
                    out[name] = framework_model(fw, net, sizes, src, level, example=x)
                except Exception as e:  # noqa: BLE001 - reported as the framework's limit
                    if failed is None:
                        raise
                    failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return out


LABELS = {"spikingjelly": "SpikingJelly", "snntorch": "snnTorch", "norse": "Norse"}


def measure(net: str, sizes: dict, rounds: int, memopt_levels=(1,), device="cpu", peak=None, failed=None) -> dict:
    """Interleaved step times and bytes kept for backward of every setting on one net (with
    ``peak``, a function of a step returning its peak memory, that too)."""
    x, y = make_batch(net, sizes, torch.float32, device)
    models = settings(net, sizes, x, memopt_levels, device, failed)
    steps = {k: train_step(m, x, y, loss=lambda out, y: loss_fn(net, out, y)) for k, m in models.items()}
    res = {k: {} for k in steps}
    for k, (step, forward) in steps.items():
        step()   # warm-up (numba and Triton compile on first use)
        res[k]["saved_bytes"] = saved_bytes(forward, exclude=models[k])
        if peak is not None:
            res[k]["peak_bytes"] = peak(step)
    names, times = list(steps), {k: [] for k in steps}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:   # a different order every round
            sync(device)
            t0 = time.perf_counter()
            steps[k][0]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    base = times["tetsnn"]
    for k, t in times.items():
        per_round = sorted(a / b for a, b in zip(t, base))
        res[k].update(median_s=round(statistics.median(t), 4), vs_tetsnn=round(statistics.median(per_round), 3),
                      rounds_vs_tetsnn=[round(v, 3) for v in per_round], times_s=[round(v, 4) for v in t],
                      saved_vs_tetsnn=round(res[k]["saved_bytes"] / max(res["tetsnn"]["saved_bytes"], 1), 3))
    print(net, json.dumps({k: (v["vs_tetsnn"], v["saved_vs_tetsnn"]) for k, v in res.items()}), flush=True)
    return res


# --------------------------------------------------------------------------- report

def describe(net: str, s: dict) -> str:
    if net == "linear":
        scaled = (" (the Open Neuromorphic benchmark's 16,384 neurons and T=500, scaled down for the CPU)"
                  if (s["neurons"], s["T"]) != (16384, 500) else " (the Open Neuromorphic benchmark's layer)")
        return f"Linear {s['input'][0]} -> {s['neurons']:,} + LIF, T={s['T']}, batch {s['batch']}{scaled}"
    shape = " x ".join(map(str, s["input"]))
    return f"{net}, T={s['T']}, {shape}, batch {s['batch']}"


def markdown(res: dict) -> str:
    lines = [f"## SNN frameworks side by side (`benchmarks/bench_frameworks.py`, {res['device']}, {res['cpu_count']} "
             f"CPUs, torch {res['torch']}, commit {res['commit']}{', --quick sizes' if res['quick'] else ''})", "",
             "The same networks with tetsnn's weights in " + ", ".join(
                 f"{LABELS[f]} {v}" for f, v in res["versions"].items() if v) + ", first shown equal to tetsnn in "
             "float64 (outputs and every parameter gradient, on a small batch), then timed in float32: a "
             "training step is forward, loss, backward and an SGD step with momentum. "
             f"{res['rounds']} interleaved rounds; each ratio is the median of the per-round ratios to tetsnn, the "
             "bracket the lowest and highest round. Bytes kept for backward: the distinct storages autograd saves "
             "in one training forward, parameters and buffers excluded.",
             f"Load average (1, 5, 15 min) at the start: {', '.join(f'{v:.1f}' for v in res['load_average'])}."]
    for net, rows in res["measured"].items():
        kept = res.get("net_commits", {}).get(net)
        lines += ["", f"### {describe(net, res['sizes'][net])}" + (f" (kept from the run at commit {kept})" if kept else ""), "",
                  "| setting | step | vs tetsnn | kept for backward | vs tetsnn |", "|---|---|---|---|---|"]
        for k, r in rows.items():
            rr = r["rounds_vs_tetsnn"]
            lines.append(f"| {k} | {r['median_s'] * 1e3:,.0f} ms | {r['vs_tetsnn']}x [{rr[0]:.2f}-{rr[-1]:.2f}] | "
                         f"{mib(r['saved_bytes'])} | {r['saved_vs_tetsnn']}x |")
        if net == "linear":
            lines += ["", "The loss is the sum of the output spikes, as in the Open Neuromorphic benchmark: it keeps "
                          "nothing for backward, so the bytes are the layer's own. A setting that keeps only the "
                          "layer's input (a checkpoint of the Linear + LIF block) is at the floor."]
    lines += ["", "### Equal outputs and gradients in float64", "",
              "| network | framework | largest output difference | largest gradient difference (relative) | "
              "compared with |", "|---|---|---|---|---|"]
    for net, rows in res["equality"].items():
        for fw, r in rows.items():
            lines.append(f"| {net} | {fw} | {r['output_max_abs_diff']:.1e} | {r.get('grad_max_rel_diff', 0):.1e} | "
                         f"{r.get('reference', 'tetsnn')} |")
    lines += ["", "snnTorch's `custom_surrogate` makes float32 spikes, so its gradients pass through float32 and "
                  "agree to about 1e-8; the others agree to rounding.", "",
              "### How each framework's conventions were mapped", "",
              "| framework | mapping |", "|---|---|"]
    lines += [f"| {LABELS.get(f, f)} | {v} |" for f, v in CONVENTIONS.items()]
    if CANNOT_BUILD:
        lines += ["", "Not built: " + "; ".join(f"{LABELS[f]} {n}: {why}" for (f, n), why in CANNOT_BUILD.items())]
    else:
        lines += ["", "Every framework builds every network exactly. SpikingJelly's memopt levels 2-4 search "
                      "peak CUDA memory and run only on a GPU (`benchmarks/gpu_check.py`, section frameworks)."]
    goals = []
    for net, rows in res["measured"].items():
        others = {k: r for k, r in rows.items() if not k.startswith("tetsnn")}
        if others:
            worst = min(r["vs_tetsnn"] for r in others.values())
            goals.append((f"{net}: tetsnn faster than every other setting (fastest other setting / tetsnn)",
                          ">= 1.00x", f"{worst}x", worst >= 1.0))
        twin = rows.get("tetsnn ANN twin (ReLU)")
        if twin:
            v = round(1 / twin["vs_tetsnn"], 3) if twin["vs_tetsnn"] else None
            goals.append((f"{net}: tetsnn step vs its ANN twin", "<= 1.00x", f"{v}x", v is not None and v <= 1.0))
    for net, rows in res["measured"].items():
        low, others = rows.get(MIN), {k: r for k, r in rows.items() if not k.startswith("tetsnn")}
        if low is None or not others:
            continue
        leanest = min(others, key=lambda k: others[k]["saved_bytes"])
        v = round(low["saved_bytes"] / max(others[leanest]["saved_bytes"], 1), 3)
        goals.append((f"{net}: tetsnn memory=min bytes kept vs the leanest other setting ({leanest})", "<= 0.50x",
                      f"{v}x", v <= 0.5))
        memopt = f"{LABELS['spikingjelly']}, memopt level 1"
        if memopt in rows and "times_s" in low:
            v = round(statistics.median(a / b for a, b in zip(low["times_s"], rows[memopt]["times_s"])), 3)
            goals.append((f"{net}: tetsnn memory=min step vs {memopt} (median per-round ratio)", "< 1.00x",
                          f"{v}x", v < 1.0))
    if "linear" in res["measured"]:
        others = [r["vs_tetsnn"] for k, r in res["measured"]["linear"].items() if not k.startswith("tetsnn")]
        if others:
            goals.append(("linear (LIF-bound): fastest other setting / tetsnn", ">= 3x", f"{min(others)}x",
                          min(others) >= 3))
    lines += ["", "### Goals", "", "| measure | goal | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {m} | {g} | {v} | {'meets' if ok else 'misses'} the goal |" for m, g, v, ok in goals]
    return "\n".join(lines)


def versions() -> dict:
    from importlib import metadata

    out = {}
    for fw in FRAMEWORKS:
        try:
            out[fw] = metadata.version(PACKAGES[fw])
        except metadata.PackageNotFoundError:
            out[fw] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, to check the script: prints the table, writes no files")
    p.add_argument("--nets", nargs="+", choices=list(NETS), default=["linear", "resnet19", "vggsnn"],
                   help="networks to run, in this order (default: all, the cheapest first)")
    args = p.parse_args(argv)
    from report import commit, write_results

    sizes = QUICK if args.quick else NETS
    t0 = time.time()
    res = dict(device="cpu", machine=platform.machine(), cpu_count=os.cpu_count(), torch=torch.__version__,
               torch_threads=torch.get_num_threads(), versions=versions(), commit=commit(), quick=args.quick,
               rounds=args.rounds, sizes={n: sizes[n] for n in args.nets}, load_average=os.getloadavg(),
               equality={}, measured={})
    last = Path(__file__).resolve().parent / "results" / f"{NAME}.json"
    if not args.quick and last.exists():   # the networks not run this time keep their last run, marked with its commit
        old = json.loads(last.read_text())
        for net in [n for n in old.get("measured", {}) if n not in args.nets]:
            res["measured"][net], res["equality"][net] = old["measured"][net], old["equality"].get(net, {})
            res["sizes"][net] = old["sizes"][net]
            res.setdefault("net_commits", {})[net] = old.get("net_commits", {}).get(net, old["commit"])
    for net in args.nets:   # each network proven equal, then timed; the results written after each
        res["equality"][net] = check_equal(net)
        bad = {k: r for k, r in res["equality"][net].items() if r["output_max_abs_diff"] > 1e-9
               or r.get("grad_max_rel_diff", 0) > 1e-6}
        if bad:
            print(f"{net}: outputs or gradients differ from tetsnn: {bad}", file=sys.stderr)
            return 1
        print(net, "equal in float64:", json.dumps(res["equality"][net]), flush=True)
        res["measured"][net] = measure(net, sizes[net], args.rounds)
        res["seconds"] = round(time.time() - t0)
        if not args.quick:
            write_results(NAME, res, markdown(res))
    if args.quick:   # a check of the script: its figures stay out of the results and the docs
        print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
