"""Training-loader throughput: tetsnn's on-device batch augmentation against torchvision's
per-sample transforms, on CIFAR-shaped uint8 images (32x32x3, pad-4 crop + flip + normalise).

    .venv/bin/python benchmarks/bench_loader.py [--samples 10000] [--rounds 3] [--device cpu] [--threads 1]
    .venv/bin/python benchmarks/bench_loader.py --recipe [--samples 2560] [--rounds 7]

``--recipe`` measures the transformer recipe instead: crop + flip + RandAugment rand-m9-n1-mstd0.4-inc1
+ normalise + random erasing 0.25 + mixup 0.5, tetsnn's batched on-device pipeline against timm's
per-sample PIL pipeline (timm's ``rand_augment_transform``, ``RandomErasing`` and ``Mixup``, as the
papers' training scripts build it), quoted as the median of the per-round throughput ratios.

The variants run interleaved, round after round, in one process. Writes
benchmarks/results/bench_loader.json (bench_loader_recipe.json) and its own section of
docs/performance.md.
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

from report import commit, write_results

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


RECIPE = dict(randaugment="rand-m9-n1-mstd0.4-inc1", random_erasing=0.25, mixup=0.5)


def _posterize_any_bits(img, bits_to_keep, **__):
    """timm's posterize, also for 0 bits (a black image, as Pillow < 10.3 gave): timm's "increasing"
    posterize asks for 0 bits at magnitude 10, which the noisy magnitude reaches, and current Pillow
    refuses that."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda v: 0)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


class TimmPerSample(PerSample):
    """The papers' CIFAR pipeline through timm: one PIL image at a time, RandAugment on PIL, erasing on
    the normalised tensor."""

    def __init__(self, images_hwc, labels):
        from timm.data import auto_augment
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.random_erasing import RandomErasing

        for name, op in auto_augment.NAME_TO_OP.items():
            if op is auto_augment.posterize:
                auto_augment.NAME_TO_OP[name] = _posterize_any_bits

        super().__init__(images_hwc, labels)
        spec = STATIC["cifar10"]
        hparams = dict(translate_const=int(32 * 0.45), img_mean=tuple(round(255 * m) for m in spec["mean"]))
        self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                             rand_augment_transform(RECIPE["randaugment"], hparams), T.ToTensor(),
                             T.Normalize(spec["mean"], spec["std"]),
                             RandomErasing(RECIPE["random_erasing"], mode="const", device="cpu")])


def mixed(batches, mix):
    """Each batch through a batch mixer ``mix(x, y, step)``."""
    for step, (x, y) in enumerate(batches):
        yield mix(x, y, step)


def recipe(args, device, images, labels):
    """tetsnn's batched on-device recipe against timm's per-sample one: per-round ratios."""
    import os

    import timm
    from timm.data.mixup import Mixup as TimmMixup

    from tetsnn.data.augment import Mixup

    fetch = StaticImages(images.transpose(0, 3, 1, 2), labels, "cifar10", device,
                         randaugment=RECIPE["randaugment"], random_erasing=RECIPE["random_erasing"])
    on_device = BatchLoader(args.samples, args.batch_size, fetch, train=True, seed=0, device=device)
    ours = Mixup(10, mixup=RECIPE["mixup"])
    theirs = TimmMixup(mixup_alpha=RECIPE["mixup"], cutmix_alpha=0.0, label_smoothing=0.0, num_classes=10)
    per_sample = {w: DataLoader(TimmPerSample(images, labels), args.batch_size, shuffle=True, num_workers=w,
                                drop_last=True, pin_memory=device.type == "cuda") for w in sorted({0, args.workers})}
    variants = {"tetsnn on-device": lambda: mixed(on_device, lambda x, y, s: ours(x, y, np.random.default_rng(s))),
                **{f"timm per-sample PIL ({w} workers)": (lambda w=w: mixed(per_sample[w], lambda x, y, s: theirs(x, y)))
                   for w in per_sample}}
    rates = {name: [] for name in variants}
    loads = []
    for r in range(args.rounds):
        on_device.set_epoch(r)
        loads.append(round(os.getloadavg()[0], 1))
        for name, make in variants.items():
            rates[name].append(one_epoch(make(), device))
    base = "tetsnn on-device"
    ratios = {k: [a / b for a, b in zip(rates[base], v)] for k, v in rates.items() if k != base}
    result = dict(commit=commit(), device=str(device), cpu_threads=torch.get_num_threads(), cpus=os.cpu_count(),
                  samples=args.samples, batch_size=args.batch_size, rounds=args.rounds, machine=platform.machine(),
                  timm=timm.__version__, recipe=RECIPE, load_average_at_round_starts=loads,
                  samples_per_s_median={k: round(float(np.median(v))) for k, v in rates.items()},
                  ratio_median={k: round(float(np.median(v)), 2) for k, v in ratios.items()},
                  ratios={k: [round(x, 2) for x in v] for k, v in ratios.items()})
    print(json.dumps(result, indent=2))
    write_results(NAME + "_recipe", result, recipe_markdown(result))


def recipe_markdown(res) -> str:
    rows = "\n".join(f"| {k} | {v:,} | {res['ratio_median'].get(k, 1.0)}x |"
                     for k, v in res["samples_per_s_median"].items())
    loads = res["load_average_at_round_starts"]
    return (f"## Transformer recipe augmentation (`benchmarks/bench_loader.py` with --recipe)\n\n"
            f"Commit {res['commit']}. CIFAR-shaped uint8 images, batch {res['batch_size']}: pad-4 crop + flip + "
            f"RandAugment `{res['recipe']['randaugment']}` + normalise + random erasing {res['recipe']['random_erasing']} "
            f"+ mixup {res['recipe']['mixup']}. tetsnn's pipeline runs batched on {res['device']} with per-sample draws; "
            f"timm {res['timm']}'s runs per sample on PIL images in a DataLoader, then its Mixup on the batch. "
            f"{res['samples']:,} samples per pass, {res['rounds']} interleaved rounds, main process with "
            f"{res['cpu_threads']} torch thread(s), {res['machine']}, {res['cpus']} CPUs shared with other users "
            f"(load average {min(loads)}-{max(loads)} at the round starts): the absolute rates are low and noisy, "
            f"the per-round ratios less so. Last column: the median over the rounds of tetsnn's throughput over "
            f"that row's in the same round.\n\n"
            f"| pipeline | samples/s (median) | tetsnn speed-up (median of per-round ratios) |\n|---|---|---|\n{rows}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of the main process (1: immune to other processes on a shared machine)")
    p.add_argument("--recipe", action="store_true",
                   help="measure the transformer recipe's augmentation against timm's per-sample pipeline")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.samples, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.samples)
    if args.recipe:
        return recipe(args, device, images, labels)

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
