"""Data for hypergrad: indexed datasets, IDX files, image loaders, label noise.

Loaders return plain tensors (``uint8`` images, ``int64`` labels) and never
download anything; :func:`normalize` prepares images for a model and
:class:`IndexedDataset` yields ``(input, target, index)`` items.
"""

from hypergrad.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_cifar10,
    load_cifar10_folder,
    load_digits_dataset,
    normalize,
)
from hypergrad.data.idx import DatasetNotFoundError, load_mnist, read_idx
from hypergrad.data.noise import inject_label_noise
from hypergrad.data.splits import IndexedDataset, split_indices

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "DatasetNotFoundError",
    "IndexedDataset",
    "inject_label_noise",
    "load_cifar10",
    "load_cifar10_folder",
    "load_digits_dataset",
    "load_mnist",
    "normalize",
    "read_idx",
    "split_indices",
]
