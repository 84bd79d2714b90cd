"""CIFAR-10 and CIFAR-100 from torchvision's on-disk layout (the official python pickles)."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch

from advews.data.arrays import ArrayDataset
from advews.errors import AdvewsError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2557, 0.2761)


@dataclass(frozen=True)
class _Archive:
    """Where one CIFAR variant lives and how its pickles name the labels."""

    title: str
    folder: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    label_key: bytes
    url: str
    md5: str


CIFAR10 = _Archive(
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
)
CIFAR100 = _Archive(
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
)


def load_cifar10(root: str, download: bool = False) -> Tuple[ArrayDataset, ArrayDataset]:
    """(train, test): 50000 and 10000 images, 3 x 32 x 32 uint8, labels 0-9."""
    return _load(CIFAR10, root, download)


def load_cifar100(root: str, download: bool = False) -> Tuple[ArrayDataset, ArrayDataset]:
    """(train, test): 50000 and 10000 images, 3 x 32 x 32 uint8, fine labels 0-99."""
    return _load(CIFAR100, root, download)


def _load(archive: _Archive, root: str, download: bool) -> Tuple[ArrayDataset, ArrayDataset]:
    folder = os.path.join(root, archive.folder)
    if download and _missing(archive, folder):
        from torchvision.datasets.utils import download_and_extract_archive  # slow import, only here

        try:
            download_and_extract_archive(archive.url, download_root=root, md5=archive.md5)
        except Exception as error:  # any network or archive failure: one line for the user
            reason = " ".join(str(error).split()) or type(error).__name__
            raise AdvewsError(
                f"could not download {archive.title} from {archive.url} ({reason}); "
                f"download it by hand and extract it into {root}/"
            ) from None
    missing = _missing(archive, folder)
    if missing:
        raise AdvewsError(
            f"{archive.title} not found at {folder} (no {missing}); download {archive.url} "
            f"and extract it into {root}/, or set data.download = True"
        )
    train = _read(archive, [os.path.join(folder, name) for name in archive.train_files])
    test = _read(archive, [os.path.join(folder, name) for name in archive.test_files])
    return train, test


def _missing(archive: _Archive, folder: str) -> str:
    """The first expected file that is absent, or '' when all are there."""
    for name in archive.train_files + archive.test_files:
        if not os.path.isfile(os.path.join(folder, name)):
            return name
    return ""


def _read(archive: _Archive, paths: List[str]) -> ArrayDataset:
    """Concatenate batch files; each row of b"data" is one image, channel planes then rows (CHW)."""
    images, labels = [], []
    for path in paths:
        entry = _unpickle(archive, path)
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(entry[archive.label_key]) != len(data):
            raise AdvewsError(f"{path} is not a {archive.title} batch: data {data.shape}")
        images.append(data)
        labels.append(np.asarray(entry[archive.label_key], dtype=np.int64))
    pixels = torch.from_numpy(np.concatenate(images)).view(-1, 3, 32, 32)
    return ArrayDataset(pixels, torch.from_numpy(np.concatenate(labels)))


def _unpickle(archive: _Archive, path: str) -> dict:
    """One batch file's dict; a truncated or corrupt file is one line that says how to fix it."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, path, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError, OSError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise AdvewsError(f"cannot read {archive.title} batch {path} ({reason}): the file is truncated or "
                          f"corrupt; download {archive.url} again and extract it") from None
    if not isinstance(entry, dict) or b"data" not in entry or archive.label_key not in entry:
        raise AdvewsError(f"{path} is not a {archive.title} batch: it holds no {b'data'!r} and {archive.label_key!r}")
    return entry


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickling runs code: let a CIFAR file build numpy arrays and bytes, nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def __init__(self, file, path: str, **options):
        super().__init__(file, **options)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise AdvewsError(f"refusing to unpickle {module}.{name} from {self.path}: a CIFAR batch holds only "
                              "arrays, so the file is not one (it could run code)")
        return super().find_class(module, name)
