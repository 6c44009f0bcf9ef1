"""Figures of a ``profile`` result: firing rate per layer, and a spike raster of one sample."""
from __future__ import annotations

import numpy as np

from ..utils import atomic_path

__all__ = ["plot_profile"]


def _raster_image(raster: dict, per_layer: int):
    """[rows, T] spikes of at most ``per_layer`` evenly spaced neurons per layer, and where layers end."""
    blocks = []
    for spikes in raster.values():
        spikes = np.asarray(spikes)                       # [T, neurons]
        keep = np.linspace(0, spikes.shape[1] - 1, min(per_layer, spikes.shape[1])).astype(int)
        blocks.append(spikes[:, keep].T)
    return np.concatenate(blocks), np.cumsum([len(b) for b in blocks])


def plot_profile(result: dict, path, per_layer: int = 64) -> None:
    """Write a figure of ``result`` (from ``profile(..., raster=True)``) to ``path``; the format follows
    its extension. The raster shows up to ``per_layer`` evenly spaced neurons of each layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["firing_rates"])
    fig, (ax_rate, ax_raster) = plt.subplots(1, 2, figsize=(12, max(4, 0.3 * len(names) + 1.5)),
                                             gridspec_kw={"width_ratios": [1, 1.2]})
    ax_rate.barh(range(len(names)), [result["firing_rates"][n] for n in names], color="tab:blue")
    ax_rate.set_yticks(range(len(names)), names, fontsize=7)
    ax_rate.invert_yaxis()
    ax_rate.set_xlabel("mean firing rate (spikes per neuron per step)")
    ax_rate.set_title(f"firing rates ({result['samples']} samples, T = {result['T']})")

    if result.get("raster"):
        image, bounds = _raster_image(result["raster"], per_layer)
        ax_raster.imshow(image, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                         extent=(0.5, image.shape[1] + 0.5, len(image) - 0.5, -0.5))
        for b in bounds[:-1]:
            ax_raster.axhline(b - 0.5, color="tab:red", lw=0.8)
        ax_raster.set_yticks(bounds - np.diff(bounds, prepend=0) / 2, list(result["raster"]), fontsize=7)
        ax_raster.set_xticks(range(1, image.shape[1] + 1))
    ax_raster.set_xlabel("time step")
    ax_raster.set_title(f"spike raster of one sample (up to {per_layer} neurons per layer)")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
