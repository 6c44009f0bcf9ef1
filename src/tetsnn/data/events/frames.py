"""Events -> frames of per-pixel counts (numpy), and the per-batch model input transform (torch).

``to_frames`` bins a recording's events into ``[T, 2, H, W]`` counts with one ``np.bincount``
(fancy-index ``+=`` would drop repeated pixels and make frames binary). ``batch_transform`` turns a
batch of cached counts into model input on the batch's device: area resize, per-frame max scaling
and TET's flip + circular roll, identical at every time step of a sample.

A cache for a large sensor may hold frames already reduced (``cell_sums``): for each output
pixel of the adaptive average pooling, the sum of the counts in its cell. Dividing by the cell's
height and then its width, in float32, is exactly what ``adaptive_avg_pool2d`` computes from the
counts (its float32 sums of integers below 2**24 are exact), so both give the same model input.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..draws import rand, randint

__all__ = ["to_frames", "batch_transform", "cell_sums", "pool_cells", "can_reduce"]


def time_bins(t: np.ndarray, T: int) -> np.ndarray:
    """Frame of each event when splitting by time: ``(t_i - t0) * T // span``.

    ``t0`` is the earliest time and ``span = t_last - t0 + 1`` (integer arithmetic, so the latest
    event lands in frame T-1).
    """
    t0 = t.min()
    return (t - t0) * T // (t.max() - t0 + 1)


def pixel_index(events: np.ndarray, sensor_size) -> np.ndarray:
    """``(p * H + y) * W + x`` of each event, after checking every field is inside the sensor.

    Uses the smallest integer type that holds ``2 * H * W`` (int16 for 128 x 128), which cuts the
    memory traffic of this, the framing's busiest step.
    """
    H, W = sensor_size
    for name, limit in (("x", W), ("y", H), ("p", 2)):
        field = events[name]
        if field.dtype.kind not in "iub":
            raise ValueError(f"event field {name!r} must be an integer or bool type, got {field.dtype}")
        # Viewed as unsigned, a negative value is huge: one max() checks both ends.
        if len(field) and field.view(field.dtype.str.replace("i", "u")).max() >= limit:
            raise ValueError(f"event field {name!r} spans [{field.min()}, {field.max()}], outside "
                             f"[0, {limit - 1}] for sensor_size (H, W) = {(H, W)}")
    dtype = np.int16 if 2 * H * W <= 2**15 else np.int32 if 2 * H * W <= 2**31 else np.int64
    index = np.multiply(events["p"], H, dtype=dtype)
    index += events["y"]
    index *= W
    index += events["x"]
    return index


def to_frames(events: np.ndarray, T: int, sensor_size=(128, 128), split_by: str = "count") -> np.ndarray:
    """Bin events (fields t, x, y, p) into ``T`` frames of per-pixel counts.

    Returns int64 ``[T, 2, H, W]``: channel = polarity (0 OFF, 1 ON), row = y, column = x.
    ``sensor_size`` is ``(H, W)``. ``split_by="count"``: with N events, frame j holds events
    ``[j*N//T, (j+1)*N//T)`` in file order; ``"time"``: see :func:`time_bins`.
    """
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    H, W = (int(s) for s in sensor_size)
    pixels = pixel_index(events, (H, W))
    size = 2 * H * W
    if split_by == "count":
        # one bincount over (frame, pixel): frame j's events are offset by j frames in place
        bounds = (np.arange(T + 1, dtype=np.int64) * len(pixels) // T).tolist()
        index = pixels.astype(np.intp)
        for j in range(1, T):
            index[bounds[j]:bounds[j + 1]] += j * size
        return np.bincount(index, minlength=T * size).reshape(T, 2, H, W)
    if split_by == "time":
        if len(pixels) == 0:
            return np.zeros((T, 2, H, W), dtype=np.int64)
        index = time_bins(events["t"], T) * size + pixels
        return np.bincount(index, minlength=T * size).reshape(T, 2, H, W)
    raise ValueError(f"split_by must be 'count' or 'time', got {split_by!r}")


def pool_cells(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of the ``size`` cells adaptive average pooling uses along an axis
    of length ``n``: ``start_i = floor(i n / size)``, ``end_i = ceil((i + 1) n / size)``. When
    ``size`` does not divide ``n`` the cells differ in length and neighbours may share a pixel."""
    i = np.arange(size, dtype=np.int64)
    return i * n // size, -((-(i + 1) * n) // size)


# A pixel holds at most 65,535 events in one frame (the uint16 limit of the counts); cell sums stay
# exact in float32 while below 2**24, so a cell may span at most 2**24 // 65,535 = 256 pixels.
_MAX_CELL_AREA = 2**24 // 65535


def can_reduce(sensor_size, size: int) -> bool:
    """Whether a cache may hold the cell sums of pooling ``sensor_size`` (H, W) frames to
    ``size`` x ``size``: the size is at least 2 and below the sensor on both axes, and every
    cell's sum of uint16 counts stays exact in float32."""
    H, W = (int(s) for s in sensor_size)
    if size < 2 or size > min(H, W) or (H, W) == (size, size):   # size 1 is torch's mean: one division
        return False
    longest = [int(np.subtract(*pool_cells(n, size)[::-1]).max()) for n in (H, W)]
    return longest[0] * longest[1] <= _MAX_CELL_AREA


def cell_sums(frames: np.ndarray, size: int) -> np.ndarray:
    """Per-cell sums ``[..., size, size]`` (uint32) of integer counts ``[..., H, W]`` over the cells of
    adaptive average pooling to ``size`` x ``size``, from a summed-area table (exact integers)."""
    *lead, H, W = frames.shape
    table = np.zeros((*lead, H + 1, W + 1), dtype=np.int64)
    np.cumsum(frames, axis=-2, out=table[..., 1:, 1:])
    np.cumsum(table[..., 1:, 1:], axis=-1, out=table[..., 1:, 1:])
    (r0, r1), (c0, c1) = pool_cells(H, size), pool_cells(W, size)
    rows0, rows1 = table[..., r0, :], table[..., r1, :]
    sums = rows1[..., c1] - rows1[..., c0] - rows0[..., c1] + rows0[..., c0]
    return sums.astype(np.uint32)


def _cell_means(x: torch.Tensor, sensor_size, size: int) -> torch.Tensor:
    """float32 means from cell sums ``[..., size, size]``: each sum divided by its cell's height,
    then by its width, as ``adaptive_avg_pool2d`` divides its sum."""
    (r0, r1), (c0, c1) = pool_cells(sensor_size[0], size), pool_cells(sensor_size[1], size)
    heights = torch.as_tensor(r1 - r0, dtype=torch.float32, device=x.device)[:, None]
    widths = torch.as_tensor(c1 - c0, dtype=torch.float32, device=x.device)
    return x.to(torch.float32) / heights / widths


def _flip_roll(x: torch.Tensor, flip: bool, roll: int, generator) -> torch.Tensor:
    """Per sample: flip W with p=0.5, then roll H and W circularly, the same at every step.

    Random draws, in this order: ``B`` uniforms for the flips (if ``flip``), then ``B`` row shifts
    and ``B`` column shifts in ``[-roll, roll]`` (if ``roll``). One gather does the rest.
    """
    B, T, C, H, W = x.shape
    flips = rand(generator, B, x.device) < 0.5 if flip else torch.zeros(B, dtype=torch.bool, device=x.device)
    dh = randint(generator, -roll, roll + 1, B, x.device) if roll else torch.zeros(B, dtype=torch.long, device=x.device)
    dw = randint(generator, -roll, roll + 1, B, x.device) if roll else torch.zeros_like(dh)
    # torch.roll semantics: out[i] = in[(i - shift) % n]; a flip then maps column j to W - 1 - j.
    rows = (torch.arange(H, device=x.device) - dh[:, None]) % H
    cols = (torch.arange(W, device=x.device) - dw[:, None]) % W
    cols = torch.where(flips[:, None], W - 1 - cols, cols)
    index = (rows[:, :, None] * W + cols[:, None, :]).reshape(B, 1, H * W).expand(B, T * C, H * W)
    return x.reshape(B, T * C, H * W).gather(2, index).reshape(B, T, C, H, W)


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling of ``[N, C, H, W]`` counts in float32. On the CPU it converts and
    pools in slices of 64 frames that stay in cache: about 2.5x faster than converting the whole
    batch to float32 first. Each frame is pooled on its own, so the result is the same."""
    step = 64 if x.device.type == "cpu" else len(x)
    return torch.cat([F.adaptive_avg_pool2d(x[i:i + step].to(torch.float32), size) for i in range(0, len(x), step)])


def batch_transform(frames: torch.Tensor, size: int = 48, norm: str | None = "max", flip: bool = False,
                    roll: int = 0, generator: torch.Generator | None = None, sensor_size=None) -> torch.Tensor:
    """Event counts ``[B, T, 2, H, W]`` (any dtype, any device) -> float32 ``[B, T, 2, size, size]``.

    Resizes with adaptive average pooling (skipped when already ``size``), then with
    ``norm="max"`` divides each frame (one step of one sample, ``[2, H, W]``) by its own maximum
    (an empty frame stays 0). ``flip`` / ``roll`` add TET's train-time augmentation: a horizontal
    flip with p=0.5 and a circular roll of H and W by independent integers in ``[-roll, roll]``,
    drawn per sample from ``generator`` (a ``torch.Generator``, or a ``SampleRandom`` whose draws
    are fixed by each sample's index) and applied identically at every time step.

    ``frames`` of ``size`` x ``size`` with a different ``sensor_size`` (H, W) are the cell sums of
    a reduced cache (:func:`cell_sums`): they give the same result as the counts they came from.
    """
    if frames.ndim != 5 or frames.shape[2] != 2:
        raise ValueError(f"expected event frames [B, T, 2, H, W], got shape {tuple(frames.shape)}")
    if norm not in ("max", None):
        raise ValueError(f"norm must be 'max' or None, got {norm!r}")
    if int(roll) != roll or roll < 0:
        raise ValueError(f"roll must be a non-negative integer, got {roll!r}")
    B, T, C, H, W = frames.shape
    if sensor_size is not None and (H, W) == (size, size) != tuple(sensor_size):
        x = _cell_means(frames, tuple(sensor_size), size)
    elif (H, W) != (size, size):
        x = _pool(frames.reshape(B * T, C, H, W), size).reshape(B, T, C, size, size)
    else:
        x = frames.to(torch.float32)
    if norm == "max":
        peak = x.amax(dim=(2, 3, 4), keepdim=True)
        x = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    if flip or roll:
        x = _flip_roll(x, flip, int(roll), generator)
    return x.clone() if x is frames else x
