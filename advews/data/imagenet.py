"""ImageNet (the EWS paper's Tables 2-3) from ImageFolder trees: ``<root>/train`` and ``<root>/val``."""

from __future__ import annotations

import os
from typing import Tuple

from advews.data.folder import FolderDataset, scan_folder
from advews.errors import AdvewsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000


def load_imagenet(root: str, download: bool = False) -> Tuple[FolderDataset, FolderDataset]:
    """(train, test): ``<root>/train/<class>/*.JPEG`` with training transforms and
    ``<root>/val/<class>/*.JPEG`` (the official 50000 validation images, the usual test set) with
    evaluation transforms, both at 224 px; labels number the training class folders in sorted order.

    ImageNet cannot be downloaded on the user's behalf (its licence needs a sign-up), so
    ``download`` changes nothing. The flat official val folder must first be sorted into class
    folders (e.g. with the well-known valprep.sh).
    """
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        raise AdvewsError(
            f"ImageNet not found at {root}: expected {train_dir}/<class>/*.JPEG and {val_dir}/<class>/*.JPEG "
            "(ImageFolder layout; ImageNet cannot be downloaded automatically); set data.root to the folder "
            "holding train/ and val/"
        )
    classes, files, labels = scan_folder(train_dir)
    if len(classes) > IMAGENET_CLASSES:
        raise AdvewsError(f"{train_dir} has {len(classes)} class folders, ImageNet at most {IMAGENET_CLASSES}")
    _, val_files, val_labels = scan_folder(val_dir, {name: i for i, name in enumerate(classes)})
    return FolderDataset(train_dir, files, labels, augment=True), FolderDataset(val_dir, val_files, val_labels)
