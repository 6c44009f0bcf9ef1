"""to_frames against a per-event loop; batch_transform against per-sample torch ops."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tetsnn.data.events import EVENT_DTYPE, batch_transform, to_frames


def random_events(n, H, W, seed, t_max=10_000):
    rng = np.random.default_rng(seed)
    events = np.empty(n, dtype=EVENT_DTYPE)
    events["t"] = np.sort(rng.integers(0, t_max, n)) + 2**33   # not rebased: large device times
    events["x"] = rng.integers(0, W, n)
    events["y"] = rng.integers(0, H, n)
    events["p"] = rng.integers(0, 2, n)
    return events


def frames_by_loop(events, T, H, W, split_by):
    out = np.zeros((T, 2, H, W), dtype=np.int64)
    n = len(events)
    t0, span = (int(events["t"].min()), int(events["t"].max()) - int(events["t"].min()) + 1) if n else (0, 1)
    for i, e in enumerate(events):
        if split_by == "count":
            j = max(j for j in range(T) if j * n // T <= i)
        else:
            j = (int(e["t"]) - t0) * T // span
        out[j, e["p"], e["y"], e["x"]] += 1
    return out


@pytest.mark.parametrize("split_by", ["count", "time"])
@pytest.mark.parametrize("n, T", [(500, 7), (5, 8), (1, 1), (0, 3)])
def test_to_frames_matches_per_event_loop(n, T, split_by):
    H, W = 5, 7
    events = random_events(n, H, W, seed=n + T)
    out = to_frames(events, T, sensor_size=(H, W), split_by=split_by)
    assert out.shape == (T, 2, H, W)
    np.testing.assert_array_equal(out, frames_by_loop(events, T, H, W, split_by))
    assert out.sum() == n   # no event dropped


def test_to_frames_counts_repeated_pixels():
    events = np.zeros(9, dtype=EVENT_DTYPE)
    events["x"], events["y"], events["p"], events["t"] = 3, 2, 1, np.arange(9)
    events["p"][-2:] = 0
    out = to_frames(events, 1, sensor_size=(4, 4))
    assert out[0, 1, 2, 3] == 7 and out[0, 0, 2, 3] == 2 and out.sum() == 9


def test_to_frames_time_split_puts_last_event_in_last_frame():
    events = np.zeros(3, dtype=EVENT_DTYPE)
    events["t"] = [100, 100, 199]
    out = to_frames(events, 4, sensor_size=(1, 1), split_by="time")
    assert out[:, 0, 0, 0].tolist() == [2, 0, 0, 1]


@pytest.mark.parametrize("field, value", [("x", 7), ("y", 5), ("x", -1), ("p", 2), ("p", -1)])
def test_to_frames_rejects_events_outside_the_sensor(field, value):
    events = random_events(10, 5, 7, seed=0)
    events[field][4] = value
    with pytest.raises(ValueError, match=f"field '{field}'"):
        to_frames(events, 2, sensor_size=(5, 7))


def test_to_frames_accepts_tonic_layout():
    """tonic's DVS layout: x, y int16, p bool, t int64, in another field order."""
    events = random_events(50, 5, 7, seed=4)
    tonic = np.empty(50, dtype=[("x", "<i2"), ("y", "<i2"), ("p", "?"), ("t", "<i8")])
    for name in ("x", "y", "p", "t"):
        tonic[name] = events[name]
    np.testing.assert_array_equal(to_frames(tonic, 3, sensor_size=(5, 7)), to_frames(events, 3, sensor_size=(5, 7)))
    with pytest.raises(ValueError, match="integer or bool"):
        to_frames(tonic.astype([("x", "<f4"), ("y", "<i2"), ("p", "?"), ("t", "<i8")]), 3, sensor_size=(5, 7))


def test_to_frames_rejects_bad_arguments():
    events = random_events(10, 5, 7, seed=0)
    with pytest.raises(ValueError, match="split_by"):
        to_frames(events, 2, sensor_size=(5, 7), split_by="space")
    with pytest.raises(ValueError, match="T must be"):
        to_frames(events, 0, sensor_size=(5, 7))


# --- batch_transform ------------------------------------------------------------------------------

def transform_by_loop(x, size, norm):
    """Per sample and step: area resize, then divide by the frame's own maximum."""
    out = torch.zeros(x.shape[0], x.shape[1], 2, size, size)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            frame = F.interpolate(x[b, t].float()[None], size=(size, size), mode="area")[0]
            if norm == "max" and frame.max() > 0:
                frame = frame / frame.max()
            out[b, t] = frame
    return out


@pytest.mark.parametrize("size, norm", [(6, "max"), (12, "max"), (5, None), (12, None)])
def test_batch_transform_resize_and_scale_match_loop(size, norm):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 9, (3, 4, 2, 12, 12), generator=g, dtype=torch.int32)
    x[1, 2] = 0   # an empty frame stays 0
    out = batch_transform(x, size=size, norm=norm)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 2, size, size)
    torch.testing.assert_close(out, transform_by_loop(x, size, norm))
    if norm == "max":
        assert (out[1, 2] == 0).all()
        assert torch.allclose(out.amax(dim=(2, 3, 4))[0], torch.ones(4))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint16, torch.int64, torch.float64])
def test_batch_transform_accepts_integer_and_float_counts(dtype):
    x = torch.arange(2 * 3 * 2 * 4 * 4).reshape(2, 3, 2, 4, 4) % 7
    out = batch_transform(x.to(dtype), size=2, norm="max")
    torch.testing.assert_close(out, batch_transform(x.float(), size=2, norm="max"))


def test_batch_transform_returns_new_tensor_when_nothing_to_do():
    x = torch.rand(1, 2, 2, 4, 4)
    out = batch_transform(x, size=4, norm=None)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_flip_and_roll_are_one_candidate_per_sample_at_every_step():
    B, T, S, roll = 64, 3, 6, 2
    x = torch.rand(B, T, 2, S, S)
    out = batch_transform(x, size=S, norm=None, flip=True, roll=roll, generator=torch.Generator().manual_seed(3))
    seen = set()
    for b in range(B):
        matches = [(f, dh, dw) for f in (False, True) for dh in range(-roll, roll + 1) for dw in range(-roll, roll + 1)
                   if torch.equal(out[b], torch.roll(x[b].flip(-1) if f else x[b], (dh, dw), dims=(-2, -1)))]
        assert len(matches) == 1, f"sample {b}: {matches}"
        seen.add(matches[0])
    assert {f for f, _, _ in seen} == {False, True}
    assert {dh for _, dh, _ in seen} == set(range(-roll, roll + 1)) == {dw for _, _, dw in seen}


def test_roll_without_flip_and_generator_reproducibility():
    x = torch.rand(32, 2, 2, 5, 5)
    a = batch_transform(x, size=5, norm=None, roll=1, generator=torch.Generator().manual_seed(7))
    b = batch_transform(x, size=5, norm=None, roll=1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    for i in range(32):   # never flipped: some pure roll reproduces the sample
        assert any(torch.equal(a[i], torch.roll(x[i], (dh, dw), dims=(-2, -1)))
                   for dh in (-1, 0, 1) for dw in (-1, 0, 1))


def test_flip_alone_and_no_augmentation():
    x = torch.rand(40, 2, 2, 3, 4)
    out = batch_transform(x, size=3, norm=None, flip=True)
    assert out.shape == (40, 2, 2, 3, 3)   # resized to 3 x 3 first
    base = batch_transform(x, size=3, norm=None)
    flipped = [torch.equal(o, r.flip(-1)) and not torch.equal(o, r) for o, r in zip(out, base)]
    same = [torch.equal(o, r) for o, r in zip(out, base)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


@pytest.mark.parametrize("kw, message", [
    (dict(norm="mean"), "norm"), (dict(roll=-1), "roll"), (dict(roll=1.5), "roll")])
def test_batch_transform_rejects_bad_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        batch_transform(torch.zeros(1, 1, 2, 4, 4), **kw)
    with pytest.raises(ValueError, match="expected event frames"):
        batch_transform(torch.zeros(1, 2, 4, 4))
