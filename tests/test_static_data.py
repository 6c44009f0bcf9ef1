"""Static data: the batched on-device augmentation against a per-sample loop, the digits split,
the sampling of train and test indices across ranks, and missing-file errors."""
import numpy as np
import pytest
import torch

from tetsnn.engine.config import resolve
from tetsnn.data import BatchLoader, DataError
from tetsnn.engine.data import build_data
from tetsnn.data.static import augment, load_cifar, load_digits


def test_augment_matches_per_sample_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 256, (17, 3, 9, 7), dtype=torch.uint8, generator=g)
    pad = 2
    out = augment(x, pad=pad, flip=True, generator=torch.Generator().manual_seed(11))
    # replay the same draws, then crop and flip one sample at a time
    r = torch.Generator().manual_seed(11)
    oy = torch.randint(0, 2 * pad + 1, (17,), generator=r)
    ox = torch.randint(0, 2 * pad + 1, (17,), generator=r)
    flip = torch.rand(17, generator=r) < 0.5
    assert 0 < flip.sum() < 17
    for i in range(17):
        canvas = torch.zeros(3, 9 + 2 * pad, 7 + 2 * pad, dtype=torch.uint8)   # zero fill, as RandomCrop
        canvas[:, pad:pad + 9, pad:pad + 7] = x[i]
        ref = canvas[:, oy[i]:oy[i] + 9, ox[i]:ox[i] + 7]
        if flip[i]:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref), i
    assert out.dtype == torch.uint8 and x.shape == out.shape
    assert torch.equal(augment(x, pad=0, flip=False, generator=r), x)


def test_digits_split_is_stratified_and_independent_of_seed():
    xtr, ytr, xte, yte, info = load_digits()
    assert xtr.dtype == np.uint8 and xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.max() == 16
    counts = np.bincount(yte, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37            # 20% of each class (174..183 images)
    a = build_data(resolve({"seed": 1}))
    b = build_data(resolve({"seed": 2}))
    ya = torch.cat([y for _, y in a.test])
    assert torch.equal(ya, torch.cat([y for _, y in b.test])) and torch.equal(ya, torch.as_tensor(yte))
    x, _ = next(iter(a.test))
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 0.2      # normalised pixels


def test_loader_partitions_and_resumes():
    n, bs = 37, 4
    fetch = lambda idx, gen: (idx, torch.rand(len(idx), generator=gen) if gen is not None else None)
    # evaluation: every sample exactly once over the ranks, no padding
    seen = torch.cat([i for r in range(3) for i, _ in BatchLoader(n, bs, fetch, train=False, rank=r, world_size=3)])
    assert sorted(seen.tolist()) == list(range(n))
    # training: global batches of one permutation per epoch, split over the ranks, not padded
    draw = lambda idx, draws: (idx, draws.rand("cpu"))
    ranks = [BatchLoader(n, bs, draw, train=True, seed=5, rank=r, world_size=2) for r in range(2)]
    for ld in ranks:
        ld.set_epoch(1)
    epoch1 = torch.cat([i for ld in ranks for i, _ in ld])
    assert sorted(epoch1.tolist()) == list(range(n)) and len(ranks[0]) == len(ranks[1]) == 5
    ranks[0].set_epoch(1)
    rank0_epoch1 = torch.cat([i for i, _ in ranks[0]])
    ranks[0].set_epoch(2)
    assert not torch.equal(torch.cat([i for i, _ in ranks[0]]), rank0_epoch1)
    # resuming at batch 3 gives exactly the batches (indices and random draws) of the full epoch
    ranks[0].set_epoch(2)
    full = list(ranks[0])
    ranks[0].set_epoch(2, start=3)
    tail = list(ranks[0])
    assert len(tail) == len(full) - 3
    for (i, r), (j, s) in zip(full[3:], tail):
        assert torch.equal(i, j) and torch.equal(r, s)


def test_missing_cifar_names_expected_folder(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py.*--download"):
        load_cifar("cifar10", str(tmp_path), train=True)
    cfg = resolve({"dataset": "cifar100", "model": "resnet19", "data_dir": str(tmp_path)})
    with pytest.raises(DataError, match="cifar-100-python"):
        build_data(cfg)
    with pytest.raises(DataError, match="data-dir"):
        build_data(resolve({"dataset": "imagenet", "model": "resnet34"}))


def test_imagenet_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                img = rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / split / cls / f"{i}.png")
    cfg = resolve({"dataset": "imagenet", "model": "resnet34", "data_dir": str(tmp_path), "batch_size": 4,
                   "workers": 0})
    data = build_data(cfg)
    assert (data.info["train_used"], data.info["test_used"], data.num_classes) == (6, 6, 1000)
    data.train.set_epoch(1)
    (x, y), = list(data.train)[:1]
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    ys = torch.cat([y for _, y in data.test])
    assert ys.tolist() == [0, 0, 0, 1, 1, 1]              # evaluation: every image once, in order
    assert build_data(cfg, train=False).train is None
