"""Datasets (in-memory uint8 arrays, image folders, extra pseudo-labeled data) plus what a run
needs to know about them (``load_data``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import gin

from advews.data.arrays import ArrayDataset, Augment, split_validation
from advews.data.augment import RandomCropFlip
from advews.data.folder import FolderDataset, with_extra_folders
from advews.data.registry import DATASETS, DatasetSpec, Split, get_dataset, register_dataset
from advews.data.streamed import StreamedDataset
from advews.data.unlabeled import MixedDataset, load_extra
from advews.errors import AdvewsError

__all__ = [
    "ArrayDataset",
    "Augment",
    "DATASETS",
    "DataBundle",
    "DatasetSpec",
    "FolderDataset",
    "MixedDataset",
    "RandomCropFlip",
    "Split",
    "StreamedDataset",
    "load_data",
    "load_extra",
    "register_dataset",
    "split_validation",
]


@dataclass
class DataBundle:
    """Everything the engine needs from a dataset. Pixels stay in [0, 1]: models normalise with
    ``mean``/``std`` themselves (``models.normalize.Normalized``) so attacks work in pixel space."""

    name: str
    train: Union[Split, MixedDataset]
    val: Optional[Split]
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train_augment: Optional[Augment]


@gin.configurable("data", denylist=["rank", "world"])
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
    extra_data: Optional[str] = None,
    extra_fraction: float = 0.5,
    allow_pickle: bool = False,
    image_size: Optional[int] = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    extra_folders: Sequence[str] = (),
    crop_fill: int = 0,
    rank: int = 0,
    world: int = 1,
) -> DataBundle:
    """Load ``dataset`` and carve out the validation split (``val_size`` None: the dataset's default).

    ``train_limit``/``test_limit`` keep the first N examples, after the validation split, for
    tests and quick runs. ``normalize`` False reports mean 0 / std 1 (the model sees raw pixels).

    ``extra_data``: a file of pseudo-labeled images (see ``unlabeled.load_extra``; a pickle only
    with ``allow_pickle``), or a directory of images.npy + labels.npy streamed from disk (written by
    ``advews-data convert``), mixed into every training batch at ``extra_fraction``; the validation
    split and ``train_limit`` apply to the labeled data alone, before mixing. ``rank``/``world``
    (the trainer's DDP process; not gin settings) make each rank read only its slice of the extra rows.

    ``extra_folders``: DeepAugment's distorted copies of a folder dataset's training images (e.g.
    ['data/EDSR', 'data/CAE'], each with the training class folders), concatenated to the training
    split after the validation split and ``train_limit`` (``folder.with_extra_folders``).

    ``image_size``, ``num_workers`` and ``pin_memory`` configure folder datasets (imagenet: crop
    size, default 224, and its DataLoader); in-memory datasets ignore the latter two and accept only
    their native ``image_size``. A folder dataset's held-out validation split uses evaluation
    transforms; ``augment`` False gives its training split those too.

    ``crop_fill``: the pixel value (0..255) the random crop pads with, for datasets with a crop
    augmentation (cifar10/100): 0, or 128 as the EWS authors' AT/TRADES scripts (``RandomCropFlip``).
    """
    spec = get_dataset(dataset)
    train_augment = spec.augment if augment else None
    if crop_fill != 0 or not isinstance(crop_fill, int):
        RandomCropFlip(fill=crop_fill)  # the value's own one-line error comes before the dataset's
        if not isinstance(spec.augment, RandomCropFlip):
            raise AdvewsError(f"data.crop_fill needs a dataset with a crop augmentation (cifar10, cifar100), not {dataset}")
        fill = RandomCropFlip(spec.augment.padding, spec.augment.flip, fill=crop_fill)
        train_augment = fill if augment else None
    train, test = spec.load(str(root), download)
    train, val = split_validation(train, spec.val_size if val_size is None else val_size, split_seed)
    train = _limit(train, train_limit, "train_limit")
    test = _limit(test, test_limit, "test_limit")
    if isinstance(train, FolderDataset):
        crop = train.image_size if image_size is None else image_size
        loading = dict(image_size=crop, num_workers=num_workers, pin_memory=pin_memory)
        train = dataclasses.replace(train, augment=augment, **loading)
        val = None if val is None else dataclasses.replace(val, augment=False, **loading)
        test = dataclasses.replace(test, augment=False, **loading)
        train = with_extra_folders(train, extra_folders, val) if extra_folders else train
    elif extra_folders:
        raise AdvewsError(f"data.extra_folders needs a folder dataset such as imagenet, not the in-memory {dataset}")
    elif image_size not in (None, train.image_shape[-1]):
        raise AdvewsError(
            f"data.image_size {image_size} cannot resize {dataset} (images are {train.image_shape[-1]} px); "
            "only folder datasets such as imagenet take another size"
        )
    channels, size = train.image_shape[0], train.image_shape[-1]
    if extra_data is not None:
        extra = _extra(train, dataset, extra_data, extra_fraction, allow_pickle, spec.num_classes)
        train = MixedDataset(train, extra, extra_fraction, rank=rank, world=world)
    return DataBundle(
        name=dataset,
        train=train,
        val=val,
        test=test,
        num_classes=spec.num_classes,
        in_channels=channels,
        image_size=size,
        mean=spec.mean if normalize else (0.0,) * channels,
        std=spec.std if normalize else (1.0,) * channels,
        train_augment=train_augment,
    )


def _extra(
    train: Split, dataset: str, path: str, fraction: float, allow_pickle: bool, num_classes: int
) -> Union[ArrayDataset, StreamedDataset]:
    if not isinstance(train, ArrayDataset):
        raise AdvewsError(f"data.extra_data needs an in-memory dataset such as cifar10, not the folder {dataset}")
    if not 0.0 <= fraction < 1.0:  # checked before a possibly long load
        raise AdvewsError(f"data.extra_fraction must be in [0, 1), got {fraction}")
    return load_extra(path, allow_pickle, image_shape=train.image_shape, num_classes=num_classes)


def _limit(dataset: Split, limit: Optional[int], what: str) -> Split:
    if limit is None:
        return dataset
    if limit < 1:
        raise AdvewsError(f"{what} must be at least 1, got {limit}")
    return dataset.subset(range(min(limit, len(dataset))))
