"""Datasets: static images (``static``) and event-camera recordings (``events``), and the batch
iterators over them (``loader``). A run's loaders from its config come from the training engine's
``tetsnn.build_data`` (``tetsnn.engine.data.build_data``).
"""
from .loader import BatchLoader
from .static import DataError
from .events import CIFAR10DVS, DVSGesture, EventFolder, NCaltech101, NMNIST

__all__ = ["BatchLoader", "DataError", "CIFAR10DVS", "DVSGesture", "NMNIST", "NCaltech101", "EventFolder"]
