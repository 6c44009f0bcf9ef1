"""Datasets: static images (``static``) and event-camera recordings (``events``), the batch
iterators over them (``loader``) and the training recipe's augmentation (``augment``). A run's
loaders from its config come from the training engine's ``tetsnn.build_data`` (``tetsnn.engine.data.build_data``).
"""
from .augment import Mixup, parse_randaugment, rand_augment, random_erase
from .loader import BatchLoader
from .static import DataError
from .events import CIFAR10DVS, DVSGesture, EventFolder, NCaltech101, NMNIST

__all__ = ["BatchLoader", "DataError", "Mixup", "parse_randaugment", "rand_augment", "random_erase",
           "CIFAR10DVS", "DVSGesture", "NMNIST", "NCaltech101", "EventFolder"]
