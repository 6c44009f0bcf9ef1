import random

import numpy as np
import torch

from tetsnn import seed_all


def draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_all_reproduces_every_generator():
    seed_all(123)
    a = draw()
    seed_all(123)
    assert draw() == a
    seed_all(124)
    assert draw() != a


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    import pytest
    from tetsnn.utils import atomic_path

    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.endswith(".txt") and tmp != str(target)
        open(tmp, "w").write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
