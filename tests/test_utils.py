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
