"""Name -> dataset description, so new datasets plug into ``load_data`` by registering one entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

from advews.data.arrays import ArrayDataset, Augment
from advews.data.augment import RandomCropFlip
from advews.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    load_cifar10,
    load_cifar100,
)
from advews.data.folder import FolderDataset
from advews.data.imagenet import IMAGENET_CLASSES, IMAGENET_MEAN, IMAGENET_STD, load_imagenet
from advews.data.mnist5k import load_mnist5k
from advews.errors import AdvewsError

Split = Union[ArrayDataset, FolderDataset]
Loader = Callable[[str, bool], Tuple[Split, Split]]
"""(root, download) -> (train, test), each holding the full split."""


@dataclass(frozen=True)
class DatasetSpec:
    """What ``load_data`` needs besides the pixels: sizes, statistics and defaults.

    ``augment`` is the batch augmentation of in-memory training sets; folder datasets augment each
    example as they decode it and register None. ``image_shape`` (C, H, W), when fixed, lets
    advews-eval refuse other data for a model trained on this dataset before anything runs.
    """

    load: Loader
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    val_size: int
    augment: Optional[Augment]
    image_shape: Optional[Tuple[int, int, int]] = None


DATASETS: Dict[str, DatasetSpec] = {}
"""The registered datasets by name; ``sorted(DATASETS)`` lists the names."""


def register_dataset(name: str, spec: DatasetSpec) -> None:
    """Make ``name`` loadable by ``load_data`` (refuses to silently replace an existing entry)."""
    if name in DATASETS:
        raise AdvewsError(f"dataset {name!r} is already registered")
    DATASETS[name] = spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec for ``name``, or a one-line error listing the choices."""
    if name not in DATASETS:
        raise AdvewsError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


register_dataset(
    "mnist5k",
    DatasetSpec(lambda root, download: load_mnist5k(), 10, (0.0,), (1.0,), val_size=500, augment=None,
                image_shape=(1, 28, 28)),
)
register_dataset(
    "cifar10",
    DatasetSpec(load_cifar10, 10, CIFAR10_MEAN, CIFAR10_STD, val_size=1000, augment=RandomCropFlip(4),
                image_shape=(3, 32, 32)),
)
register_dataset(
    "cifar100",
    DatasetSpec(load_cifar100, 100, CIFAR100_MEAN, CIFAR100_STD, val_size=1000, augment=RandomCropFlip(4),
                image_shape=(3, 32, 32)),
)
register_dataset(
    "imagenet",  # 10000 training images (about 10 a class) held out for model selection; val/ is the test set
    DatasetSpec(load_imagenet, IMAGENET_CLASSES, IMAGENET_MEAN, IMAGENET_STD, val_size=10000, augment=None),
)
