"""ANN-to-SNN transfer and freezing for ``tetsnn train``.

- ``load_ann_weights(model, path)``: start a spiking model from the weights of a ReLU network of
  the same architecture (``create_model(name, neuron="relu")``), reporting missing and unexpected
  keys and refusing any shape mismatch.
- ``freeze(model, patterns)``: stop training the parameters whose names match glob patterns.
"""
from __future__ import annotations

import fnmatch

from torch import nn

from .checkpoint import CheckpointError, load_state_dict

__all__ = ["load_ann_weights", "freeze"]


def load_ann_weights(model: nn.Module, path) -> dict:
    """Copy the tensors of the checkpoint at ``path`` into ``model``.

    Returns ``{"loaded": [...], "missing": [...], "unexpected": [...]}``: missing keys keep the
    model's initialisation, unexpected ones are not used; both are for the caller to report.
    A tensor whose shape differs from the model's is an error naming every such key.
    """
    source = load_state_dict(path)
    target = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in source.items() if k in target and v.shape != target[k].shape]
    if mismatched:
        raise CheckpointError(f"{path}: shape mismatch for " + "; ".join(mismatched))
    shared = {k: v for k, v in source.items() if k in target}
    model.load_state_dict(shared, strict=False)
    return dict(loaded=sorted(shared), missing=sorted(set(target) - set(source)),
                unexpected=sorted(set(source) - set(target)))


def split_patterns(patterns) -> list:
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    return [p.strip() for p in patterns if p.strip()]


def freeze(model: nn.Module, patterns) -> list:
    """Set ``requires_grad=False`` on parameters matching any glob pattern (a list or "a,b").
    Returns the frozen names; a pattern that matches nothing is an error (a typo would otherwise
    silently train everything)."""
    names = [n for n, _ in model.named_parameters()]
    frozen = set()
    for pattern in split_patterns(patterns):
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter "
                             f"(names look like {names[0]!r})")
        frozen.update(hits)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return sorted(frozen)
