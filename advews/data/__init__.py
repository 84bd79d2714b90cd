"""Datasets as in-memory uint8 arrays plus what a run needs to know about them (``load_data``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import gin

from advews.data.arrays import ArrayDataset, Augment, split_validation
from advews.data.augment import RandomCropFlip
from advews.data.registry import DATASETS, DatasetSpec, get_dataset, register_dataset
from advews.errors import AdvewsError

__all__ = [
    "ArrayDataset",
    "Augment",
    "DATASETS",
    "DataBundle",
    "DatasetSpec",
    "RandomCropFlip",
    "load_data",
    "register_dataset",
    "split_validation",
]


@dataclass
class DataBundle:
    """Everything the engine needs from a dataset. Pixels stay in [0, 1]: models normalise with
    ``mean``/``std`` themselves (``models.normalize.Normalized``) so attacks work in pixel space."""

    name: str
    train: ArrayDataset
    val: Optional[ArrayDataset]
    test: ArrayDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train_augment: Optional[Augment]


@gin.configurable("data")
def load_data(
    dataset: str = "cifar10",
    root: str = "data",
    download: bool = False,
    val_size: Optional[int] = None,
    split_seed: int = 0,
    augment: bool = True,
    normalize: bool = True,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
) -> DataBundle:
    """Load ``dataset`` and carve out the validation split (``val_size`` None: the dataset's default).

    ``train_limit``/``test_limit`` keep the first N examples, after the validation split, for
    tests and quick runs. ``normalize`` False reports mean 0 / std 1 (the model sees raw pixels).
    """
    spec = get_dataset(dataset)
    train, test = spec.load(str(root), download)
    train, val = split_validation(train, spec.val_size if val_size is None else val_size, split_seed)
    train = _limit(train, train_limit, "train_limit")
    test = _limit(test, test_limit, "test_limit")
    channels = train.images.shape[1]
    return DataBundle(
        name=dataset,
        train=train,
        val=val,
        test=test,
        num_classes=spec.num_classes,
        in_channels=channels,
        image_size=train.images.shape[-1],
        mean=spec.mean if normalize else (0.0,) * channels,
        std=spec.std if normalize else (1.0,) * channels,
        train_augment=spec.augment if augment else None,
    )


def _limit(dataset: ArrayDataset, limit: Optional[int], what: str) -> ArrayDataset:
    if limit is None:
        return dataset
    if limit < 1:
        raise AdvewsError(f"{what} must be at least 1, got {limit}")
    return dataset.subset(range(min(limit, len(dataset))))
