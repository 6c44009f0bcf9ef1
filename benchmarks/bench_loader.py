"""Training-loader throughput: tetsnn's on-device batch augmentation against torchvision's
per-sample transforms, on CIFAR-shaped uint8 images (32x32x3, pad-4 crop + flip + normalise).

    .venv/bin/python benchmarks/bench_loader.py [--samples 10000] [--rounds 3] [--device cpu] [--threads 1]

The variants run interleaved, round after round, in one process. Writes
benchmarks/results/bench_loader.json and its own section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from tetsnn.data import BatchLoader
from tetsnn.data.static import STATIC, StaticImages

from report import write_results

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench_loader"


class PerSample(Dataset):
    """What torchvision's CIFAR10 does: one PIL image and one transform pipeline per sample."""

    def __init__(self, images_hwc, labels):
        spec = STATIC["cifar10"]
        self.images, self.labels = images_hwc, labels
        self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize(spec["mean"], spec["std"])])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(Image.fromarray(self.images[i])), int(self.labels[i])


def one_epoch(batches, device) -> float:
    """Samples per second over one pass (each batch is on the device before the clock stops)."""
    t0, n = time.perf_counter(), 0
    for x, y in batches:
        x = x.to(device)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of the main process (1: immune to other processes on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.samples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.samples)

    fetch = StaticImages(images.transpose(0, 3, 1, 2), labels, "cifar10", device)
    on_device = BatchLoader(args.samples, args.batch_size, fetch, train=True, seed=0, device=device)
    per_sample = {w: DataLoader(PerSample(images, labels), args.batch_size, shuffle=True, num_workers=w,
                                pin_memory=device.type == "cuda") for w in sorted({0, args.workers})}
    variants = {"tetsnn on-device": lambda: on_device,
                **{f"torchvision per-sample ({w} workers)": (lambda w=w: per_sample[w]) for w in per_sample}}
    rates = {name: [] for name in variants}
    for r in range(args.rounds):
        on_device.set_epoch(r)
        for name, make in variants.items():
            rates[name].append(one_epoch(make(), device))
    med = {name: float(np.median(v)) for name, v in rates.items()}
    base = med["tetsnn on-device"]
    result = dict(device=str(device), cpu_threads=torch.get_num_threads(), samples=args.samples,
                  batch_size=args.batch_size, rounds=args.rounds, machine=platform.machine(),
                  samples_per_s={k: round(v) for k, v in med.items()},
                  speedup_vs={k: round(base / v, 1) for k, v in med.items() if k != "tetsnn on-device"})
    print(json.dumps(result, indent=2))
    write_results(NAME, result, markdown(result))


def markdown(res) -> str:
    rows = "\n".join(f"| {k} | {v:,} | {res['speedup_vs'].get(k, 1.0)}x |" for k, v in res["samples_per_s"].items())
    return (f"## Training loader (`benchmarks/bench_loader.py`)\n\n"
            f"CIFAR-shaped uint8 images, pad-4 crop + flip + normalise, batch {res['batch_size']}, "
            f"{res['samples']:,} samples per pass, median of {res['rounds']} interleaved passes on {res['device']}, "
            f"torch threads: {res['cpu_threads']}. The last column is tetsnn's on-device loader's throughput "
            f"divided by that row's.\n\n| loader | samples/s | on-device speed-up |\n|---|---|---|\n{rows}")

if __name__ == "__main__":
    main()
