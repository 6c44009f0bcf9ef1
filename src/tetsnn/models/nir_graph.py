"""The registry model ``nir``: a network read from a NIR file, e.g.
``tetsnn train --model nir --model-kw '{path: net.nir}'``."""
from __future__ import annotations

from ._registry import register_model


@register_model("nir", num_classes=None)
def nir_model(num_classes=None, T=4, path=None, dt=None, memory="default", **neuron_kw):
    """The graph at ``path`` as a tetsnn model (:func:`tetsnn.from_nir`); ``num_classes``, when given,
    must equal the size of the graph's output. ``memory`` must be "default": a graph runs node by node,
    with no declared blocks to recompute."""
    from ..memory import check_memory
    from ..nir_import import from_nir   # reads nir only when the model is built

    if check_memory(memory) != "default":
        raise ValueError("model 'nir' runs its graph node by node, with no spiking blocks declared: "
                         "memory='min' is not available for it")

    if path is None:
        raise ValueError("model 'nir' needs the graph's file: model_kw {path: FILE.nir}")
    model = from_nir(path, dt=dt, T=T, **neuron_kw)
    if num_classes is not None and model.output_shape != (num_classes,):
        raise ValueError(f"num_classes = {num_classes} differs from the output size {model.output_shape} "
                         f"of the NIR graph {path}")
    return model
