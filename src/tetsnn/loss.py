"""Losses over per-step logits ``[N, T, C]``.

TET:  L = (1 - lamb) * mean_t CE(O[:, t], y) + lamb * mean((O - means)^2)
SDT:  L = CE(mean_t O[:, t], y)   (standard direct training, the baseline TET replaces)

The target ``y`` is either hard labels ``[N]`` (int64) or soft targets ``[N, C]`` (class probabilities,
each row summing to 1, as mixup and cutmix give). In TET's loss every step's cross-entropy uses the
same target. ``label_smoothing`` (epsilon) replaces a target ``p`` by ``(1 - epsilon) p + epsilon / C``
(``F.cross_entropy``'s own smoothing, for hard and soft targets alike); 0 leaves it unchanged.

float16 / bfloat16 logits are upcast to float32; float32 and float64 ones are used as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.ops import half_to_float

__all__ = ["tet_loss", "sdt_loss", "LOSSES", "half_to_float"]


def _check(outputs: torch.Tensor, target: torch.Tensor) -> None:
    if outputs.dim() != 3:
        raise ValueError(f"expected outputs of shape [N, T, C], got shape {tuple(outputs.shape)}")
    if target.shape[0] != outputs.shape[0]:
        raise ValueError(f"target has {target.shape[0]} samples but outputs have {outputs.shape[0]}")
    if target.dim() == 2:
        if target.shape[1] != outputs.shape[2] or not target.is_floating_point():
            raise ValueError(f"soft targets must be float [N, C] = [{outputs.shape[0]}, {outputs.shape[2]}], "
                             f"got {target.dtype} of shape {tuple(target.shape)}")
    elif target.dim() != 1:
        raise ValueError(f"expected hard labels [N] or soft targets [N, C], got shape {tuple(target.shape)}")


def _target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Soft targets in the logits' dtype (cross_entropy needs them equal); hard labels as they are."""
    return target.to(logits.dtype) if target.dim() == 2 else target


def tet_loss(outputs: torch.Tensor, target: torch.Tensor, lamb: float = 0.0, means: float = 1.0,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Temporal Efficient Training loss: every time step gets its own cross-entropy."""
    _check(outputs, target)
    n, t, c = outputs.shape
    logits = half_to_float(outputs.reshape(n * t, c))
    # one CE over all N*T rows, averaged = (1/T) sum_t mean_n CE(O[:, t], y)
    ce = F.cross_entropy(logits, _target(target, logits).repeat_interleave(t, dim=0),
                         label_smoothing=label_smoothing)
    if lamb == 0:
        return ce
    mse = (half_to_float(outputs) - means).pow(2).mean()
    return (1 - lamb) * ce + lamb * mse


def sdt_loss(outputs: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Standard direct training: cross-entropy of the time-averaged logits."""
    _check(outputs, target)
    logits = half_to_float(outputs).mean(1)
    return F.cross_entropy(logits, _target(target, logits), label_smoothing=label_smoothing)


LOSSES = {"tet": tet_loss, "sdt": sdt_loss}
