"""Image folders too large for memory (ImageNet), decoded per example by DataLoader workers.

Same protocol as ArrayDataset (``batches``, ``num_batches``, ``len``, ``subset``, ``labels``,
``image_shape``), so the training loop and the evaluation code need not know which one they got.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from advews.data.arrays import Augment, count_batches, to_batch
from advews.errors import AdvewsError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""What counts as an image file (torchvision's ImageFolder list), compared case-insensitively."""


@dataclasses.dataclass(frozen=True, eq=False)
class FolderDataset:
    """Image files under ``root`` (paths relative to it, as bytes: one numpy buffer rather than a
    million Python strings, which forked workers would copy page by page) and int64 labels.

    ``augment`` True: RandomResizedCrop(image_size) + horizontal flip (training); False:
    Resize(image_size / 0.875) + CenterCrop(image_size) (evaluation; 256 / 224 at the default).
    Pixels come as uint8 from the workers and are scaled to [0, 1] on ``device``; normalisation is
    the model's (``models.normalize.Normalized``).
    """

    root: str
    files: np.ndarray
    labels: Tensor
    image_size: int = 224
    augment: bool = False
    num_workers: int = 0
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if len(self.files) != len(self.labels):
            raise AdvewsError(f"{len(self.files)} files but {len(self.labels)} labels")
        if self.image_size < 1:
            raise AdvewsError(f"image_size must be at least 1, got {self.image_size}")
        if self.num_workers < 0:
            raise AdvewsError(f"num_workers must be non-negative, got {self.num_workers}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def subset(self, indices: Union[Tensor, Sequence[int]]) -> FolderDataset:
        """A copy holding only ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return dataclasses.replace(self, files=self.files[index.numpy()], labels=self.labels[index])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
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
        """One epoch of (x float32 in [0, 1], y int64) batches, loaded by ``num_workers`` workers.

        Draws from ``generator`` in a fixed order: the permutation (with ``shuffle``), one base seed
        for the per-example transforms (with ``self.augment``), then the batch ``augment`` batch
        after batch. The example at position p of the epoch is transformed under seed base + p, so
        the batches depend on the generator alone, not on ``num_workers``; given a generator, the
        global RNG is neither read nor advanced (the training step's own draws stay as they were).
        """
        self.num_batches(batch_size, drop_last)  # checks batch_size
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        base = int(torch.randint(2**62, (1,), generator=generator)) if self.augment else 0
        loader = torch.utils.data.DataLoader(
            _Epoch(self, order, base),
            batch_size=batch_size,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),  # the workers' seeds, unused: kept off the global RNG
        )
        for images, labels in loader:
            yield to_batch(images, labels, generator, augment, device)


class _Epoch(torch.utils.data.Dataset):
    """Position p of one epoch: the example ``order[p]``, transformed under seed ``base + p``."""

    def __init__(self, dataset: FolderDataset, order: Tensor, base: int):
        from torchvision import transforms  # slow import, only when images are loaded

        size = dataset.image_size
        if dataset.augment:
            steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        else:
            steps = [transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size)]
        self.transform = transforms.Compose(steps + [transforms.PILToTensor()])
        self.dataset, self.order, self.base = dataset, order, base

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> Tuple[Tensor, int]:
        from PIL import Image

        index = int(self.order[position])
        path = os.path.join(self.dataset.root, os.fsdecode(self.dataset.files[index]))
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # ImageNet holds a few greyscale and CMYK JPEGs
        except OSError as error:
            raise AdvewsError(f"cannot read image {path}: {error}") from None
        if not self.dataset.augment:
            return self.transform(image), int(self.dataset.labels[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.base + position)
            return self.transform(image), int(self.dataset.labels[index])


def class_folders(directory: str) -> List[str]:
    """The sorted subfolder names of ``directory``: an ImageFolder tree's classes, in label order."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir())


def scan_folder(
    directory: str, class_to_index: Optional[Dict[str, int]] = None
) -> Tuple[List[str], np.ndarray, Tensor]:
    """(class names, files relative to ``directory``, labels) of an ImageFolder tree
    ``<directory>/<class>/**/<image>``.

    Classes are the sorted subfolder names, numbered in that order unless ``class_to_index`` (a
    training split's numbering) is given. Examples are interleaved by class (each class's first
    file, then each class's second, ...), so any prefix (``train_limit``, ``test_limit``) and any
    unshuffled batch spans the classes.
    """
    classes = class_folders(directory)
    if class_to_index is None:
        class_to_index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in classes if name not in class_to_index]
    if unknown:
        raise AdvewsError(f"{directory} has class folder {unknown[0]!r} that the training split lacks")
    files: List[str] = []
    labels: List[int] = []
    ranks: List[int] = []
    for name in classes:
        found = sorted(
            os.path.relpath(os.path.join(folder, f), directory)
            for folder, _, names in os.walk(os.path.join(directory, name), followlinks=True)
            for f in names
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        files += found
        labels += [class_to_index[name]] * len(found)
        ranks += range(len(found))
    if not files:
        raise AdvewsError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {directory}/<class>/")
    order = np.lexsort((np.array(labels), np.array(ranks)))
    paths = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)[order]
    return classes, paths, torch.tensor(labels, dtype=torch.int64)[torch.from_numpy(order)]


def with_extra_folders(
    train: FolderDataset, folders: Sequence[str], held_out: Optional[FolderDataset] = None
) -> FolderDataset:
    """``train`` (read from ``train.root``) plus every image under ``folders``, as one dataset.

    DeepAugment (Hendrycks et al. 2021): each extra folder holds distorted copies of the training
    images (EDSR/, CAE/) under the same class folders; as in the authors' train.py (a
    ConcatDataset of ImageFolders, uniformly shuffled) each example is drawn once an epoch, so each
    folder contributes in proportion to its size, with the same training transforms. Copies of the
    ``held_out`` validation images (same class, same file name up to its extension) are left out,
    so model selection never sees a distorted twin of a training image.
    """
    if isinstance(folders, (str, bytes)) or not all(isinstance(f, str) for f in folders):
        raise AdvewsError(f"data.extra_folders must be a list of directories, got {folders!r}")
    classes = class_folders(train.root)
    index = {name: i for i, name in enumerate(classes)}
    for folder in folders:
        if not os.path.isdir(folder):
            raise AdvewsError(f"data.extra_folders: {folder} is not a directory")
        missing = sorted(set(classes) - set(class_folders(folder)))
        if missing:
            raise AdvewsError(f"data.extra_folders: {folder} lacks class folder {missing[0]!r} of {train.root} "
                              f"({len(missing)} missing); each extra folder must mirror the training classes")
    skip = set() if held_out is None else {_copy_key(f, int(y)) for f, y in zip(held_out.files, held_out.labels)}
    roots = [os.path.abspath(p) for p in (train.root, *folders)]
    common = os.path.commonpath(roots)
    parts, labels = [_under(common, roots[0], train.files)], [train.labels]
    for folder, root in zip(folders, roots[1:]):
        _, files, found = scan_folder(folder, index)
        keep = np.array([_copy_key(f, int(y)) not in skip for f, y in zip(files, found)], dtype=bool)
        parts.append(_under(common, root, files[keep]))
        labels.append(found[torch.from_numpy(keep)])
    return dataclasses.replace(train, root=common, files=np.concatenate(parts), labels=torch.cat(labels))


def _copy_key(file: bytes, label: int) -> Tuple[int, bytes]:
    """What a distorted copy shares with its original: the class and the file name's stem."""
    return label, os.path.splitext(os.path.basename(file))[0]


def _under(common: str, root: str, files: np.ndarray) -> np.ndarray:
    """``files`` relative to ``root`` made relative to its ancestor ``common``."""
    prefix = os.path.relpath(root, common)
    return files if prefix == os.curdir else np.char.add(os.fsencode(prefix + os.sep), files)
