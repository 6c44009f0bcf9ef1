"""Event-camera data: AEDAT readers, framing by bincount, cached CIFAR10-DVS and DVS128 Gesture."""
from .formats import EVENT_DTYPE, read_aedat2, read_aedat31, read_gesture_labels
from .frames import batch_transform, to_frames
from .datasets import CIFAR10DVS, DVSGesture, build_cache, load_frames

__all__ = ["EVENT_DTYPE", "read_aedat2", "read_aedat31", "read_gesture_labels", "to_frames",
           "batch_transform", "CIFAR10DVS", "DVSGesture", "build_cache", "load_frames"]
