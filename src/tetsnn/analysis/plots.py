"""Figures of a ``profile`` result: firing rate per layer, and a spike raster of one sample."""
from __future__ import annotations

import os

import numpy as np

__all__ = ["plot_profile"]


def _raster_points(raster: dict, per_layer: int):
    """(time steps, rows, layer boundaries, layer centres) of at most ``per_layer`` neurons per layer."""
    ts, rows, bounds, centres, offset = [], [], [], [], 0
    for spikes in raster.values():
        spikes = np.asarray(spikes)                       # [T, neurons]
        keep = np.linspace(0, spikes.shape[1] - 1, min(per_layer, spikes.shape[1])).astype(int)
        t, i = np.nonzero(spikes[:, keep])
        ts.append(t + 1)
        rows.append(i + offset)
        centres.append(offset + len(keep) / 2)
        offset += len(keep)
        bounds.append(offset)
    return np.concatenate(ts), np.concatenate(rows), bounds, centres


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
        t, rows, bounds, centres = _raster_points(result["raster"], per_layer)
        ax_raster.scatter(t, rows, s=40, marker="|", linewidths=1.5, color="black")
        for b in bounds[:-1]:
            ax_raster.axhline(b - 0.5, color="tab:gray", lw=0.5)
        ax_raster.set_yticks(centres, list(result["raster"]), fontsize=7)
        ax_raster.set_ylim(bounds[-1] - 0.5, -0.5)
        ax_raster.set_xticks(range(1, result["T"] + 1))
        ax_raster.set_xlim(0.5, result["T"] + 0.5)
    ax_raster.set_xlabel("time step")
    ax_raster.set_title(f"spike raster of one sample (up to {per_layer} neurons per layer)")
    fig.tight_layout()
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
