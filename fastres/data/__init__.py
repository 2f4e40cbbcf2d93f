"""CIFAR-10 on the GPU: checksummed reader and downloader, a synthetic stand-in, device-resident loader.

No torchvision: the reader unpickles the official python version directly
and the augmentation (pad 4, random crop, horizontal flip) is a batched gather.
"""

from __future__ import annotations

from .cifar import (
    CIFAR10_ARCHIVE,
    CIFAR10_ARCHIVE_MD5,
    CIFAR10_CLASSES,
    CIFAR10_DIR,
    CIFAR10_MD5,
    CIFAR10_URL,
    DataError,
    Dataset,
    download_cifar10,
    load_cifar10,
)
from .loader import GPULoader, augment, channel_stats
from .synthetic import synthetic_cifar10

__all__ = [
    "CIFAR10_ARCHIVE", "CIFAR10_ARCHIVE_MD5", "CIFAR10_CLASSES", "CIFAR10_DIR", "CIFAR10_MD5", "CIFAR10_URL",
    "DataError", "Dataset", "GPULoader", "augment", "channel_stats", "download_cifar10", "load_cifar10",
    "synthetic_cifar10",
]
