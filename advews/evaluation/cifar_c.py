"""CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, 2019): the official corrupted test sets.

A directory of ``<corruption>.npy`` (5k x H x W x 3 uint8: severities 1..5, k images each, in
that order; k = 10000 and H = W = 32 in the release) and ``labels.npy`` (5k labels, the test
labels repeated per severity). The metric is the plain mean error over corruptions x severities,
NOT normalised by a baseline (unlike ImageNet-C's mCE).
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from advews.data.arrays import to_batch
from advews.errors import AdvewsError
from advews.evaluation.corruption_scoring import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    Device,
    check_corruptions,
    check_limit,
    check_severities,
    count_errors,
    eval_mode,
    summarize,
)


def evaluate_cifar_c(
    model: nn.Module,
    root: str,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_per_severity: Optional[int] = None,
    batch_size: int = 256,
    device: Device = None,
) -> dict:
    """Error of ``model`` on each corruption and severity of the CIFAR-C directory ``root``.

    ``n_per_severity`` keeps the first N images of each severity (quick runs). Files are memory
    mapped, so only the slices evaluated are read from a 150 MB array. Every file is checked
    before any is evaluated, so a missing one fails in seconds rather than after an hour.
    """
    names = check_corruptions(corruptions, CORRUPTIONS + EXTRA_CORRUPTIONS, "CIFAR-C")
    severities = check_severities(severities)
    check_limit(n_per_severity, "n_per_severity")
    check_limit(batch_size, "batch_size")
    labels_path = os.path.join(root, "labels.npy")
    labels = _load(labels_path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) == 0 or len(labels) % 5:
        raise AdvewsError(f"{labels_path} must hold 5 x k integer labels, got {labels.dtype} with shape {labels.shape}")
    per_severity = len(labels) // 5
    n = per_severity if n_per_severity is None else min(n_per_severity, per_severity)
    arrays = {name: _images(os.path.join(root, f"{name}.npy"), len(labels)) for name in names}
    errors = {}
    with eval_mode(model):
        for name in names:
            errors[name] = {}
            for s in severities:
                start = (s - 1) * per_severity
                wrong, total = count_errors(model, _batches(arrays[name], labels, start, start + n, batch_size, device))
                errors[name][s] = wrong / total
    return summarize("cifar-c", root, errors, n * len(names) * len(severities))


def _load(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise AdvewsError(f"CIFAR-C file not found: {path} (expected <root>/<corruption>.npy and <root>/labels.npy)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise AdvewsError(f"cannot read {path} as a .npy array: {str(error).splitlines()[0]}") from None


def _images(path: str, n: int) -> np.ndarray:
    images = _load(path)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != n or images.shape[3] != 3:
        raise AdvewsError(f"{path} must be {n} x H x W x 3 uint8 (one image per label), "
                          f"got {images.dtype} with shape {images.shape}")
    return images


def _batches(
    images: np.ndarray, labels: np.ndarray, start: int, stop: int, batch_size: int, device: Device
) -> Iterator[Tuple[Tensor, Tensor]]:
    """Rows [start, stop) as (x float NCHW in [0, 1], y int64) batches, read slice by slice."""
    for i in range(start, stop, batch_size):
        j = min(i + batch_size, stop)
        x = torch.from_numpy(np.array(images[i:j])).permute(0, 3, 1, 2).contiguous()  # a copy: the map is read-only
        y = torch.from_numpy(labels[i:j].astype(np.int64))
        yield to_batch(x, y, None, None, device)
