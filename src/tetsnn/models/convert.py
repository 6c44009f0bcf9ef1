"""State dicts of other frameworks' models, converted for tetsnn's registry models.

``convert_state_dict(state_dict, source="spikingjelly", model=NAME, **arch)`` maps the parameters and
buffers of SpikingJelly 2.0's builders (``spikformer_cifar10`` / ``spikformer_ti`` / ``spikformer_s``,
``sdt_8_384``, ``qkformer_10_384`` and their classes) onto ``create_model(NAME, **arch)``:

- SpikingJelly's q, k, v convolutions of the Spike-driven Transformer are concatenated into tetsnn's one
  ``qkv`` projection (and their BatchNorms into one BatchNorm);
- a convolution bias that SpikingJelly adds before a BatchNorm, where the official code has none, is
  folded into the BatchNorm's running mean (a training-mode BatchNorm subtracts it again; in eval mode
  ``running_mean - bias`` normalises ``y`` as the original normalises ``y + bias``);
- a bias the official code has and SpikingJelly lacks (Spikformer's and QKFormer's projections) is zero.

``arch`` are the keywords the model is built with (those that decide which biases exist: ``preset`` and
``qkv_bias`` for "spikformer").
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

__all__ = ["convert_state_dict", "SOURCES"]

SOURCES = ("spikingjelly",)

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _rename(sd: Dict[str, Tensor], rules: List[Tuple[str, str]]) -> Dict[str, Tensor]:
    """Every key renamed by the first matching rule (a full-match regex and its replacement)."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise ValueError(f"convert_state_dict: no rule for the key {key!r}: is it the state_dict of the "
                             f"SpikingJelly model this converter maps?")
    return out


def _fold_bias(sd: Dict[str, Tensor], conv: str, bn: str) -> None:
    """Remove ``conv.bias`` and fold it into the BatchNorm ``bn``'s running mean."""
    bias = sd.pop(conv + ".bias", None)
    if bias is not None and bn + ".running_mean" in sd:
        sd[bn + ".running_mean"] = sd[bn + ".running_mean"] - bias.to(sd[bn + ".running_mean"].dtype)


def _squeeze_1x1(sd: Dict[str, Tensor]) -> None:
    """Conv2d 1x1 weights ``[O, I, 1, 1]`` as Conv1d weights ``[O, I, 1]`` where tetsnn's layer is a Conv1d
    (every 4-d weight of a token projection)."""
    for key, value in list(sd.items()):
        if value.dim() == 4 and value.shape[2:] == (1, 1) and ".blocks." in f".{key}":
            sd[key] = value[..., 0]


def _zero_bias(sd: Dict[str, Tensor], convs: List[str]) -> None:
    for conv in convs:
        if conv + ".bias" not in sd:
            w = sd[conv + ".weight"]
            sd[conv + ".bias"] = w.new_zeros(w.shape[0])


# --------------------------------------------------------------------------- spikformer

def _spikformer(sd: Dict[str, Tensor], arch: dict) -> Dict[str, Tensor]:
    from .spikformer import PRESETS
    preset = arch.get("preset")
    qkv_bias = arch.get("qkv_bias")
    if qkv_bias is None:
        qkv_bias = PRESETS[preset]["qkv_bias"] if preset in PRESETS else PRESETS[None]["qkv_bias"]
    out = _rename(sd, [
        (r"patch_embed\.stages\.(\d+)\.conv_bn\.block\.(\d)\.(.+)", r"patch_embed.stages.\1.fwd.module.\2.\3"),
        (r"patch_embed\.positional_encoding\.conv_bn\.block\.(\d)\.(.+)", r"patch_embed.rpe.fwd.module.\1.\2"),
        (r"blocks\.(\d+)\.attn\.qkv_conv_bn\.(\d)\.(.+)", r"blocks.\1.attn.qkv.fwd.module.\2.\3"),
        (r"blocks\.(\d+)\.attn\.proj_conv_bn\.(\d)\.(.+)", r"blocks.\1.attn.proj.fwd.module.\2.\3"),
        (r"blocks\.(\d+)\.mlp\.(fc[12])\.(\d)\.(.+)", r"blocks.\1.mlp.\2.fwd.module.\3.\4"),
        (r"head\.(weight|bias)", r"head.\1"),
    ])
    blocks = sorted({int(m.group(1)) for k in out for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    convs = [f"blocks.{b}.{name}.fwd.module.0" for b in blocks
             for name in ("attn.proj", "mlp.fc1", "mlp.fc2") + (("attn.qkv",) if qkv_bias else ())]
    _zero_bias(out, convs)
    return out


# --------------------------------------------------------------------------- spike-driven transformer

def _spike_driven(sd: Dict[str, Tensor], arch: dict) -> Dict[str, Tensor]:
    sd = dict(sd)
    for i in range(3):
        _fold_bias(sd, f"patch_embed.stages.{i}.0", f"patch_embed.stages.{i}.1")
    _fold_bias(sd, "patch_embed.final_stage.0", "patch_embed.final_stage.1")
    # q, k, v: one projection of 3C channels
    blocks = sorted({int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    for b in blocks:
        a = f"blocks.{b}.attn"
        sd[f"{a}.qkv_conv.weight"] = torch.cat([sd.pop(f"{a}.{x}_conv.weight") for x in "qkv"])
        for name in _BN:
            parts = [sd.pop(f"{a}.{x}_bn.{name}", None) for x in "qkv"]
            if parts[0] is not None:
                sd[f"{a}.qkv_bn.{name}"] = parts[0] if name == "num_batches_tracked" else torch.cat(parts)
    out = _rename(sd, [
        (r"patch_embed\.stages\.(\d)\.(\d)\.(.+)", r"patch_embed.stages.\1.fwd.module.\2.\3"),
        (r"patch_embed\.final_stage\.(\d)\.(.+)", r"patch_embed.last.module.\1.\2"),
        (r"patch_embed\.rpe_conv\.(.+)", r"patch_embed.rpe.module.0.\1"),
        (r"patch_embed\.rpe_bn\.(.+)", r"patch_embed.rpe.module.1.\1"),
        (r"blocks\.(\d+)\.attn\.qkv_conv\.(.+)", r"blocks.\1.attn.qkv.fwd.module.0.\2"),
        (r"blocks\.(\d+)\.attn\.qkv_bn\.(.+)", r"blocks.\1.attn.qkv.fwd.module.1.\2"),
        (r"blocks\.(\d+)\.attn\.proj_conv\.(.+)", r"blocks.\1.attn.proj.module.0.\2"),
        (r"blocks\.(\d+)\.attn\.proj_bn\.(.+)", r"blocks.\1.attn.proj.module.1.\2"),
        (r"blocks\.(\d+)\.mlp\.fc([12])\.(.+)", r"blocks.\1.mlp.fc\2.module.0.\3"),
        (r"blocks\.(\d+)\.mlp\.bn([12])\.(.+)", r"blocks.\1.mlp.fc\2.module.1.\3"),
        (r"head\.(weight|bias)", r"head.\1"),
    ])
    _squeeze_1x1(out)
    return out


# --------------------------------------------------------------------------- qkformer

def _qkformer(sd: Dict[str, Tensor], arch: dict) -> Dict[str, Tensor]:
    sd = dict(sd)
    for s in (1, 2, 3):
        e = f"patch_embed{s}"
        for i in (1, 2, 3):
            _fold_bias(sd, f"{e}.conv{i}", f"{e}.bn{i}")
        _fold_bias(sd, f"{e}.shortcut.0", f"{e}.shortcut.1")
    out = _rename(sd, [
        (r"patch_embed(\d)\.conv(\d)\.(.+)",
         lambda m: f"stages.{int(m[1]) - 1}.embed.convs.{int(m[2]) - 1}.module.0.{m[3]}"),
        (r"patch_embed(\d)\.bn(\d)\.(.+)",
         lambda m: f"stages.{int(m[1]) - 1}.embed.convs.{int(m[2]) - 1}.module.1.{m[3]}"),
        (r"patch_embed(\d)\.shortcut\.(\d)\.(.+)",
         lambda m: f"stages.{int(m[1]) - 1}.embed.shortcut.module.{m[2]}.{m[3]}"),
        (r"stage(\d)\.(\d+)\.attn\.(qk|qkv)_conv_bn\.(\d)\.(.+)",
         lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.{m[3]}.fwd.module.{m[4]}.{m[5]}"),
        (r"stage(\d)\.(\d+)\.attn\.proj_conv_bn\.(\d)\.(.+)",
         lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.proj.fwd.module.{m[3]}.{m[4]}"),
        (r"stage(\d)\.(\d+)\.mlp\.fc([12])\.(.+)",
         lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.fc{m[3]}.fwd.module.0.{m[4]}"),
        (r"stage(\d)\.(\d+)\.mlp\.bn([12])\.(.+)",
         lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.fc{m[3]}.fwd.module.1.{m[4]}"),
        (r"head\.(weight|bias)", r"head.\1"),
    ])
    convs = sorted({k.rsplit(".", 1)[0] for k in out if re.search(r"attn\.proj\.fwd\.module\.0\.weight$", k)})
    _zero_bias(out, convs)
    return out


_CONVERTERS: Dict[str, Callable[[Dict[str, Tensor], dict], Dict[str, Tensor]]] = {
    "spikformer": _spikformer,
    "spike_driven_transformer": _spike_driven,
    "qkformer": _qkformer,
}


def convert_state_dict(state_dict: Dict[str, Tensor], source: str = "spikingjelly", model: str = "spikformer",
                       **arch) -> Dict[str, Tensor]:
    """A state_dict for ``create_model(model, **arch)`` from the state_dict of ``source``'s model of the
    same architecture (``source="spikingjelly"``: SpikingJelly 2.0's Spikformer, Spike-driven Transformer
    and QKFormer). The tensors are shared with ``state_dict`` where no change is needed."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: expected one of {list(SOURCES)}")
    if model not in _CONVERTERS:
        raise ValueError(f"convert_state_dict has no {source} mapping for the model {model!r}: expected one of "
                         f"{sorted(_CONVERTERS)}")
    return _CONVERTERS[model](dict(state_dict), arch)
