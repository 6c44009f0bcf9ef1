"""The neuron contract: one immutable description of a spiking neuron that layers, the path planner
(:func:`tetsnn.kernels.plan.plan`) and every kernel read.

A recurrent neuron (``dynamics="lif"``) integrates, fires and resets, per step t::

    h[t] = decay * u[t-1] + c_in * x[t]     c_in = 1 - decay with decay_input, 1 otherwise
    s[t] = H(h[t] - threshold)              strict '>'
    u[t] = h[t] * (1 - s[t])                hard reset  (soft: u[t] = h[t] - threshold * s[t])

``dynamics="ilif"`` fires integer counts ``s[t] = round(clip(h[t] / threshold, 0, max_level))`` and
resets softly, ``u[t] = h[t] - threshold * s[t]``, with a straight-through rectangle gradient on
``[0, max_level]``.

``dynamics="psn"`` is a parallel neuron (:mod:`tetsnn.neuron.psn`): a learnable mix over time, then a
spike, with no membrane and no reset; only its surrogate and width apply.

The decay is either fixed (a float in the spec) or a parameter of the module (``learnable_decay``),
handed to the kernels as a 0-dim tensor operand next to the input; the spec then holds its value at
construction only for display.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Tuple, Union

from ..surrogate import surrogate_constant

__all__ = ["NeuronSpec", "DYNAMICS", "C_DECAY", "C_THRESHOLD", "C_WIDTH", "C_K", "C_ZERO", "C_ONE", "C_INPUT",
           "C_LEVELS", "N_CONSTANTS"]

DYNAMICS = ("lif", "ilif", "psn")

# The one layout of the constant array every kernel reads (numba and Triton alike), in the compute dtype.
C_DECAY, C_THRESHOLD, C_WIDTH, C_K, C_ZERO, C_ONE, C_INPUT, C_LEVELS = range(8)
N_CONSTANTS = 8


@dataclass(frozen=True)
class NeuronSpec:
    """What a kernel needs to know about a neuron.

    Attributes:
        dynamics: "lif" (binary spikes; also IF and PLIF), "ilif" (integer spikes 0..max_level) or
            "psn" (a parallel neuron: no recurrence).
        decay: the membrane's decay factor (TET's tau), or the initial value of a learnable one.
        learnable_decay: the decay is a module parameter passed to the kernels as a tensor.
        decay_input: scale the input by ``1 - decay`` (SpikingJelly's default charge).
        threshold: firing threshold.
        reset: "hard" (to 0) or "soft" (subtract the threshold).
        detach_reset: no gradient through the reset.
        surrogate: "zif", "sigmoid", "atan", "rectangle" (ILIF's straight-through window) or a callable
            ``v -> ds/dv`` (runs on the loop and torch-op paths only).
        width: the surrogate's width (gamma for zif, alpha for sigmoid / atan).
        max_level: the largest spike count (1 for binary spikes).
    """

    dynamics: str = "lif"
    decay: float = 0.5
    learnable_decay: bool = False
    decay_input: bool = False
    threshold: float = 1.0
    reset: str = "hard"
    detach_reset: bool = False
    surrogate: Union[str, Callable] = "zif"
    width: float = 1.0
    max_level: int = 1

    def __post_init__(self):
        if self.dynamics not in DYNAMICS:
            raise ValueError(f"unknown dynamics {self.dynamics!r}: expected one of {DYNAMICS}")
        if self.reset not in ("hard", "soft"):
            raise ValueError(f"unknown reset {self.reset!r}: expected 'hard' or 'soft'")

    @property
    def builtin_surrogate(self) -> bool:
        return not callable(self.surrogate)

    @property
    def hard(self) -> bool:
        return self.reset == "hard"

    def replace(self, **changes) -> "NeuronSpec":
        return dataclasses.replace(self, **changes)

    def constants(self, decay: float = None) -> Tuple[float, ...]:
        """The kernels' constant array (layout ``C_*``) as floats; ``decay`` overrides the spec's (a
        learnable decay's current value). The kernels cast it to their compute dtype."""
        d = self.decay if decay is None else float(decay)
        k = surrogate_constant(self.surrogate, self.width) if self.builtin_surrogate else 0.0
        return (d, self.threshold, self.width, k, 0.0, 1.0, 1.0 - d if self.decay_input else 1.0,
                float(self.max_level))
