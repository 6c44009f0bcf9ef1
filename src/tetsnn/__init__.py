"""tetsnn: spiking neural networks trained with Temporal Efficient Training (TET, ICLR 2022).

The training engine's modules live under ``tetsnn.engine`` (``tetsnn.engine.train``,
``tetsnn.engine.config``, ...); the package root defines no name of its own for them, so
``tetsnn.train`` and ``import tetsnn.train`` both fail rather than give a function in one import
style and a module in the other. Its functions are public here under their own names
(``evaluate_model``, ``load_checkpoint``, ...).
"""
from .neuron import (IF, ILIF, LIF, PLIF, PSN, AtanSpike, CustomSpike, NeuronSpec, ReLUNeuron, SigmoidSpike, SlidingPSN,
                     ZIF, atan_grad, atan_spike, make_neuron, sigmoid_grad, sigmoid_spike, zif, zif_grad)
from .kernels.plan import Path, plan
from .norm import TEBN, tdBN
from .layers import Layer, SeqToANNContainer, Threshold, add_time_dim, to_batch_first, to_time_first
from .loss import sdt_loss, tet_loss
from .models import convert_state_dict, create_model, list_models, register_model
from .utils import seed_all
from .export import export_nir, to_nir
from .nir_import import from_nir
from . import analysis  # tetsnn.analysis.profile
from . import data, engine
from .engine.checkpoint import build_model, load_checkpoint
from .engine.config import load_config
from .engine.data import build_data
from .engine.evaluate import evaluate as evaluate_model

__version__ = "0.1.0"

__all__ = [
    "LIF", "PLIF", "IF", "ILIF", "ReLUNeuron", "PSN", "SlidingPSN", "TEBN", "tdBN", "make_neuron", "NeuronSpec",
    "Path", "plan",
    "ZIF", "SigmoidSpike", "AtanSpike", "CustomSpike", "zif", "sigmoid_spike", "atan_spike",
    "zif_grad", "sigmoid_grad", "atan_grad",
    "SeqToANNContainer", "Layer", "Threshold", "add_time_dim", "to_time_first", "to_batch_first",
    "tet_loss", "sdt_loss", "create_model", "list_models", "register_model", "convert_state_dict", "seed_all",
    "export_nir", "to_nir", "from_nir",
    "load_checkpoint", "load_config", "build_data", "build_model", "evaluate_model",
]
