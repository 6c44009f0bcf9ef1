"""Static image datasets: scikit-learn's digits, CIFAR10/100 and ImageNet.

The digits and CIFAR are small enough to live on the training device as one uint8 tensor
``[N, C, H, W]``; ``StaticImages`` crops, flips and normalises a whole batch there, with no
per-sample Python. ImageNet goes through torchvision's ImageFolder and a DataLoader.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .draws import rand, randint

__all__ = ["DataError", "STATIC", "DIGITS_SPLIT_SEED", "load_digits", "load_cifar", "StaticImages",
           "augment", "imagenet_folders"]

DIGITS_SPLIT_SEED = 0   # the digits split never depends on --seed: every run sees the same test set

# pixel scale (uint8 value of white), normalisation and training augmentation of each dataset
STATIC = {
    "digits": dict(scale=16.0, mean=(0.3053,), std=(0.3760,), pad=1, flip=False),
    "cifar10": dict(scale=255.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), pad=4, flip=True),
    "cifar100": dict(scale=255.0, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761), pad=4, flip=True),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Missing or unreadable dataset files (one-line message naming the path)."""


def load_digits():
    """scikit-learn's 8x8 digits (values 0..16) as uint8 ``[N, 1, 8, 8]``, split 80/20 stratified.

    Returns ``(train_x, train_y, test_x, test_y, info)``; ``info`` records the split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    images = d.images.astype(np.uint8)[:, None]
    labels = d.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                           random_state=DIGITS_SPLIT_SEED)
    info = dict(split="stratified 80/20 (scikit-learn train_test_split)", split_seed=DIGITS_SPLIT_SEED,
                train_size=len(train_idx), test_size=len(test_idx), test_indices=test_idx.tolist())
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], info


def load_cifar(name: str, root: str, train: bool, download: bool = False):
    """CIFAR10/100 through torchvision as uint8 ``[N, 3, 32, 32]`` and int64 labels."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    expected = os.path.join(root, cls.base_folder)
    if not download and not os.path.isdir(expected):
        raise DataError(f"{name} not found: expected the extracted files in {expected} "
                        f"(set --data-dir, or pass --download to fetch them)")
    try:
        ds = cls(root, train=train, download=download)
    except RuntimeError as e:
        raise DataError(f"{name} under {root}: {e}") from None
    except OSError as e:     # no network (URLError), or the folder cannot be written
        from urllib.error import URLError

        from ..utils import error_line
        if isinstance(e, URLError):
            reason = getattr(e, "reason", e)
            raise DataError(f"cannot download {name} to {root}: no connection to {cls.url} ({reason})") from None
        raise DataError(f"cannot download {name} to {root}: {error_line(e)}") from None
    return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to ``pad`` pixels (zero fill, as RandomCrop(size, padding=pad)) and a
    horizontal flip with p=0.5, drawn per sample, for a whole batch ``[B, C, H, W]`` at once.
    ``generator``: a ``torch.Generator``, or a ``SampleRandom`` (draws fixed by each sample's index)."""
    b, c, h, w = x.shape
    dev = x.device
    if pad:
        hp, wp = h + 2 * pad, w + 2 * pad
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = randint(generator, 0, 2 * pad + 1, b, dev)
        ox = randint(generator, 0, 2 * pad + 1, b, dev)
        # the crop of sample i starts at flat position oy*wp + ox of its padded image
        window = (torch.arange(h, device=dev)[:, None] * wp + torch.arange(w, device=dev)).view(1, 1, h * w)
        idx = (oy * wp + ox).view(b, 1, 1) + window
        x = torch.gather(xp.reshape(b, c, hp * wp), 2, idx.expand(b, c, h * w)).view(b, c, h, w)
    if flip:
        mask = rand(generator, b, dev) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class StaticImages:
    """``fetch(indices, generator)`` for images held on the device: index, augment (when a generator
    is given, i.e. for training), convert to float and normalise.

    Training augmentation: the dataset's shift and flip, then RandAugment (``randaugment``: a policy
    string, see ``augment.parse_randaugment``) on pixel values scaled to [0, 255], normalisation, and
    random erasing with probability ``random_erasing``, all drawn per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, dataset: str, device, randaugment=None,
                 random_erasing: float = 0.0):
        from .augment import parse_randaugment

        spec = STATIC[dataset]
        self.randaugment = parse_randaugment(randaugment) if randaugment else None
        self.random_erasing = random_erasing
        self.fill = tuple(255.0 * m for m in spec["mean"])     # geometric ops fill with the mean colour
        self.images = torch.as_tensor(images, dtype=torch.uint8).to(device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        self.pad, self.flip, self.scale = spec["pad"], spec["flip"], spec["scale"]
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(spec["mean"], device=device).view(shape)
        self.std = torch.tensor(spec["std"], device=device).view(shape)

    def __len__(self):
        return len(self.labels)

    def __call__(self, idx: torch.Tensor, generator=None):
        idx = idx.to(self.images.device)
        x = self.images[idx]
        if generator is not None:
            x = augment(x, self.pad, self.flip, generator)
        if generator is not None and self.randaugment is not None:
            from .augment import rand_augment

            x = rand_augment(x.float() * (255.0 / self.scale), self.randaugment, generator, self.fill)
            x = (x / 255.0 - self.mean) / self.std
        else:
            x = (x.float() / self.scale - self.mean) / self.std
        if generator is not None and self.random_erasing:
            from .augment import random_erase

            x = random_erase(x, self.random_erasing, generator)
        return x, self.labels[idx]


def imagenet_folders(root: str, with_train: bool = True, randaugment=None, random_erasing: float = 0.0):
    """ImageNet's ``train/`` and ``val/`` class folders through torchvision's ImageFolder, with
    RandomResizedCrop(224) + flip (+ RandAugment ``randaugment`` before and random erasing with
    probability ``random_erasing`` after the normalisation, when given) for training and Resize(256) +
    CenterCrop(224) for evaluation. Returns ``(train, val)``; train is None when ``with_train`` is False."""
    from torchvision import datasets, transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]
    if randaugment:
        from .augment import RandAugment

        train[2:3] = [T.PILToTensor(), RandAugment(randaugment, fill=[255.0 * m for m in IMAGENET_MEAN]),
                      T.ConvertImageDtype(torch.float32)]
    if random_erasing:
        from .augment import RandomErasing

        train.append(RandomErasing(random_erasing))
    tf = {"train": T.Compose(train),
          "val": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])}
    out = []
    for split in ("train", "val"):
        if split == "train" and not with_train:
            out.append(None)
            continue
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise DataError(f"imagenet not found: expected class folders in {path} (set --data-dir)")
        out.append(datasets.ImageFolder(path, transform=tf[split]))
    return out
