"""The timm-recipe augmentation: RandAugment and random erasing per sample on the device, mixup / cutmix
per batch, their ImageNet worker transforms, and the recipe keys of ``tetsnn train``."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import tetsnn.engine.train as train_mod
from tetsnn.data.augment import (RAND_INCREASING_OPS, RAND_OPS, Mixup, RandAugment, RandAugmentSpec, _apply_op,
                                 parse_randaugment, rand_augment, random_erase)
from tetsnn.data.draws import SampleRandom
from tetsnn.data.static import StaticImages
from tetsnn.engine.config import ConfigError, resolve
from tetsnn.engine.train import main

SPEC = parse_randaugment("rand-m9-n1-mstd0.4-inc1")


def _images(n, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float()


def test_policy_string_parses_as_timm_writes_it():
    assert SPEC == RandAugmentSpec(magnitude=9.0, num_ops=1, mstd=0.4, mmax=10.0, increasing=True, prob=0.5)
    assert parse_randaugment("rand-m7-mstd0.5-inc1") == RandAugmentSpec(7.0, 2, 0.5, 10.0, True, 0.5)
    assert SPEC.ops == RAND_INCREASING_OPS and len(SPEC.ops) == 15
    for bad in ("m9-n1", "rand-m9-x2", "rand-mfoo", "rand-n0", 3):
        with pytest.raises(ValueError, match="RandAugment policy"):
            parse_randaugment(bad)


def test_rand_augment_is_per_sample_and_fixed_by_seed_epoch_index():
    img = _images(1, seed=1).expand(16, -1, -1, -1).contiguous()      # 16 copies of one image
    idx = torch.arange(100, 116)
    spec = RandAugmentSpec(magnitude=9, num_ops=2, mstd=0.4, increasing=True, prob=1.0)
    out = rand_augment(img, spec, SampleRandom(5, 1, idx))
    # identical inputs, different indices: different ops or parameters
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) >= 12
    # a sample's result depends only on (seed, epoch, index): not on its batch or position in it
    perm = torch.tensor([3, 9, 0])
    again = rand_augment(img[:3], spec, SampleRandom(5, 1, idx[perm]))
    torch.testing.assert_close(again, out[perm], rtol=0, atol=0)
    assert not torch.equal(rand_augment(img, spec, SampleRandom(5, 2, idx)), out)    # another epoch
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())
    wide = rand_augment(img, parse_randaugment("rand-m9-n2-mstd101-mmax20-p1"), SampleRandom(5, 1, idx))
    assert wide.min() >= 0 and wide.max() <= 255 and not torch.equal(wide, out)


def _pil(x):
    return Image.fromarray(x.permute(1, 2, 0).to(torch.uint8).numpy())


def _from_pil(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()


@pytest.mark.parametrize("name, level, sign, reference", [
    ("Invert", 5, 1, ImageOps.invert),
    ("AutoContrast", 5, 1, ImageOps.autocontrast),
    ("Equalize", 5, 1, ImageOps.equalize),
    ("SolarizeIncreasing", 5, 1, lambda im: ImageOps.solarize(im, 256 - 128)),
    ("PosterizeIncreasing", 6, 1, lambda im: ImageOps.posterize(im, 4 - 2)),
    ("Posterize", 6, 1, lambda im: ImageOps.posterize(im, 2)),
    ("BrightnessIncreasing", 5, -1, lambda im: ImageEnhance.Brightness(im).enhance(1 - 0.45)),
    ("ColorIncreasing", 5, 1, lambda im: ImageEnhance.Color(im).enhance(1 + 0.45)),
    ("ContrastIncreasing", 5, 1, lambda im: ImageEnhance.Contrast(im).enhance(1 + 0.45)),
    ("Sharpness", 5, 1, lambda im: ImageEnhance.Sharpness(im).enhance(0.5 * 1.8 + 0.1)),
])
def test_pixel_ops_match_pil(name, level, sign, reference):
    """Each op against PIL (timm's implementation) on 8-bit images: within one grey level."""
    x = _images(2, seed=3)
    out = _apply_op(name, x, torch.full((2,), float(level)), torch.full((2,), float(sign)), torch.zeros(3))
    for i in range(2):
        want = _from_pil(reference(_pil(x[i])))
        assert (out[i].round().clamp(0, 255) - want).abs().max() <= 1, name


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_every_op_matches_timms(monkeypatch, sign):
    """Each of the 21 ops against timm's own (its level-to-argument scale and PIL op, the sign fixed):
    pixel ops within one grey level; geometric ops (bilinear, mean-colour fill) alike but for a thin
    border, where PIL and grid_sample blend the fill differently."""
    import timm.data.auto_augment as aa

    monkeypatch.setattr(aa, "_randomly_negate", lambda v: v * sign)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 256, (1, 3, 32, 32), generator=g).float()
    smooth = torch.nn.functional.interpolate(torch.randint(0, 256, (1, 3, 8, 8), generator=g).float(), size=32,
                                             mode="bilinear", align_corners=False).round()
    fill = (120, 110, 100)
    for name in dict.fromkeys(RAND_OPS + RAND_INCREASING_OPS):
        to_arg = aa.LEVEL_TO_ARG[name]
        args = to_arg(7.0, dict(translate_pct=0.45)) if to_arg is not None else ()
        x = smooth if name in GEOMETRIC else noisy
        want = _from_pil(aa.NAME_TO_OP[name](_pil(x[0]), *args, fillcolor=fill, resample=Image.BILINEAR))
        got = _apply_op(name, x, torch.tensor([7.0]), torch.tensor([sign]), torch.tensor(fill, dtype=torch.float32))
        diff = (got[0].round().clamp(0, 255) - want).abs()
        if name in GEOMETRIC:
            assert diff.mean() < 1.5 and (diff > 2).float().mean() < 0.05, name
        else:
            assert diff.max() <= 1, name


def test_translate_moves_by_whole_pixels_and_fills_with_the_mean():
    x = _images(2, seed=4, size=20)
    fill = torch.tensor([10.0, 20.0, 30.0])
    # level 10/9 * ... : choose the level that gives a shift of exactly 9 pixels (0.45 * 20)
    out = _apply_op("TranslateXRel", x, torch.full((2,), 10.0), torch.tensor([1.0, -1.0]), fill)
    torch.testing.assert_close(out[0, :, :, :11], x[0, :, :, 9:], atol=1e-3, rtol=0)         # content moves left
    torch.testing.assert_close(out[0, :, :, 11:], fill.view(3, 1, 1).expand(3, 20, 9), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1, :, :, 9:], x[1, :, :, :11], atol=1e-3, rtol=0)         # the other sign: right


def test_random_erase_is_per_sample_bounded_and_deterministic():
    x = torch.ones(64, 3, 32, 32)
    idx = torch.arange(64)
    out = random_erase(x, 1.0, SampleRandom(0, 1, idx))
    erased = (out == 0).all(1)                                      # [64, 32, 32] boxes
    area = erased.flatten(1).sum(1).float() / (32 * 32)
    assert (area > 0).float().mean() > 0.9                          # nearly every sample got a box
    assert area.max() <= 1 / 3 + 0.05
    assert len({tuple(e.nonzero()[0].tolist()) for e in erased if e.any()}) > 40   # boxes differ
    for e in erased[:8]:                                            # each a rectangle
        if e.any():
            rows, cols = e.any(1).nonzero().flatten(), e.any(0).nonzero().flatten()
            assert e.sum() == len(rows) * len(cols)
    torch.testing.assert_close(random_erase(x[5:7], 1.0, SampleRandom(0, 1, idx[5:7])), out[5:7])
    assert torch.equal(random_erase(x, 0.0, SampleRandom(0, 1, idx)), x)


@pytest.mark.parametrize("alphas", [dict(mixup=0.8), dict(cutmix=1.0), dict(mixup=0.8, cutmix=1.0)])
def test_mixup_targets_sum_to_one_and_match_the_pixel_shares(alphas):
    mix = Mixup(5, **alphas)
    x = torch.rand(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    kinds = set()
    for step in range(8):
        xm, t = mix(x, y, np.random.default_rng(step))
        torch.testing.assert_close(t.sum(1), torch.ones(6))
        lam = t[1, 1].item()                      # sample 1 is paired with sample 4 (the reverse)
        assert t[1, 4].item() == pytest.approx(1 - lam) and 0 <= lam <= 1
        if lam == 1:
            assert torch.equal(xm, x)
        elif torch.allclose(xm[1], lam * x[1] + (1 - lam) * x[4], atol=1e-6):
            kinds.add("mixup")
        else:                                     # cutmix: a box of sample 4, the share 1 - lam
            moved = (xm[1] != x[1]).any(0)
            assert moved.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
            torch.testing.assert_close(xm[1][:, moved], x[4][:, moved])
            kinds.add("cutmix")
    assert kinds == {k for k in ("mixup", "cutmix") if alphas.get(k)}
    same = x[:1].expand(6, -1, -1, -1)
    xm, _ = mix(same, y, np.random.default_rng(0))                  # mixing identical images: unchanged
    torch.testing.assert_close(xm, same)
    frames = torch.rand(6, 3, 2, 8, 8)                              # event frames [N, T, C, H, W]
    fm, t = mix(frames, y, np.random.default_rng(1))
    assert t[1, 1] < 1                                               # this draw mixes
    for step in (1, 2):                                              # every step mixed alike
        assert torch.equal(fm[:, step] != frames[:, step], fm[:, 0] != frames[:, 0])


def test_mixup_batch_mode_draws_one_lambda_and_switches_at_even_odds():
    mix = Mixup(10, mixup=0.8, cutmix=1.0)
    draws = [mix.draw(np.random.default_rng(s)) for s in range(400)]
    assert 0.4 < np.mean([c for _, c in draws]) < 0.6
    assert all(0 <= lam <= 1 for lam, _ in draws)
    off = Mixup(10, mixup=0.8, prob=0.0)
    assert all(off.draw(np.random.default_rng(s)) == (1.0, False) for s in range(20))


def test_static_images_defaults_unchanged_and_recipe_per_sample():
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(8)
    plain = StaticImages(images, labels, "cifar10", "cpu")
    idx = torch.arange(8)
    x, _ = plain(idx, SampleRandom(1, 1, idx))
    from tetsnn.data.static import augment
    ref = augment(torch.as_tensor(images), 4, True, SampleRandom(1, 1, idx)).float() / 255
    ref = (ref - plain.mean) / plain.std
    assert torch.equal(x, ref)                                       # the default path, bit for bit
    rich = StaticImages(images, labels, "cifar10", "cpu", randaugment="rand-m9-n1-mstd0.4-inc1", random_erasing=1.0)
    xr, _ = rich(idx, SampleRandom(1, 1, idx))
    assert xr.shape == x.shape and not torch.equal(xr, x)
    torch.testing.assert_close(rich(idx[2:4], SampleRandom(1, 1, idx[2:4]))[0], xr[2:4])
    assert torch.equal(rich(idx, None)[0], plain(idx, None)[0])      # evaluation is never augmented


def test_imagenet_worker_transform_is_seeded_per_sample(tmp_path):
    from tetsnn.data.loader import SeededSamples
    from tetsnn.data.static import imagenet_folders

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")
    train, _ = imagenet_folders(str(tmp_path), randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    plain, _ = imagenet_folders(str(tmp_path))
    a, b = SeededSamples(train, 3, 1), SeededSamples(plain, 3, 1)
    x = a[0][0]
    assert x.shape == (3, 224, 224) and torch.equal(a[0][0], x)      # the same (seed, epoch, index)
    assert not torch.equal(SeededSamples(train, 3, 2)[0][0], x)
    assert not torch.equal(b[0][0], x)
    img = torch.full((3, 8, 8), 7, dtype=torch.uint8)
    torch.manual_seed(0)
    y1 = RandAugment("rand-m9-n2-mstd0.4-inc1")(img)
    torch.manual_seed(0)
    assert torch.equal(RandAugment("rand-m9-n2-mstd0.4-inc1")(img), y1) and y1.dtype == torch.uint8


def test_recipe_keys_resolve_and_event_frames_refuse_image_ops():
    cfg = resolve({"optimizer": "adamw", "label_smoothing": "0.1", "mixup": 0.8, "cutmix": 1,
                   "randaugment": "rand-m9-n1-mstd0.4-inc1", "random_erasing": 0.25, "warmup_epochs": 2})
    assert cfg["label_smoothing"] == 0.1 and cfg["optimizer"] == "adamw"
    for key, value in (("randaugment", "rand-m9-n1"), ("random_erasing", 0.25)):
        with pytest.raises(ConfigError, match=f"{key} needs static images"):
            resolve({"dataset": "cifar10-dvs", "data_dir": "/nowhere", key: value})
    resolve({"dataset": "cifar10-dvs", "data_dir": "/nowhere", "mixup": 0.5, "cutmix": 1.0})
    for bad in ({"label_smoothing": 1.0}, {"mixup": -1}, {"random_erasing": 2}, {"warmup_epochs": -1},
                {"randaugment": "auto"}):
        with pytest.raises(ConfigError, match=list(bad)[0]):
            resolve(bad)


def test_lr_warms_up_linearly_then_follows_the_cosine():
    cfg = {"warmup_epochs": 3, "epochs": 10}
    got = [train_mod.lr_factor(cfg, e) for e in range(10)]
    assert got[:3] == [0.25, 0.5, 0.75]
    np.testing.assert_allclose(got[3:], [(1 + np.cos(np.pi * e / 10)) / 2 for e in range(3, 10)])


QUICK = ["--limit-train", "32", "--limit-test", "16", "--batch-size", "16", "--T", "1"]


def test_training_mixes_until_the_off_epoch_and_resumes_bit_identically(tmp_path, monkeypatch):
    """The whole recipe through ``tetsnn train``: soft targets in the first epoch only, the warmup's
    learning rates, and a run stopped mid-epoch by a signal resumes to the same weights."""
    import os
    import signal

    from tetsnn.engine.checkpoint import load_checkpoint

    seen, stop_at = [], [0]
    build = train_mod.build_criterion

    def recording(cfg):
        crit = build(cfg)

        def criterion(out, y):
            if torch.is_grad_enabled():
                seen.append((y.dim(), float(y.sum(-1).mean()) if y.dim() == 2 else None))
                if len(seen) == stop_at[0]:
                    os.kill(os.getpid(), signal.SIGTERM)
            return crit(out, y)
        return criterion
    monkeypatch.setattr(train_mod, "build_criterion", recording)
    args = QUICK + ["--epochs", "2", "--loss", "tet", "--mixup", "0.5", "--cutmix", "1.0", "--mixup-off-epoch", "1",
                    "--label-smoothing", "0.1", "--optimizer", "adamw", "--weight-decay", "0.05", "--warmup-epochs",
                    "1", "--randaugment", "rand-m9-n1-mstd0.4-inc1", "--random-erasing", "0.25", "--seed", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(args + ["--out", str(full)]) == 0
    assert [d for d, _ in seen] == [2] * 2 + [1] * 2                # 2 steps per epoch, mixed in epoch 1
    assert all(abs(s - 1) < 1e-6 for d, s in seen if d == 2)
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([m["lr"] for m in metrics], [1e-3 / 2, 1e-3 * (1 + np.cos(np.pi / 2)) / 2])
    seen.clear()
    stop_at[0] = 1                                                  # stop between the two mixed steps
    assert main(args + ["--out", str(part)]) == 0
    assert (load_checkpoint(part / "last.pt")["epoch"], load_checkpoint(part / "last.pt")["step"]) == (0, 1)
    stop_at[0] = 0
    assert main(["--resume", str(part)]) == 0
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(part / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["scheduler"] == b["scheduler"]


def test_defaults_leave_the_recipe_out():
    """A default config builds today's pieces: plain cosine schedule, no mixing, the unsmoothed loss,
    no RandAugment or erasing (a default run's weights are bit for bit those of before)."""
    cfg = resolve({})
    model = torch.nn.Linear(2, 2)
    opt = train_mod.build_optimizer(cfg, model)
    assert type(opt) is torch.optim.Adam
    assert type(train_mod.build_scheduler(cfg, opt)) is torch.optim.lr_scheduler.CosineAnnealingLR
    assert train_mod.build_mixup(cfg) is None
    assert (cfg["randaugment"], cfg["random_erasing"], cfg["label_smoothing"], cfg["warmup_epochs"]) == (None, 0, 0, 0)
    out, y = torch.randn(4, 3, 10), torch.tensor([1, 2, 3, 4])
    from tetsnn import tet_loss
    assert torch.equal(train_mod.build_criterion(cfg)(out, y), tet_loss(out, y, lamb=cfg["lamb"], means=cfg["means"]))
    assert type(train_mod.build_optimizer({**cfg, "optimizer": "adamw", "weight_decay": 0.05}, model)) is torch.optim.AdamW


class _LegacyNumpy:
    """numpy's global generator behind the Generator methods Mixup calls, so that Mixup and timm's
    Mixup (which draws from the global one) see the same numbers in the same order."""
    random = staticmethod(lambda: np.random.rand())
    beta = staticmethod(lambda a, b: np.random.beta(a, b))
    integers = staticmethod(lambda low, high: np.random.randint(low, high))


@pytest.mark.parametrize("alphas", [dict(mixup=0.8), dict(cutmix=1.0), dict(mixup=0.8, cutmix=1.0, prob=0.7)])
def test_mixup_matches_timms_batch_mode(alphas):
    from timm.data.mixup import Mixup as TimmMixup

    theirs = TimmMixup(mixup_alpha=alphas.get("mixup", 0.0), cutmix_alpha=alphas.get("cutmix", 0.0),
                       prob=alphas.get("prob", 1.0), label_smoothing=0.0, num_classes=7)
    ours = Mixup(7, **alphas)
    g = torch.Generator().manual_seed(1)
    for seed in range(6):
        x = torch.rand(8, 3, 10, 12, generator=g)
        y = torch.randint(0, 7, (8,), generator=g)
        np.random.seed(seed)
        want_x, want_t = theirs(x.clone(), y)
        np.random.seed(seed)
        got_x, got_t = ours(x, y, _LegacyNumpy())
        torch.testing.assert_close(got_x, want_x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_t, want_t.float(), rtol=1e-6, atol=1e-6)
