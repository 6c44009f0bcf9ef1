"""The training augmentation of the timm recipe (RandAugment, random erasing, mixup / cutmix), for whole
batches on the training device with a separate draw for every sample.

``rand_augment`` and ``random_erase`` take a batch ``[B, C, H, W]`` and a draw source (see ``draws``):
a ``SampleRandom`` makes every sample's ops and parameters a function of (seed, epoch, sample index)
alone; a ``torch.Generator`` (or None: torch's global one) draws in batch order, which the ImageNet
loader workers use one image at a time (``RandAugment`` and ``RandomErasing`` wrap them for a
torchvision ``Compose``). Each sample draws its own ops, magnitudes and signs; the samples that drew
the same op are then transformed together, with per-sample parameters, so a batch costs a few
batched kernels per op rather than one Python call per image.

The ops, their magnitude scales and the policy string follow timm's ``rand_augment_transform``
("rand-m9-n1-mstd0.4-inc1": magnitude 9 of 10, 1 op per image, magnitude noise with std 0.4, the
"increasing" op set), each op applied with probability 0.5; they run on float pixel values in
[0, 255], rounded after every op as PIL's 8-bit images are. Geometric ops sample bilinearly and fill
with ``fill`` (timm: the dataset's mean colour).

``Mixup`` is timm's ``Mixup`` in its default "batch" mode: one lambda and one choice of mixup or cutmix
per batch, the batch mixed with its reverse, cutmix's lambda corrected to the box's true area.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .draws import rand

__all__ = ["RandAugmentSpec", "parse_randaugment", "rand_augment", "random_erase", "Mixup", "RandAugment",
           "RandomErasing", "RAND_OPS", "RAND_INCREASING_OPS"]

LEVEL_DENOM = 10.0          # timm's magnitude scale: level 10 is the strongest
TRANSLATE_PCT = 0.45        # timm's TranslateXRel / TranslateYRel range, as a share of the side

RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                       "TranslateYRel")


class RandAugmentSpec(NamedTuple):
    magnitude: float = 10.0     # m
    num_ops: int = 2            # n
    mstd: float = 0.0           # gaussian noise on the magnitude, per op (> 100: uniform in [0, m])
    mmax: float = 10.0          # the noisy magnitude is clipped to [0, mmax]
    increasing: bool = False    # inc1: the op set whose strength grows with the magnitude
    prob: float = 0.5           # each drawn op is applied with this probability

    @property
    def ops(self):
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


_FIELDS = {"m": ("magnitude", float), "n": ("num_ops", int), "mstd": ("mstd", float), "mmax": ("mmax", float),
           "inc": ("increasing", lambda v: bool(int(v))), "p": ("prob", float)}


def parse_randaugment(text) -> RandAugmentSpec:
    """timm's policy string (``rand-m9-n1-mstd0.4-inc1``) -> ``RandAugmentSpec``; ValueError naming the
    bad part."""
    if not isinstance(text, str) or text.split("-")[0] != "rand":
        raise ValueError(f"bad RandAugment policy {text!r}: expected rand-m<M>-n<N>[-mstd<S>][-mmax<X>][-inc<0|1>]")
    kw = {}
    for part in text.split("-")[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if not match or match.group(1) not in _FIELDS:
            raise ValueError(f"bad RandAugment policy {text!r}: unknown part {part!r} (known: m, n, mstd, mmax, inc, p)")
        name, conv = _FIELDS[match.group(1)]
        try:
            kw[name] = conv(match.group(2))
        except ValueError:
            raise ValueError(f"bad RandAugment policy {text!r}: bad number in {part!r}") from None
    spec = RandAugmentSpec(**kw)
    if spec.num_ops < 1 or not 0 <= spec.prob <= 1 or spec.mmax <= 0:
        raise ValueError(f"bad RandAugment policy {text!r}: n must be >= 1, p in [0, 1], mmax > 0")
    return spec


# -- draws ------------------------------------------------------------------------------------------
def _normal(source, n, device):
    """Standard normals from two uniforms (Box-Muller), one per sample."""
    u1, u2 = rand(source, n, device), rand(source, n, device)
    return torch.sqrt(-2 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)


# -- pixel ops on float images in [0, 255] ------------------------------------------------------------
def _col(v):
    return v.view(-1, 1, 1, 1)


def _gray(x):
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return r * 0.299 + g * 0.587 + b * 0.114


def _blend(img, degenerate, factor):
    """PIL's ImageEnhance: ``degenerate + factor * (img - degenerate)``."""
    return degenerate + _col(factor) * (img - degenerate)


def _sharpen_degenerate(x):
    """PIL's SMOOTH filter (3x3, centre weight 5, total 13), borders left as they are."""
    c = x.shape[1]
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5
    k = (k / 13).expand(c, 1, 3, 3)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = F.conv2d(x, k, groups=c)
    return out


def _autocontrast(x):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, (x - lo) * scale, x)


def _equalize(x):
    from torchvision.transforms.v2.functional import equalize

    return equalize(x.to(torch.uint8)).to(x.dtype)     # per image and channel


def _posterize(x, bits):
    shift = (8 - bits.clamp(0, 8)).view(-1, 1, 1, 1)
    xi = x.to(torch.int64)
    return ((xi >> shift) << shift).to(x.dtype)


def _affine(x, matrix, fill):
    """Resample each image at ``matrix @ (u, v, 1)`` for output pixel centres (u, v) (pixel units, PIL's
    convention: input position of each output pixel), bilinear, ``fill`` outside."""
    b, c, h, w = x.shape
    dev = x.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=x.dtype) + 0.5,
                            torch.arange(w, device=dev, dtype=x.dtype) + 0.5, indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    src = pts @ matrix.transpose(1, 2)                               # [b, h*w, 2] input positions
    grid = torch.stack([src[..., 0] / w * 2 - 1, src[..., 1] / h * 2 - 1], -1).view(b, h, w, 2)
    fill = fill.view(1, -1, 1, 1)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _matrix(b, dev, dtype):
    m = torch.zeros(b, 2, 3, device=dev, dtype=dtype)
    m[:, 0, 0] = m[:, 1, 1] = 1
    return m


def _apply_op(name, x, level, sign, fill):
    """Op ``name`` on the images ``x`` [b, C, H, W] at per-sample ``level`` (0..mmax) and ``sign`` (+-1)."""
    b, _, h, w = x.shape
    frac = level / LEVEL_DENOM
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255 - x
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        m = _matrix(b, x.device, x.dtype)
        if name == "Rotate":
            a = -torch.deg2rad(frac * 30 * sign)          # PIL: positive angles turn counter-clockwise
            cos, sin = torch.cos(a), torch.sin(a)
            cx, cy = w / 2, h / 2
            m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, sin, -sin, cos
            m[:, 0, 2] = cx - cos * cx - sin * cy
            m[:, 1, 2] = cy + sin * cx - cos * cy
        elif name == "ShearX":
            m[:, 0, 1] = frac * 0.3 * sign
        elif name == "ShearY":
            m[:, 1, 0] = frac * 0.3 * sign
        elif name == "TranslateXRel":
            m[:, 0, 2] = frac * TRANSLATE_PCT * w * sign
        else:
            m[:, 1, 2] = frac * TRANSLATE_PCT * h * sign
        return _affine(x, m, fill)
    if name == "Posterize":               # timm: bits 0..4, fewer (stronger) at low magnitude
        return _posterize(x, (frac * 4).long())
    if name == "PosterizeIncreasing":
        return _posterize(x, 4 - (frac * 4).long())
    if name in ("Solarize", "SolarizeIncreasing"):
        thresh = (frac * 256).long().float()
        if name == "SolarizeIncreasing":
            thresh = 256 - thresh
        return torch.where(x >= _col(thresh), 255 - x, x)
    if name == "SolarizeAdd":
        add = (frac * 110).long().float()
        return torch.where(x < 128, (x + _col(add)).clamp(max=255), x)
    factor = frac * 1.8 + 0.1 if not name.endswith("Increasing") else (1 + sign * frac * 0.9).clamp(min=0.1)
    base = name.removesuffix("Increasing")
    if base == "Color":
        return _blend(x, _gray(x).expand_as(x), factor)
    if base == "Contrast":
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).add(0.5).floor()
        return _blend(x, mean.expand_as(x), factor)
    if base == "Brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if base == "Sharpness":
        return _blend(x, _sharpen_degenerate(x), factor)
    raise ValueError(f"unknown RandAugment op {name!r}")


def rand_augment(x: torch.Tensor, spec: RandAugmentSpec, source, fill=(0.0,)) -> torch.Tensor:
    """RandAugment of float images ``x`` [B, C, H, W] with values in [0, 255]: each sample draws
    ``spec.num_ops`` ops (uniformly, with replacement), each applied with probability ``spec.prob``
    at magnitude ``clip(m + mstd * normal, 0, mmax)`` (uniform in [0, m] when mstd > 100, as timm) and
    a random sign. Returns a new tensor of
    integral values in [0, 255]."""
    b, dev = x.shape[0], x.device
    ops = spec.ops
    fill = torch.as_tensor(fill, dtype=x.dtype, device=dev).expand(x.shape[1])
    x = x.clone()
    for _ in range(spec.num_ops):
        # the draws of every sample, in a fixed order (so one sample's draws never depend on another's)
        which = torch.minimum((rand(source, b, dev) * len(ops)).long(), torch.tensor(len(ops) - 1, device=dev))
        apply = rand(source, b, dev) < spec.prob
        noise = _normal(source, b, dev)
        sign = torch.where(rand(source, b, dev) < 0.5, -1.0, 1.0).to(x.dtype)
        if spec.mstd > 100:              # timm: uniform in [0, m]
            level = (spec.magnitude * rand(source, b, dev)).clamp(0, spec.mmax).to(x.dtype)
        else:
            level = (spec.magnitude + spec.mstd * noise).clamp(0, spec.mmax).to(x.dtype)
        for k, name in enumerate(ops):
            sel = torch.nonzero(apply & (which == k)).flatten()
            if len(sel):
                out = _apply_op(name, x[sel], level[sel], sign[sel], fill)
                x[sel] = out.round().clamp(0, 255)
    return x


def random_erase(x: torch.Tensor, prob: float, source, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                 attempts: int = 10) -> torch.Tensor:
    """timm's RandomErasing (mode "const", one box) for a batch ``[B, ..., H, W]``: with probability
    ``prob`` a sample gets one box of area share in [min_area, max_area] and log-uniform aspect ratio in
    [min_aspect, 1 / min_aspect], set to 0; the first of ``attempts`` tries that fits is taken (none
    fits: unchanged)."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    dev = x.device
    # the draws that every sample makes come first; the tries stop once every erased sample has its
    # box, which changes no sample's draws
    erase = rand(source, b, dev) < prob
    top_u, left_u = rand(source, b, dev), rand(source, b, dev)
    hh = torch.zeros(b, dtype=torch.int64, device=dev)
    ww = torch.zeros_like(hh)
    found = torch.zeros(b, dtype=torch.bool, device=dev)
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    for _ in range(attempts):
        if bool((found | ~erase).all()):
            break
        area = (min_area + rand(source, b, dev) * (max_area - min_area)) * (h * w)
        aspect = torch.exp(log_lo + rand(source, b, dev) * (log_hi - log_lo))
        bh = torch.sqrt(area * aspect).round().long()
        bw = torch.sqrt(area / aspect).round().long()
        fits = (bh < h) & (bw < w) & ~found
        hh, ww = torch.where(fits, bh, hh), torch.where(fits, bw, ww)
        found |= fits
    top = torch.minimum((top_u * (h - hh + 1)).long(), h - hh)
    left = torch.minimum((left_u * (w - ww + 1)).long(), w - ww)
    erase &= found & (hh > 0) & (ww > 0)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + hh).view(-1, 1, 1)) & (cols >= left.view(-1, 1, 1))
           & (cols < (left + ww).view(-1, 1, 1)) & erase.view(-1, 1, 1))
    box = box.view(b, *([1] * (x.dim() - 3)), h, w)
    return x.masked_fill(box, 0)


class Mixup:
    """timm's Mixup, "batch" mode: ``mix(x, y, rng)`` -> (mixed x, soft targets [N, num_classes]).

    With probability ``prob`` the batch is mixed; with both alphas > 0 it takes cutmix with probability
    ``switch_prob`` (0.5) and mixup otherwise. Mixup: ``lam x + (1 - lam) x.flip(0)``, lam ~
    Beta(mixup, mixup). Cutmix: a box of side ``sqrt(1 - lam)`` of the image's (centre uniform, clipped
    to the image) is taken from ``x.flip(0)``, lam ~ Beta(cutmix, cutmix), then lam is set to the
    uncovered share. Targets: ``lam onehot(y) + (1 - lam) onehot(y.flip(0))``. Works on any
    ``[N, ..., H, W]`` (event frames: the same box in every step). ``rng``: a ``numpy.random.Generator``
    (one per batch; every process that holds a part of the batch draws the same values)."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5):
        self.num_classes, self.mixup, self.cutmix = num_classes, mixup, cutmix
        self.prob, self.switch_prob = prob, switch_prob

    def draw(self, rng: np.random.Generator):
        """(lam, use_cutmix) of one batch."""
        lam, use_cutmix = 1.0, False
        if rng.random() < self.prob:
            if self.mixup > 0 and self.cutmix > 0:
                use_cutmix = rng.random() < self.switch_prob
                lam = rng.beta(self.cutmix, self.cutmix) if use_cutmix else rng.beta(self.mixup, self.mixup)
            elif self.mixup > 0:
                lam = rng.beta(self.mixup, self.mixup)
            elif self.cutmix > 0:
                use_cutmix, lam = True, rng.beta(self.cutmix, self.cutmix)
        return float(lam), use_cutmix

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator):
        lam, use_cutmix = self.draw(rng)
        if lam < 1.0:
            if use_cutmix:
                h, w = x.shape[-2], x.shape[-1]
                ratio = math.sqrt(1 - lam)
                ch, cw = int(h * ratio), int(w * ratio)
                cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
                y0, y1 = np.clip([cy - ch // 2, cy + (ch + 1) // 2], 0, h)
                x0, x1 = np.clip([cx - cw // 2, cx + (cw + 1) // 2], 0, w)
                x = x.clone()
                x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
                lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
            else:
                x = x * lam + x.flip(0) * (1 - lam)
        hot = F.one_hot(y, self.num_classes).to(torch.float32)
        return x, hot * lam + hot.flip(0) * (1 - lam)


class RandAugment:
    """A torchvision-style transform: ``rand_augment`` of one uint8 image tensor [C, H, W], drawing from
    torch's global generator (which the ImageNet loader seeds per sample)."""

    def __init__(self, spec: RandAugmentSpec | str, fill=(0.0,)):
        self.spec = parse_randaugment(spec) if isinstance(spec, str) else spec
        self.fill = tuple(fill)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return rand_augment(img[None].float(), self.spec, None, self.fill)[0].to(torch.uint8)


class RandomErasing:
    """A torchvision-style transform: ``random_erase`` of one (normalised) image tensor [C, H, W]."""

    def __init__(self, prob: float):
        self.prob = prob

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return random_erase(img[None], self.prob, None)[0]
