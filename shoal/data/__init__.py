"""Datasets read with numpy only, so serving code can use them without torch."""

from shoal.data.mnist import (
    DATASETS,
    FASHION_MNIST,
    MNIST,
    DatasetError,
    data_checksums,
    data_files,
    load,
    load_fashion_mnist,
    load_mnist,
    locate,
)
from shoal.data.png import to_png

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "DatasetError",
    "data_checksums",
    "data_files",
    "load",
    "load_fashion_mnist",
    "load_mnist",
    "locate",
    "to_png",
]
