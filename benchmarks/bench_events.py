"""Event-camera data benchmarks (synthetic recordings in the real formats).

1. Decode + framing of one AEDAT 2.0 recording (~10 million events) against a minimal pipeline on
   the same file: read the bytes, np.frombuffer big-endian, decode x/y/p, one bincount per frame
   (no timestamp unwrap, no structured array). Goal: within 1.5x.
2. A DVS128 Gesture-sized root (122 AEDAT 3.1 recordings, 12 labelled windows each: 1,464 samples):
   building the frame cache from scratch, with 1 thread and with every CPU; and a per-event
   Python decoder against the vectorised reader on one recording, projected to the whole root.
3. Training batches of CIFAR10-DVS (T=10, 48 x 48, flip + roll): the cached-counts path (memmap
   rows -> tensor -> batch_transform) against the reference's per-sample path (load a saved
   float frame tensor, T PIL conversions with a bilinear resize to 48 and back, flip, roll).
   Goal: at least 20x the samples/s.
4. ATIS ``.bin`` (N-MNIST, N-Caltech101): decode + count framing at the N-Caltech101 sensor size
   against a minimal numpy decode (byte columns, markers dropped) plus one np.bincount per frame of
   the same bytes, on one 5-million-event recording and on 50 recordings of 100,000 events (the
   size of an N-Caltech101 recording). Goal: at least 0.8x its rate (median of 7 per-round ratios).
5. An N-Caltech101-sized cache build: 1,000 byte-built recordings of about 100,000 events each,
   T=10, stored reduced to 48 x 48; time and cache size extrapolated to the 8,709 recordings of the
   full dataset. Goal: the full cache under 2 GB.

Variants are interleaved in one run. Writes benchmarks/results/bench_events.json and the
``bench_events`` section of docs/performance.md.

    python benchmarks/bench_events.py [--events 10000000] [--device cpu|cuda] [--quick] [--parts atis,caltech]

``--parts`` runs only some of the benchmarks and keeps the others' last results.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import functional as TF

from tetsnn.data.events import (batch_transform, build_cache, read_aedat2, read_aedat31, read_atis_bin,
                                 read_gesture_labels, to_frames)

from report import write_results

ROOT = Path(__file__).resolve().parents[1]
SECTION = "bench_events"


# --- synthetic recordings -------------------------------------------------------------------------

def random_xyp(n, rng):
    return rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n)


def write_aedat2(path, n, rng):
    x, y, p = random_xyp(n, rng)
    records = np.empty((n, 2), dtype=">u4")
    records[:, 0] = (y << 8) | ((127 - x) << 1) | (1 - p)
    records[:, 1] = np.cumsum(rng.integers(0, 3, n)) + 1000
    path.write_bytes(b"#!AER-DAT2.0\r\n# synthetic\r\n" + records.tobytes())


def write_aedat31(path, n, duration_us, rng, packet_events=4096):
    x, y, p = random_xyp(n, rng)
    events = np.empty(n, dtype=[("data", "<u4"), ("timestamp", "<i4")])
    events["data"] = (x << 17) | (y << 2) | (p << 1) | 1
    events["timestamp"] = np.sort(rng.integers(0, duration_us, n))
    chunks = [b"#!AER-DAT3.1\r\n#Format: RAW\r\n#!END-HEADER\r\n"]
    for start in range(0, n, packet_events):
        body = events[start:start + packet_events]
        chunks += [struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, len(body), len(body), len(body)), body.tobytes()]
    path.write_bytes(b"".join(chunks))


def make_gesture_root(root, recordings, events_per_recording, windows, rng):
    root.mkdir(parents=True)
    duration = 6_000_000
    names = [f"user{1 + i // 5:02d}_light{i % 5}.aedat" for i in range(recordings)]
    for name in names:
        write_aedat31(root / name, events_per_recording, duration, rng)
        step = duration // windows
        rows = "".join(f"{1 + k % 11},{k * step},{(k + 1) * step}\n" for k in range(windows))
        (root / name.replace(".aedat", "_labels.csv")).write_text("class,startTime_usec,endTime_usec\n" + rows)
    split = len(names) * 4 // 5
    (root / "trials_to_train.txt").write_text("\n".join(names[:split]))
    (root / "trials_to_test.txt").write_text("\n".join(names[split:]))


CALTECH_SENSOR = (180, 240)
CALTECH_RECORDINGS = 8709    # the full N-Caltech101 (101 classes with BACKGROUND_Google)


def write_atis(path, n, rng, sensor=CALTECH_SENSOR, markers=2):
    """n ATIS records (sorted 23-bit times) with ``markers`` overflow markers at random places."""
    H, W = sensor
    records = np.empty((n, 5), dtype=np.uint8)
    t, p = np.sort(rng.integers(0, 2**23, n)), rng.integers(0, 2, n)
    records[:, 0], records[:, 1] = rng.integers(0, W, n), rng.integers(0, H, n)
    records[:, 2], records[:, 3], records[:, 4] = (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF
    records[rng.choice(n, markers, replace=False), 1] = 240
    path.write_bytes(records.tobytes())


def make_caltech_root(root, recordings, events, rng, classes=100):
    for i in range(recordings):
        folder = root / "Caltech101" / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_atis(folder / f"image_{1 + i // classes:04d}.bin", int(rng.integers(events // 2, 3 * events // 2)), rng)


# --- compared variants ----------------------------------------------------------------------------

def minimal_atis(path, T, sensor=CALTECH_SENSOR):
    """The floor: bytes -> byte columns -> pixel index without the markers -> one bincount per frame."""
    H, W = sensor
    raw = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8).reshape(-1, 5)
    x, y, p = raw[:, 0], raw[:, 1], raw[:, 2] >> 7
    index = ((p.astype(np.int32) * H + y) * W + x)[y != 240]
    n = len(index)
    return np.stack([np.bincount(index[j * n // T:(j + 1) * n // T], minlength=2 * H * W) for j in range(T)])


def tetsnn_atis(path, T, sensor=CALTECH_SENSOR):
    return to_frames(read_atis_bin(path), T, sensor)



def minimal_pipeline(path, T):
    """The floor: bytes -> big-endian words -> x/y/p -> one bincount per frame."""
    data = Path(path).read_bytes()
    start = 0
    while data.startswith(b"#", start):
        start = data.index(b"\n", start) + 1
    a = np.frombuffer(data, dtype=">u4", offset=start)[0::2]
    index = (1 - (a & 1)) * 16384 + ((a >> 8) & 0x7F) * 128 + (127 - ((a >> 1) & 0x7F))
    n = len(index)
    return np.stack([np.bincount(index[j * n // T:(j + 1) * n // T], minlength=32768) for j in range(T)])


def tetsnn_pipeline(path, T):
    return to_frames(read_aedat2(path), T)


def per_event_aedat31(path):
    """A pure-Python decoder: one struct.unpack per event."""
    data = Path(path).read_bytes()
    pos = data.index(b"#!END-HEADER\r\n") + 14
    events = []
    while pos < len(data):
        kind, _, size, _, overflow, capacity, number, _ = struct.unpack_from("<hhiiiiii", data, pos)
        pos += 28
        if kind == 1:
            for i in range(number):
                d, t = struct.unpack_from("<Ii", data, pos + 8 * i)
                if d & 1:
                    events.append((t | (overflow << 31), (d >> 17) & 0x7FFF, (d >> 2) & 0x7FFF, (d >> 1) & 1))
        pos += size * capacity
    return events


def frame_gesture_root(root, T):
    """Decode and frame every labelled window in one thread, writing nothing."""
    for name in (root / "trials_to_train.txt").read_text().split() + (root / "trials_to_test.txt").read_text().split():
        events = read_aedat31(root / name)
        for _, start, end, _ in read_gesture_labels(root / name.replace(".aedat", "_labels.csv")):
            to_frames(events[(events["t"] >= start) & (events["t"] < end)], T).astype(np.uint16)


def reference_batch(files, T, size=48):
    """The reference training path, per sample: load, T PIL resizes, flip, roll."""
    out = []
    for file in files:
        frames = torch.load(file)
        frames = torch.stack([TF.to_tensor(TF.resize(TF.to_pil_image(frames[t]), [size, size],
                                                     antialias=True)) for t in range(T)])
        if torch.rand(1).item() > 0.5:
            frames = torch.flip(frames, dims=(3,))
        dh, dw = np.random.randint(-5, 6, 2)
        out.append(torch.roll(frames, shifts=(int(dh), int(dw)), dims=(2, 3)))
    return torch.stack(out)


def tetsnn_batch(frames, index, device, generator):
    """The training path: cached uint16 rows -> device -> resize, scale, flip, roll per batch."""
    x = torch.from_numpy(np.asarray(frames[np.sort(index)])).to(device)
    out = batch_transform(x, 48, "max", flip=True, roll=5, generator=generator)
    if out.is_cuda:
        torch.cuda.synchronize()
    return out


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def interleaved(variants: dict, repeats: int) -> dict:
    """Median seconds of each variant, run alternately ``repeats`` times after one warm-up each."""
    times = {name: [] for name in variants}
    for r in range(repeats + 1):
        for name, call in variants.items():
            elapsed = timed(call)
            if r:
                times[name].append(elapsed)
    return {name: float(np.median(t)) for name, t in times.items()}


def round_ratios(baseline, candidate, rounds: int) -> tuple[float, float, float, list]:
    """Run the two alternately ``rounds`` times after a warm-up; return the median times and the
    median and list of per-round ratios baseline time / candidate time (the candidate's relative rate)."""
    baseline(), candidate()
    pairs = [(timed(baseline), timed(candidate)) for _ in range(rounds)]
    ratios = [b / c for b, c in pairs]
    return (float(np.median([b for b, _ in pairs])), float(np.median([c for _, c in pairs])),
            float(np.median(ratios)), [round(r, 3) for r in ratios])


# --- the benchmarks -------------------------------------------------------------------------------

def bench_decode(tmp, n_events, repeats, T=10):
    path = tmp / "big.aedat"
    write_aedat2(path, n_events, np.random.default_rng(0))
    assert np.array_equal(minimal_pipeline(path, T).reshape(T, 2, 128, 128), tetsnn_pipeline(path, T))
    t = interleaved({"minimal": lambda: minimal_pipeline(path, T), "tetsnn": lambda: tetsnn_pipeline(path, T)},
                    repeats)
    path.unlink()
    return {"events": n_events, "T": T, "minimal_s": t["minimal"], "tetsnn_s": t["tetsnn"],
            "ratio": t["tetsnn"] / t["minimal"], "goal_ratio": 1.5,
            "tetsnn_events_per_s": n_events / t["tetsnn"]}


def bench_gesture(tmp, recordings, events_per_recording, windows=12, T=16):
    root = tmp / "DvsGesture"
    make_gesture_root(root, recordings, events_per_recording, windows, np.random.default_rng(1))
    first = root / "user01_light0.aedat"
    t = interleaved({"per_event": lambda: per_event_aedat31(first), "vectorised": lambda: read_aedat31(first)}, 2)
    builds = {"1 thread": [], "all CPUs": []}
    for workers in (1, None, None, 1):   # ABBA order: neither variant always goes first
        cache = tmp / "cache"
        builds["1 thread" if workers == 1 else "all CPUs"].append(
            timed(lambda: build_cache("dvs-gesture", root, T, cache_dir=cache, workers=workers)))
        shutil.rmtree(cache)
    builds = {name: float(np.mean(t)) for name, t in builds.items()}
    framing_only = timed(frame_gesture_root, root, T)
    total_events = recordings * events_per_recording
    shutil.rmtree(root)
    return {"recordings": recordings, "samples": recordings * windows, "events": total_events, "T": T,
            "build_s_1_thread": builds["1 thread"], "build_s_all_cpus": builds["all CPUs"],
            "thread_speedup": builds["1 thread"] / builds["all CPUs"],
            "build_events_per_s": total_events / builds["all CPUs"],
            "framing_only_s_1_thread": framing_only,
            "per_event_decode_s_per_recording": t["per_event"],
            "vectorised_decode_s_per_recording": t["vectorised"],
            "decode_speedup": t["per_event"] / t["vectorised"],
            "per_event_decode_s_projected": t["per_event"] * recordings}


def bench_atis(tmp, n_events, rounds, T=10, files=1):
    """Decode + framing of ``files`` recordings of ``n_events`` each, against the minimal pipeline."""
    rng = np.random.default_rng(3)
    paths = [tmp / f"atis{i}.bin" for i in range(files)]
    for path in paths:
        write_atis(path, n_events, rng, markers=20)
    H, W = CALTECH_SENSOR
    assert np.array_equal(minimal_atis(paths[0], T).reshape(T, 2, H, W), tetsnn_atis(paths[0], T))
    minimal_s, tetsnn_s, ratio, ratios = round_ratios(lambda: [minimal_atis(p, T) for p in paths],
                                                      lambda: [tetsnn_atis(p, T) for p in paths], rounds)
    for path in paths:
        path.unlink()
    return {"events": n_events, "files": files, "T": T, "sensor_size": list(CALTECH_SENSOR), "minimal_s": minimal_s,
            "tetsnn_s": tetsnn_s, "rate_ratio": ratio, "round_ratios": ratios, "goal_rate_ratio": 0.8,
            "tetsnn_events_per_s": n_events * files / tetsnn_s}


def bench_caltech_cache(tmp, recordings, events, T=10, size=48):
    root = tmp / "ncaltech"
    make_caltech_root(root, recordings, events, np.random.default_rng(4))
    total_events = sum(p.stat().st_size for p in root.rglob("*.bin")) // 5
    cache = tmp / "cache"
    seconds = timed(lambda: build_cache("n-caltech101", root, T, cache_dir=cache, size=size))
    cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    shutil.rmtree(cache)
    shutil.rmtree(root)
    scale = CALTECH_RECORDINGS / recordings
    H, W = CALTECH_SENSOR
    return {"recordings": recordings, "events": total_events, "T": T, "size": size, "build_s": seconds,
            "build_events_per_s": total_events / seconds, "cache_bytes": cache_bytes,
            "full_recordings": CALTECH_RECORDINGS, "full_build_s": seconds * scale,
            "full_cache_bytes": cache_bytes * scale,
            "full_cache_bytes_unreduced": CALTECH_RECORDINGS * T * 2 * H * W * 2, "goal_full_cache_bytes": 2e9}


def bench_batches(tmp, device, batch, repeats, T=10, n=512):
    rng = np.random.default_rng(2)
    path = tmp / "train.u16"
    frames = np.memmap(path, dtype=np.uint16, mode="w+", shape=(n, T, 2, 128, 128))
    for i in range(n):
        frames[i] = rng.poisson(0.2, (T, 2, 128, 128))
    frames.flush()
    frames = np.memmap(path, dtype=np.uint16, mode="r", shape=(n, T, 2, 128, 128))
    files = []
    for i in range(batch):   # the reference stores one float tensor file per sample
        files.append(tmp / f"sample{i}.pt")
        torch.save(torch.from_numpy(frames[i].astype(np.float32)), files[-1])
    generator = torch.Generator(device=device).manual_seed(0)
    t = interleaved({"reference": lambda: reference_batch(files, T),
                     "tetsnn": lambda: tetsnn_batch(frames, rng.choice(n, batch, replace=False), device, generator)},
                    repeats)
    return {"device": str(device), "batch": batch, "T": T, "reference_samples_per_s": batch / t["reference"],
            "tetsnn_samples_per_s": batch / t["tetsnn"], "ratio": t["reference"] / t["tetsnn"], "goal_ratio": 20}


# --- report ---------------------------------------------------------------------------------------

def verdict(met: bool) -> str:
    return "meets the goal" if met else "misses the goal"


def markdown(r) -> str:
    d, g, b, a, c = r["decode"], r["gesture"], r["batches"], r.get("atis"), r.get("caltech")
    atis = [] if a is None else [line for run in a for line in (
        f"| ATIS decode + framing, {run['files']} x {run['events']:,} events, {run['sensor_size'][0]} x "
        f"{run['sensor_size'][1]}, T={run['T']}: tetsnn rate / minimal pipeline rate | "
        f"{run['rate_ratio']:.2f}x, median "
        f"of {len(run['round_ratios'])} rounds [{min(run['round_ratios']):.2f}-{max(run['round_ratios']):.2f}] "
        f"(goal >= 0.8x: {verdict(run['rate_ratio'] >= 0.8)}; {run['tetsnn_events_per_s'] / 1e6:.0f} M events/s) |",)]
    caltech = [] if c is None else [
        f"| N-Caltech101-sized cache build ({c['recordings']:,} recordings, {c['events'] / 1e6:.0f} M events, "
        f"T={c['T']}, stored reduced to {c['size']} x {c['size']}), all CPUs | {c['build_s']:.1f} s "
        f"({c['build_events_per_s'] / 1e6:.1f} M events/s), {c['cache_bytes'] / 1e6:.0f} MB |",
        f"| the same, extrapolated to the full {c['full_recordings']:,} recordings | "
        f"{c['full_build_s'] / 60:.1f} min, {c['full_cache_bytes'] / 1e9:.2f} GB (goal < 2 GB: "
        f"{verdict(c['full_cache_bytes'] < 2e9)}; {c['full_cache_bytes_unreduced'] / 1e9:.1f} GB at sensor "
        f"resolution as uint16) |"]
    return "\n".join([
        f"## Event-camera data (`benchmarks/bench_events.py`, {r['machine']})",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| decode + framing, {d['events']:,} events, T={d['T']}: tetsnn / minimal pipeline | "
        f"{d['ratio']:.2f}x (goal <= 1.5x: {verdict(d['ratio'] <= 1.5)}) |",
        f"| tetsnn decode + framing rate | {d['tetsnn_events_per_s'] / 1e6:.0f} M events/s |",
        f"| Gesture-sized cache build ({g['recordings']} recordings, {g['samples']:,} samples, "
        f"{g['events'] / 1e6:.1f} M events, T={g['T']}), all CPUs | {g['build_s_all_cpus']:.1f} s "
        f"({g['build_events_per_s'] / 1e6:.1f} M events/s, cache written) |",
        f"| same build, 1 thread / all CPUs | {g['thread_speedup']:.2f}x |",
        f"| decoding and framing alone (no cache written), 1 thread | {g['framing_only_s_1_thread']:.1f} s |",
        f"| AEDAT 3.1 decode, per-event Python / vectorised (one recording) | {g['decode_speedup']:.0f}x |",
        f"| per-event Python decode of the same root, projected | {g['per_event_decode_s_projected']:.0f} s |",
        f"| training batches (B={b['batch']}, T={b['T']}, {b['device']}): tetsnn / reference samples/s | "
        f"{b['ratio']:.1f}x (goal >= 20x: {verdict(b['ratio'] >= 20)}) |",
        f"| tetsnn / reference samples/s | {b['tetsnn_samples_per_s']:.0f} / {b['reference_samples_per_s']:.0f} |",
    ] + atis + caltech + [
        "",
        "The decode baseline reads the file into memory; tetsnn memory-maps it. The per-event decoder "
        "is a tight struct.unpack loop, so its projection is a lower bound for slower Python decoders.",
    ] + ([
        "",
        "ATIS: the minimal pipeline never builds timestamps; tetsnn first returns the decoded events "
        "(16 bytes each, t as int64, the layout every reader shares) and frames them. On a recording "
        "of millions of events that extra memory traffic dominates; at the size of an N-Caltech101 "
        "recording (about 100,000 events) the events stay in cache and tetsnn's single bincount per "
        "recording makes up for it. The cache-build extrapolation scales the measured time and size "
        "by 8,709 / recordings. Timed on a shared 2-core machine: the per-round spread is the noise.",
    ] if a is not None else []) + ([
        "",
        "The training-batch goal is for the training device: on a GPU the resize, scaling and "
        "augmentation run there and the CPU only copies uint16 rows. This run used the CPU, where the "
        "same cores do that work too, so the ratio here understates it; run with `--device cuda` on a "
        "GPU machine to check the goal.",
    ] if b["device"] == "cpu" else []))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--recordings", type=int, default=122)
    parser.add_argument("--events-per-recording", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--atis-events", type=int, default=5_000_000)
    parser.add_argument("--caltech-recordings", type=int, default=1000)
    parser.add_argument("--caltech-events", type=int, default=100_000, help="mean events per recording")
    parser.add_argument("--parts", default="decode,gesture,batches,atis,caltech",
                        help="comma-separated benchmarks to run; the others keep their last results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        args.events, args.recordings, args.events_per_recording, args.batch, args.repeats = 200_000, 6, 20_000, 8, 1
        args.atis_events, args.caltech_recordings, args.caltech_events = 200_000, 20, 10_000
    parts = set(args.parts.split(","))
    previous = ROOT / "benchmarks" / "results" / f"{SECTION}.json"
    results = json.loads(previous.read_text()) if previous.is_file() and not args.quick else {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results["machine"] = (f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at the start, "
                          f"{torch.get_num_threads()} torch threads, {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        benches = {
            "decode": lambda: bench_decode(tmp, args.events, args.repeats),
            "gesture": lambda: bench_gesture(tmp, args.recordings, args.events_per_recording),
            "batches": lambda: bench_batches(tmp, torch.device(args.device), args.batch, max(1, args.repeats // 2)),
            "atis": lambda: [bench_atis(tmp, args.atis_events, rounds=7),   # one long recording
                             bench_atis(tmp, args.atis_events // 50, rounds=7, files=50)],   # N-Caltech101-sized
            "caltech": lambda: bench_caltech_cache(tmp, args.caltech_recordings, args.caltech_events),
        }
        for name, run in benches.items():
            if name in parts or name not in results:
                results[name] = run()
    print(markdown(results))
    if not args.quick:
        write_results(SECTION, results, markdown(results))


if __name__ == "__main__":
    main()
