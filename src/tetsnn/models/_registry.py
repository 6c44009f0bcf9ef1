from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from ..layers import check_T

_MODELS: Dict[str, Tuple[Callable, int]] = {}


def register_model(name: str, num_classes: Optional[int]):
    """Decorator: register a builder ``fn(num_classes, T, **kw)`` under ``name``,
    with the class count of the dataset the model is made for (None: the builder decides)."""
    def wrap(fn):
        _MODELS[name] = (fn, num_classes)
        return fn
    return wrap


def list_models():
    """The registered model names, sorted (the names :func:`create_model` takes)."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = None, T: int = 4, **kw):
    """Build a registered model. ``num_classes`` defaults to that of the model's dataset."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {list_models()}")
    check_T(T)
    fn, default_classes = _MODELS[name]
    num_classes = default_classes if num_classes is None else num_classes
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return fn(num_classes=num_classes, T=T, **kw)
