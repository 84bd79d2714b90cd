"""Extra pseudo-labeled data (robust self-training, Carmon et al. 2019) and batches that mix it in.

Small sets are read whole into memory from files that hold N x H x W x C (or N x H x W, one
channel) uint8 images and N integer pseudo-labels under one of two key pairs, ``image``/``label``
(generated DDPM data) or ``data``/``extrapolated_targets`` (the 500K TinyImages set), as ``.npz``,
HDF5 (``.h5``/``.hdf5``) or, only on request, the original ``.pickle``. Large ones (millions of
generated images) are a directory streamed from disk (``streamed.py``; ``advews-data convert``
writes one from such a file).
"""

from __future__ import annotations

import math
import os
import pickle
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from advews.data.arrays import ArrayDataset, Augment, count_batches, to_batch
from advews.data.npz import read_npz
from advews.data.streamed import StreamedDataset, open_streamed
from advews.errors import AdvewsError

KEY_PAIRS = (("image", "label"), ("data", "extrapolated_targets"))
"""(images, labels) key names, in the order they are looked for."""

_NPZ = (".npz",)
HDF5_SUFFIXES = (".h5", ".hdf5")
_PICKLE = (".pickle", ".pkl")


def load_extra(
    path: str,
    allow_pickle: bool = False,
    *,
    image_shape: Optional[Tuple[int, int, int]] = None,
    num_classes: Optional[int] = None,
) -> Union[ArrayDataset, StreamedDataset]:
    """Images and pseudo-labels from the file ``path`` as an (N, C, H, W) ArrayDataset, or from the
    directory ``path`` (images.npy + labels.npy) as a StreamedDataset read from disk batch by batch.

    ``image_shape`` (C, H, W) and ``num_classes``, when given, are those of the labeled data the
    extra data is mixed with: every image must have that shape and every label lie in
    [0, num_classes). A pickle can run arbitrary code when loaded, so it is read only with
    ``allow_pickle`` (gin: ``data.allow_pickle = True``); npz files are read without pickles.
    """
    if os.path.isdir(path):
        return open_streamed(path, image_shape=image_shape, num_classes=num_classes)
    if not os.path.isfile(path):
        raise AdvewsError(f"extra data file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _NPZ:
        images, labels = read_npz(path, lambda keys: pick_pair(path, keys))
    elif suffix in HDF5_SUFFIXES:
        images, labels = _read_hdf5(path)
    elif suffix in _PICKLE:
        images, labels = _read_pickle(path, allow_pickle)
    else:
        allowed = ", ".join(_NPZ + HDF5_SUFFIXES + _PICKLE)
        raise AdvewsError(f"extra data {path} has unknown suffix {suffix!r}; use one of {allowed}")
    return _to_dataset(path, images, labels, image_shape, num_classes)


def pick_pair(path: str, keys: Sequence[str]) -> Tuple[str, str]:
    """The first of ``KEY_PAIRS`` whose two names are both in ``keys``, else a one-line error."""
    for pair in KEY_PAIRS:
        if all(k in keys for k in pair):
            return pair
    expected = " or ".join("/".join(pair) for pair in KEY_PAIRS)
    raise AdvewsError(f"{path} must hold arrays {expected}, found {', '.join(sorted(keys)) or 'none'}")


def _read_hdf5(path: str) -> Tuple[np.ndarray, np.ndarray]:
    import h5py  # only HDF5 users pay for the import

    try:
        with h5py.File(path, "r") as f:
            keys = [k for k in f.keys() if isinstance(f[k], h5py.Dataset)]
            image_key, label_key = pick_pair(path, keys)
            return f[image_key][()], f[label_key][()]
    except OSError as error:
        raise AdvewsError(f"cannot read HDF5 file {path}: {' '.join(str(error).split())}") from None


def _read_pickle(path: str, allow_pickle: bool) -> Tuple[np.ndarray, np.ndarray]:
    if not allow_pickle:
        raise AdvewsError(
            f"refusing to load {path}: unpickling can run arbitrary code; convert it to .npz or .h5, "
            "or set data.allow_pickle = True (allow_pickle=True) if you trust the file"
        )
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise AdvewsError(f"cannot unpickle {path} (truncated or not a pickle?): {reason}") from None
    if not isinstance(entry, dict):
        raise AdvewsError(f"{path} must hold a dict, found {type(entry).__name__}")
    image_key, label_key = pick_pair(path, [k for k in entry if isinstance(k, str)])
    return np.asarray(entry[image_key]), np.asarray(entry[label_key])


def _to_dataset(
    path: str,
    images: np.ndarray,
    labels: np.ndarray,
    image_shape: Optional[Tuple[int, int, int]],
    num_classes: Optional[int],
) -> ArrayDataset:
    if images.ndim == 3:  # N x H x W: one channel
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise AdvewsError(f"{path}: images must be N x H x W x C uint8 with N > 0, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise AdvewsError(f"{path}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    chw = (images.shape[3], images.shape[1], images.shape[2])
    if image_shape is not None and chw != tuple(image_shape):
        raise AdvewsError(f"{path}: images are {chw} (C, H, W), the labeled data's are {tuple(image_shape)}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = "" if num_classes is None else f", {num_classes}"
        raise AdvewsError(f"{path}: labels span [{low}, {high}], allowed [0{bound})")
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(pixels, torch.from_numpy(labels.astype(np.int64)))


class MixedDataset:
    """Labeled and extra examples in every batch, as semisup-adv's sampler does.

    A batch of ``batch_size`` holds ``extra_per_batch`` = round-half-up(fraction * batch_size) extra
    examples after ``batch_size - extra_per_batch`` labeled ones. The labeled set defines the epoch:
    one pass over it at its per-batch share, ceil(n / share) batches (the last one has fewer labeled
    examples, the same number of extra ones) or floor(n / share) with ``drop_last``. Extra examples
    come in a fresh random permutation each epoch, continued by further permutations when the epoch
    needs more than there are. ``len`` is the labeled count.

    ``extra`` is in memory (ArrayDataset) or streamed from disk (StreamedDataset): each batch reads
    only its rows. With ``world`` > 1 every rank still draws the whole global batch (same generator
    draws, same augmentation) but reads only the extra images of its own contiguous ``1/world``
    slice, the one the trainer keeps; the other rows are left zero.
    """

    def __init__(
        self,
        labeled: ArrayDataset,
        extra: Union[ArrayDataset, StreamedDataset],
        fraction: float = 0.5,
        *,
        rank: int = 0,
        world: int = 1,
    ):
        if not 0.0 <= fraction < 1.0:
            raise AdvewsError(f"extra fraction must be in [0, 1), got {fraction}")
        if extra.image_shape != labeled.image_shape:
            raise AdvewsError(f"extra images are {extra.image_shape}, labeled images {labeled.image_shape}")
        if not 0 <= rank < world:
            raise AdvewsError(f"rank must be in [0, {world}), got {rank}")
        self.labeled, self.extra, self.fraction = labeled, extra, fraction
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.labeled)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return self.labeled.image_shape

    def extra_per_batch(self, batch_size: int) -> int:
        """Extra examples in a batch of ``batch_size``; refuses a size that leaves no labeled one."""
        if batch_size < 1:
            raise AdvewsError(f"batch_size must be at least 1, got {batch_size}")
        extra = math.floor(self.fraction * batch_size + 0.5)
        if extra >= batch_size:
            raise AdvewsError(
                f"batch_size {batch_size} with extra fraction {self.fraction} leaves no labeled example per batch"
            )
        return extra

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Batches in one epoch: one pass over the labeled set at its per-batch share."""
        return count_batches(len(self.labeled), batch_size - self.extra_per_batch(batch_size), drop_last)

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
        """One epoch of mixed (x float32 in [0, 1], y int64) batches, labeled examples first.

        Draws from ``generator`` in a fixed order: the labeled permutation, the extra permutations,
        then ``augment`` (applied to the whole batch, both parts) batch after batch. Without
        ``shuffle`` both parts are taken in file order, the extra part cycling.
        """
        extra = self.extra_per_batch(batch_size)
        share = batch_size - extra
        count = self.num_batches(batch_size, drop_last)
        n, m = len(self.labeled), len(self.extra)
        labeled_order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        cycles = -(-count * extra // m)  # ceil: permutations this epoch needs
        extra_order = torch.cat([torch.empty(0, dtype=torch.long)] + [
            torch.randperm(m, generator=generator) if shuffle else torch.arange(m) for _ in range(cycles)
        ])
        for b in range(count):
            li = labeled_order[b * share : (b + 1) * share]
            ei = extra_order[b * extra : (b + 1) * extra]
            images = torch.cat([self.labeled.images[li], self._extra_images(ei, len(li))])
            labels = torch.cat([self.labeled.labels[li], self.extra.labels[ei].long()])
            yield to_batch(images, labels, generator, augment, device)

    def _extra_images(self, index: Tensor, labeled: int) -> Tensor:
        """The extra images at ``index`` (batch positions ``labeled`` on); with several ranks only
        those inside this rank's slice of the batch are read, the others are zero."""
        if self.world == 1:
            return self.extra.images[index]
        per_rank = (labeled + len(index)) // self.world  # the trainer's slice: rows [rank * per_rank, ...)
        lo = min(max(self.rank * per_rank - labeled, 0), len(index))
        hi = min(max((self.rank + 1) * per_rank - labeled, lo), len(index))
        out = torch.zeros((len(index), *self.extra.image_shape), dtype=torch.uint8)
        if hi > lo:
            out[lo:hi] = self.extra.images[index[lo:hi]]
        return out
