"""In-memory image datasets batched by index permutations, so epochs are fast and reproducible."""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from advews.errors import AdvewsError

Augment = Callable[[Tensor, Optional[torch.Generator]], Tensor]
"""A batch augmentation: (float NCHW in [0, 1], generator) -> float NCHW."""


class ArrayDataset:
    """uint8 images (N, C, H, W) and int64 labels (N,), kept whole in memory.

    No workers and no per-example Python: a batch is one gather, and all randomness comes from
    the generator passed to ``batches``, so restoring its state replays the same batches.
    """

    def __init__(self, images: Tensor, labels: Tensor):
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise AdvewsError(f"images must be a uint8 tensor of shape (N, C, H, W), got {_describe(images)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise AdvewsError(f"labels must be an int64 tensor of shape (N,), got {_describe(labels)}")
        if len(images) != len(labels):
            raise AdvewsError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])

    def subset(self, indices: Union[Tensor, Sequence[int]]) -> ArrayDataset:
        """A copy holding only ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return ArrayDataset(self.images[index], self.labels[index])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches one pass of ``batches`` yields."""
        return count_batches(len(self), batch_size, drop_last)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: Optional[torch.Generator] = None,
        augment: Optional[Augment] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> Iterator[Tuple[Tensor, Tensor]]:
        """One epoch of (x float32 in [0, 1], y int64) batches.

        The permutation is drawn (``torch.randperm`` on the CPU ``generator``) when iteration
        starts, then ``augment`` draws from the same generator batch after batch. Pixels travel
        to ``device`` as uint8 (a quarter of the float bytes) and are converted and augmented there.
        """
        count = self.num_batches(batch_size, drop_last)
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for b in range(count):
            index = order[b * batch_size : (b + 1) * batch_size]
            yield to_batch(self.images[index], self.labels[index], generator, augment, device)


def count_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one pass over ``n`` examples: the last partial one counts unless ``drop_last``."""
    if batch_size < 1:
        raise AdvewsError(f"batch_size must be at least 1, got {batch_size}")
    full, rest = divmod(n, batch_size)
    return full + (1 if rest and not drop_last else 0)


def to_batch(
    images: Tensor,
    labels: Tensor,
    generator: Optional[torch.Generator],
    augment: Optional[Augment],
    device: Optional[Union[str, torch.device]],
) -> Tuple[Tensor, Tensor]:
    """uint8 images to float [0, 1] on ``device`` (moved as uint8, a quarter of the bytes), augmented
    (on the uint8 pixels when the augmentation says that is exact: ``uint8_exact``)."""
    if device is not None:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
    if augment is not None and getattr(augment, "uint8_exact", False):
        images, augment = augment(images, generator), None
    x = images.float().div_(255)
    if augment is not None:
        x = augment(x, generator)
    return x, labels


def split_validation(
    dataset: ArrayDataset, val_size: int, seed: int
) -> Tuple[ArrayDataset, Optional[ArrayDataset]]:
    """Hold out ``val_size`` random examples for model selection (never select on test).

    Deterministic given ``seed``: examples are ranked by a BLAKE2 hash of (seed, index), which
    no torch or numpy version change can alter, so a checkpoint's validation set stays the same.
    Both parts keep the original example order. ``val_size`` 0 gives no validation set.
    """
    n = len(dataset)
    if val_size == 0:
        return dataset, None
    if not 0 < val_size < n:
        raise AdvewsError(f"val_size must be in [0, {n}) for a training set of {n} examples, got {val_size}")
    ranked = sorted(range(n), key=lambda i: hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest())
    val = torch.tensor(sorted(ranked[:val_size]))
    train = torch.tensor(sorted(ranked[val_size:]))
    return dataset.subset(train), dataset.subset(val)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
