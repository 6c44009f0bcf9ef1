from __future__ import annotations

import torch
from torch import nn

from ..layers import add_time_dim, check_T


class SpikingModel(nn.Module):
    """Base of every model: turns the input into ``[N, T, C, H, W]`` and calls ``forward_seq``."""

    def __init__(self, T: int = 4):
        super().__init__()
        self.T = check_T(T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = add_time_dim(x, self.T)
        elif x.dim() != 5:
            raise ValueError(f"{type(self).__name__} expects a static batch [N, C, H, W] or a sequence "
                             f"[N, T, C, H, W], got shape {tuple(x.shape)}")
        return self.forward_seq(x)

    def forward_seq(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
