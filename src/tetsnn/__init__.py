"""tetsnn: spiking neural networks trained with Temporal Efficient Training (TET, ICLR 2022)."""
import sys

from .neuron import (IF, LIF, AtanSpike, CustomSpike, ReLUNeuron, SigmoidSpike, ZIF, atan_grad, atan_spike,
                     make_neuron, sigmoid_grad, sigmoid_spike, zif, zif_grad)
from .psn import PSN, SlidingPSN
from .norm import TEBN, tdBN
from .layers import Layer, SeqToANNContainer, Threshold, add_time_dim, to_batch_first, to_time_first
from .loss import sdt_loss, tet_loss
from .models import create_model, list_models, register_model
from .utils import seed_all
from .export import export_nir, to_nir
from .nir_import import from_nir
from . import analysis  # tetsnn.analysis.profile
from . import data, engine
from .engine import checkpoint, config, distributed, evaluate as _evaluate_module, train
from .engine.checkpoint import build_model, load_checkpoint
from .engine.config import load_config
from .engine.data import build_data
from .engine.evaluate import evaluate

# The engine's modules keep their short names (``tetsnn.train``, ``import tetsnn.config``, ...):
# each is the same module object as its ``tetsnn.engine`` counterpart.
for _module in (checkpoint, config, distributed, _evaluate_module, train):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module
data.build_data = build_data
del _module, _evaluate_module

__version__ = "0.1.0"

__all__ = [
    "LIF", "IF", "ReLUNeuron", "PSN", "SlidingPSN", "TEBN", "tdBN", "make_neuron",
    "ZIF", "SigmoidSpike", "AtanSpike", "CustomSpike", "zif", "sigmoid_spike", "atan_spike",
    "zif_grad", "sigmoid_grad", "atan_grad",
    "SeqToANNContainer", "Layer", "Threshold", "add_time_dim", "to_time_first", "to_batch_first",
    "tet_loss", "sdt_loss", "create_model", "list_models", "register_model", "seed_all",
    "export_nir", "to_nir", "from_nir",
    "load_checkpoint", "load_config", "build_data", "build_model", "evaluate",
]
