"""Losses over per-step logits ``[N, T, C]``.

TET:  L = (1 - lamb) * mean_t CE(O[:, t], y) + lamb * mean((O - means)^2)
SDT:  L = CE(mean_t O[:, t], y)   (standard direct training, the baseline TET replaces)

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


def tet_loss(outputs: torch.Tensor, target: torch.Tensor, lamb: float = 0.0, means: float = 1.0) -> torch.Tensor:
    """Temporal Efficient Training loss: every time step gets its own cross-entropy."""
    _check(outputs, target)
    n, t, c = outputs.shape
    # one CE over all N*T rows, averaged = (1/T) sum_t mean_n CE(O[:, t], y)
    ce = F.cross_entropy(half_to_float(outputs.reshape(n * t, c)), target.repeat_interleave(t, dim=0))
    if lamb == 0:
        return ce
    mse = (half_to_float(outputs) - means).pow(2).mean()
    return (1 - lamb) * ce + lamb * mse


def sdt_loss(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Standard direct training: cross-entropy of the time-averaged logits."""
    _check(outputs, target)
    return F.cross_entropy(half_to_float(outputs).mean(1), target)


LOSSES = {"tet": tet_loss, "sdt": sdt_loss}
