"""BatchNorm variants for spiking networks: statistics pooled over batch and time, per channel.

Both take batch-first ``[N, T, C, H, W]`` input, or the ``[N*T, C, H, W]`` batch a
:class:`tetsnn.SeqToANNContainer` hands to the layers inside it (the models use them there).

- :class:`tdBN` (threshold-dependent BatchNorm, Zheng et al. AAAI 2021): plain BatchNorm over N x T
  whose affine weight starts at ``alpha * threshold`` (SpikingJelly's ``ThresholdDependentBatchNorm2d``).
  It is an ``nn.BatchNorm2d``, so it runs fused into the neuron after it as BatchNorm does.
- :class:`TEBN` (temporal effective BatchNorm, Duan et al. NeurIPS 2022): plain BatchNorm over N x T,
  then the output (after the affine) times a learnable per-step ``scale`` of shape ``[T]``, initialised
  to ones (SpikingJelly's ``TemporalEffectiveBatchNorm2d``). It runs unfused (docs/decisions.md).

:func:`make_norm` builds one by name: ``"bn"`` (``nn.BatchNorm2d``), ``"tebn"`` or ``"tdbn"``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["tdBN", "TEBN", "make_norm", "NORMS"]


def _as_steps(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` as the ``[N*T, C, H, W]`` batch BatchNorm2d reads (a 5-D ``[N, T, ...]`` is flattened)."""
    if x.dim() == 5:
        return x.flatten(0, 1)
    if x.dim() == 4:
        return x
    raise ValueError(f"{type(module).__name__} expects [N, T, C, H, W] or [N*T, C, H, W], got shape {tuple(x.shape)}")


class tdBN(nn.BatchNorm2d):  # noqa: N801 - the paper's name
    """Threshold-dependent BatchNorm: ``nn.BatchNorm2d`` over N x T with the weight initialised to
    ``alpha * threshold`` (the threshold of the neurons it feeds).

    Args:
        num_features: channels C.
        alpha: the paper's alpha (1, or 1/sqrt(2) before a residual add).
        threshold: the firing threshold of the following neurons.
        eps: as ``nn.BatchNorm2d``.
        momentum: as ``nn.BatchNorm2d``.
    """

    fusable_batchnorm = True   # BatchNorm2d's statistics and affine: runs inside the following neuron in training

    def __init__(self, num_features: int, alpha: float = 1.0, threshold: float = 1.0, eps: float = 1e-5,
                 momentum: float = 0.1):
        self.alpha, self.threshold = float(alpha), float(threshold)
        super().__init__(num_features, eps=eps, momentum=momentum)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.fill_(self.alpha * self.threshold)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(_as_steps(self, x)).view(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, threshold={self.threshold}"


class TEBN(nn.Module):
    """Temporal effective BatchNorm: ``bn`` (an ``nn.BatchNorm2d`` over N x T), then ``scale[t]`` times
    step t's output.

    Args:
        num_features: channels C.
        T: number of time steps (the length of ``scale``).
        eps: as ``nn.BatchNorm2d``.
        momentum: as ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, T: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"TEBN needs the number of time steps T as an integer >= 1, got {T!r}")
        self.T = T
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)
        self.scale = nn.Parameter(torch.ones(T))

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(_as_steps(self, x))
        if y.shape[0] % self.T:
            raise ValueError(f"TEBN was built for T={self.T} steps, but the batch of {y.shape[0]} "
                             f"[N*T, ...] rows is not a multiple of it")
        y = y.view(-1, self.T, *y.shape[1:]) * self.scale.view(1, self.T, 1, 1, 1)
        return y.view(x.shape)

    def folded_batchnorm(self, name: str = "TEBN") -> nn.BatchNorm2d:
        """The ``nn.BatchNorm2d`` equal to this layer at inference, where every step has the same scale;
        a ValueError naming ``name`` otherwise."""
        s = self.scale.detach()
        if not bool((s == s[0]).all()):
            raise ValueError(f"layer {name!r}: TEBN's per-step scale differs between steps "
                             f"({[round(v, 4) for v in s.tolist()]}); one graph for every step cannot express it")
        bn = nn.BatchNorm2d(self.bn.num_features, self.bn.eps, self.bn.momentum,
                            device=s.device, dtype=self.bn.weight.dtype)
        bn.load_state_dict(self.bn.state_dict())
        with torch.no_grad():
            bn.weight.mul_(s[0])
            bn.bias.mul_(s[0])
        return bn.eval()

    def extra_repr(self) -> str:
        return f"T={self.T}"


NORMS = ("bn", "tebn", "tdbn")


def make_norm(norm: str, num_features: int, T: int = None, threshold: float = 1.0) -> nn.Module:
    """The normalisation called ``norm`` for ``num_features`` channels: "bn" (``nn.BatchNorm2d``), "tebn"
    (needs ``T``) or "tdbn" (weight ``1.0 * threshold``)."""
    if norm == "bn":
        return nn.BatchNorm2d(num_features)
    if norm == "tebn":
        if T is None:
            raise ValueError("norm 'tebn' needs the number of time steps T")
        return TEBN(num_features, T)
    if norm == "tdbn":
        return tdBN(num_features, threshold=threshold)
    raise ValueError(f"unknown norm {norm!r}: expected one of {list(NORMS)}")
