"""ANN-to-SNN transfer and time-step schedules for ``tetsnn train``.

- ``load_ann_weights(model, path)``: start a spiking model from the weights of a ReLU network of
  the same architecture (``create_model(name, neuron="relu")``), reporting missing and unexpected
  keys and refusing any shape mismatch.
- ``freeze(model, patterns)``: stop training the parameters whose names match glob patterns.
- ``parse_T_schedule("2:5,4:5,6")``: train with T=2 for 5 epochs, T=4 for 5, then T=6.
"""
from __future__ import annotations

import fnmatch

from torch import nn

from .checkpoint import CheckpointError, load_state_dict

__all__ = ["load_ann_weights", "freeze", "parse_T_schedule", "T_at_epoch"]


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


def parse_T_schedule(text: str) -> list:
    """``"2:5,4:5,6"`` -> ``[(2, 5), (4, 5), (6, None)]``: (T, epochs) stages; only the last stage
    may omit its epoch count, and the last T continues to the end of the run."""
    stages = []
    parts = [p.strip() for p in str(text).split(",")]
    for i, part in enumerate(parts):
        t, sep, n = part.partition(":")
        try:
            stage = (int(t), int(n) if sep else None)
        except ValueError:
            raise ValueError(f"bad T schedule {text!r}: stage {part!r} is not T:EPOCHS") from None
        if stage[0] < 1 or (stage[1] is not None and stage[1] < 1):
            raise ValueError(f"bad T schedule {text!r}: T and epochs must be >= 1 in stage {part!r}")
        if stage[1] is None and i != len(parts) - 1:
            raise ValueError(f"bad T schedule {text!r}: only the last stage may omit its epochs")
        stages.append(stage)
    return stages


def T_at_epoch(stages: list, epoch: int) -> int:
    """The T of 1-based ``epoch`` under a parsed schedule."""
    end = 0
    for T, n in stages:
        if n is None:
            return T
        end += n
        if epoch <= end:
            return T
    return stages[-1][0]
