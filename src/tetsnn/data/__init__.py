"""Datasets: static images (``static``) and event-camera recordings (``events``).

``build_data(cfg, device, rank, world_size)`` gives the training and test batch iterators of a run.
"""
from .loader import BatchLoader, Data, build_data
from .static import DataError
from .events import CIFAR10DVS, DVSGesture

__all__ = ["BatchLoader", "Data", "DataError", "build_data", "CIFAR10DVS", "DVSGesture"]
