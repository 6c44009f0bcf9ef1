"""Event-camera data: AEDAT and ATIS readers, framing by bincount, cached datasets (CIFAR10-DVS,
DVS128 Gesture, N-MNIST, N-Caltech101 and any folder of recordings)."""
from .formats import EVENT_DTYPE, read_aedat2, read_aedat31, read_atis_bin, read_gesture_labels, read_npy
from .frames import batch_transform, cell_sums, to_frames
from .datasets import (SPECS, CIFAR10DVS, DVSGesture, EventFolder, NCaltech101, NMNIST, build_cache, class_folders,
                       load_frames)

__all__ = ["EVENT_DTYPE", "read_aedat2", "read_aedat31", "read_atis_bin", "read_npy", "read_gesture_labels",
           "to_frames", "cell_sums", "batch_transform", "SPECS", "CIFAR10DVS", "DVSGesture", "NMNIST", "NCaltech101",
           "EventFolder", "build_cache", "class_folders", "load_frames"]
