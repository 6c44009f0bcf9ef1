"""Model registry: ``create_model(name, num_classes=None, T=4, **kw)`` and ``list_models()``.

Every model takes a static batch ``[N, C, H, W]`` (repeated T times) or a sequence
``[N, T, C, H, W]`` (used as is) and returns per-step logits ``[N, T, classes]``.
"""
from ._registry import create_model, list_models, register_model
from .base import SpikingModel
from .convert import convert_state_dict
from . import resnet, sew_resnet, vgg, small, nir_graph, spikformer, spike_driven, qkformer  # noqa: F401  (register the models)

__all__ = ["create_model", "list_models", "register_model", "SpikingModel", "convert_state_dict"]
