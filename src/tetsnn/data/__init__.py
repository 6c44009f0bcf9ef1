"""Datasets: static images (``static``) and event-camera recordings (``events``), and the batch
iterators over them (``loader``). ``tetsnn.data.build_data`` (a run's loaders from its config) is the
training engine's ``tetsnn.engine.data.build_data``.
"""
from .loader import BatchLoader
from .static import DataError
from .events import CIFAR10DVS, DVSGesture, EventFolder, NCaltech101, NMNIST

__all__ = ["BatchLoader", "DataError", "CIFAR10DVS", "DVSGesture", "NMNIST", "NCaltech101", "EventFolder"]
