"""Extra data too large for memory: a directory of ``images.npy`` (N x H x W x C uint8) and
``labels.npy`` (N integers), read row by row from disk (write one with ``advews-data convert``).

Both files are opened with ``np.load(mmap_mode='r')``, which checks their headers and sizes without
reading them. Image rows are then read with ``os.pread`` into a fresh buffer rather than through
the mapping: pages touched through a mapping stay in the process's resident set (up to the whole
file over an epoch), while pread leaves them to the page cache alone, so resident memory stays
one batch whatever N is. Labels (one byte each for up to 256 classes) are kept in memory.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from advews.data.fingerprint import tensor_fingerprint
from advews.errors import AdvewsError

IMAGES, LABELS = "images.npy", "labels.npy"
_LABEL_DTYPES = (np.uint8, np.int16, np.int32, np.int64)
_LABEL_CHUNK = 1 << 22  # labels read per step while checking them
_SAMPLED_BLOCKS, _BLOCK = 256, 1 << 16  # what a fingerprint reads of images.npy: at most 16 MiB


class StreamedRows:
    """The images of a streamed directory, indexed like a uint8 (N, C, H, W) tensor: ``rows[index]``
    reads just those rows, in file order (page-cache and readahead friendly), and returns them in
    ``index`` order."""

    def __init__(self, path: str, shape: Tuple[int, ...], offset: int):
        self.path, self.shape, self.offset = path, shape, offset
        self.row_bytes = int(np.prod(shape[1:]))
        self._fd: Optional[int] = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _descriptor(self) -> int:
        if self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, index: Tensor) -> Tensor:
        rows = index.numpy() if isinstance(index, Tensor) else np.asarray(index)
        n, h, w, c = len(rows), *self.shape[1:]
        out = np.empty((n, h, w, c), dtype=np.uint8)
        flat = out.reshape(n, self.row_bytes)
        fd, size, base = self._descriptor(), self.row_bytes, self.offset
        order = np.argsort(rows, kind="stable")
        for position, row in zip(order.tolist(), rows[order].tolist()):
            if os.preadv(fd, [flat[position]], base + row * size) != size:
                raise AdvewsError(f"{self.path} ends before row {row}: the file was truncated after it was opened")
        return torch.from_numpy(out).permute(0, 3, 1, 2)


class StreamedDataset:
    """Images streamed from disk and labels in memory, with the ``images``/``labels``/``len``/
    ``image_shape`` that ``MixedDataset`` uses of its extra part."""

    def __init__(self, images: StreamedRows, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        h, w, c = self.images.shape[1:]
        return (c, h, w)

    def fingerprint(self) -> Dict[str, str]:
        """Cheap content fingerprints of the two files, for a training checkpoint: the labels whole
        (they are in memory), and images.npy's size with a SHA-256 of its header, its first and last
        64 KiB and 256 blocks of 64 KiB spread evenly over it (at most 16 MiB read, whatever N). A
        file rewritten, replaced, truncated or regenerated is caught; a change confined to rows
        between the sampled blocks is not."""
        path = self.images.path
        size = os.path.getsize(path)
        h = hashlib.sha256(f"{size}:{self.images.shape}".encode())
        starts = {0, max(size - _BLOCK, 0)}
        starts.update(size * i // _SAMPLED_BLOCKS for i in range(_SAMPLED_BLOCKS))
        with open(path, "rb") as f:
            for start in sorted(starts):
                f.seek(start)
                h.update(f.read(_BLOCK))
        return {IMAGES: h.hexdigest(), LABELS: tensor_fingerprint([self.labels])}


def open_streamed(
    directory: str,
    *,
    image_shape: Optional[Tuple[int, int, int]] = None,
    num_classes: Optional[int] = None,
) -> StreamedDataset:
    """The streamed dataset in ``directory``, checked whole before training starts: files present
    and readable, uint8 images of ``image_shape`` (C, H, W), as many integer labels as images, all
    in [0, ``num_classes``)."""
    paths = [os.path.join(directory, name) for name in (IMAGES, LABELS)]
    for path in paths:
        if not os.path.isfile(path):
            raise AdvewsError(f"extra data directory {directory} lacks {os.path.basename(path)}; "
                              "write it with: advews-data convert FILE.npz DIR")
    images, labels = (_open_npy(path) for path in paths)
    if images.ndim == 3:  # N x H x W: one channel
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0 or not images.flags.c_contiguous:
        raise AdvewsError(f"{paths[0]}: images must be N x H x W x C uint8 (C order) with N > 0, "
                          f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise AdvewsError(f"{paths[1]}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise AdvewsError(f"{directory}: {len(images)} images but {len(labels)} labels")
    chw = (images.shape[3], images.shape[1], images.shape[2])
    if image_shape is not None and chw != tuple(image_shape):
        raise AdvewsError(f"{paths[0]}: images are {chw} (C, H, W), the labeled data's are {tuple(image_shape)}")
    rows = StreamedRows(paths[0], images.shape, images.offset)
    return StreamedDataset(rows, _read_labels(paths[1], labels, num_classes))


def _open_npy(path: str) -> np.memmap:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        if "greater than file size" in reason:
            reason = "the file is shorter than its header says (truncated?)"
        raise AdvewsError(f"cannot read {path} as a .npy array: {reason}") from None


def _read_labels(path: str, labels: np.memmap, num_classes: Optional[int]) -> Tensor:
    """All labels, range-checked, in the narrowest integer type that holds the classes; read with
    plain file reads in chunks, so checking them does not map the file into memory."""
    limit = np.iinfo(labels.dtype).max if num_classes is None else num_classes - 1
    dtype = next(t for t in _LABEL_DTYPES if np.iinfo(t).max >= min(limit, np.iinfo(np.int64).max))
    out = np.empty(len(labels), dtype=dtype)
    low, high = 0, 0
    with open(path, "rb") as f:
        f.seek(labels.offset)
        for start in range(0, len(labels), _LABEL_CHUNK):
            chunk = np.fromfile(f, dtype=labels.dtype, count=min(_LABEL_CHUNK, len(labels) - start))
            low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
            if low < 0 or (num_classes is not None and high >= num_classes):
                bound = "" if num_classes is None else f", {num_classes}"
                raise AdvewsError(f"{path}: labels reach {low if low < 0 else high}, allowed [0{bound})")
            out[start : start + len(chunk)] = chunk
    return torch.from_numpy(out)
