"""Common corruptions generated for any dataset with imagecorruptions(-imaug), cached in HDF5.

These are NOT the official CIFAR-10-C: that release was made with parameters rescaled for 32 px
images, while this library's are tuned for 224 px ImageNet images, so on small images anything
sized in absolute pixels (blur radii, the frost texture) is far stronger than on ImageNet. Use the
official arrays (``cifar_c``) where they exist; these serve datasets without them (MNIST, ...), and
numbers compare only between models evaluated on the same cache.

The library takes H x W x 3 uint8 images of at least 32 px: grayscale images are repeated to 3
channels and brought back by averaging them; smaller images are reflect-padded (centred) to 32 px
and cropped back after corruption.

Measured on the 1000 MNIST-5k test digits (28 x 28, padded to 32; one thread), milliseconds per
image over severities 1-5: pixelate 0.10, contrast 0.14, gaussian_noise 0.23, shot_noise 0.23,
jpeg_compression 0.24, impulse_noise 0.27, defocus_blur 0.36, fog 0.49, brightness 0.50,
elastic_transform 0.52, snow 1.0, motion_blur 1.2, glass_blur 1.35 (plus a 3.5 s numba
compilation once per process), zoom_blur 2.8, frost 5.3 (it reads and resizes a frost photograph
on every call). None fails at that size once padded. A logistic-regression probe (11.5% clean
error) showed which ones are miscalibrated there: defocus_blur reaches chance (91% error) at
severity 4, glass_blur 83% at severity 3, motion_blur is at 32% already at severity 1 and frost
at 31%. fog is strong at every severity (59-79%), but its haze scales with the image, as on
ImageNet (AlexNet: 67% at severity 1); the rest degrade gradually from severity 1 to 5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import os
from typing import Dict, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from torch import nn

from advews.data.arrays import ArrayDataset
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

log = logging.getLogger(__name__)

SMALL_IMAGE_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "zoom_blur", "snow", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
"""Default for images under ``TUNED_SIZE``: the 15 without defocus_blur, glass_blur and
motion_blur (kernels of 3-20 px, sized for 224 px images, erase a 28-32 px image by the middle
severities) and frost (a crop of a texture sized for 224 px, and the slowest: 5 ms per image)."""

TUNED_SIZE = 224
"""The image size the library's parameters were chosen for."""

MIN_SIZE = 32
"""The smallest height and width the library accepts."""

FORMAT = "advews-generated-corruptions/1"
"""Names this file layout and the conversions above (padding, grayscale, per-pair seeds)."""

SEEDED = ("glass_blur", "impulse_noise")
"""Corruptions that draw from their own generator (fresh each call) unless given a ``seed``."""


@dataclasses.dataclass(frozen=True)
class CorruptionCache:
    """An HDF5 file of corrupted copies of one dataset: ``<corruption>/<severity>`` uint8 N x C x
    H x W arrays, ``labels``, and attributes naming the source (``fingerprint``)."""

    path: str
    corruptions: Tuple[str, ...]
    severities: Tuple[int, ...]

    def dataset(self, corruption: str, severity: int) -> ArrayDataset:
        with h5py.File(self.path, "r") as f:
            images = torch.from_numpy(f[f"{corruption}/{severity}"][()])
            labels = torch.from_numpy(f["labels"][()])
        return ArrayDataset(images, labels)


def default_corruptions(image_shape: Sequence[int]) -> Tuple[str, ...]:
    """All 15 for images of at least ``TUNED_SIZE`` px, else ``SMALL_IMAGE_CORRUPTIONS``."""
    return CORRUPTIONS if min(image_shape[-2:]) >= TUNED_SIZE else SMALL_IMAGE_CORRUPTIONS


def fingerprint(dataset: ArrayDataset, seed: int) -> Dict[str, object]:
    """What a cache's contents depend on: the images and labels (SHA-256), their shape, the seed,
    the library version and this module's conventions. A cache records it and is only reused when
    all of it matches."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(dataset.images.numpy()).data)
    digest.update(np.ascontiguousarray(dataset.labels.numpy()).data)
    return {
        "format": FORMAT,
        "source_sha256": digest.hexdigest(),
        "n": len(dataset),
        "image_shape": "x".join(str(d) for d in dataset.image_shape),
        "seed": seed,
        "library": f"imagecorruptions-imaug {_imagecorruptions()[1]}",
    }


def cache_name(dataset: ArrayDataset, seed: int) -> str:
    """A file name that differs whenever the source images or the seed differ."""
    return f"corruptions-{fingerprint(dataset, seed)['source_sha256'][:16]}-seed{seed}.h5"


def generate_corruptions(
    dataset: ArrayDataset,
    cache_path: str,
    *,
    corruptions: Optional[Sequence[str]] = None,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
) -> CorruptionCache:
    """Corrupted copies of ``dataset`` in the HDF5 file ``cache_path``, computed only where missing.

    A cache of the same source (``fingerprint``) is read, and pairs it lacks are added; a cache of
    anything else is refused, never overwritten. ``corruptions`` None: ``default_corruptions``.
    Each (corruption, severity) seeds numpy's global generator (which the library draws from) from
    (seed, corruption, severity), and restores its state afterwards, so a pair's images do not
    depend on which other pairs were generated with it, or before it.
    """
    if corruptions is None:
        corruptions = default_corruptions(dataset.image_shape)
    names = check_corruptions(corruptions, CORRUPTIONS + EXTRA_CORRUPTIONS, "generated corruptions")
    severities = check_severities(severities)
    if dataset.image_shape[0] not in (1, 3):
        raise AdvewsError(f"generated corruptions need 1- or 3-channel images, got shape {dataset.image_shape}")
    if len(dataset) == 0:
        raise AdvewsError("cannot generate corruptions of an empty dataset")
    expected = fingerprint(dataset, seed)
    pairs = [(name, severity) for name in names for severity in severities]
    if os.path.exists(cache_path):
        with _open(cache_path, "r") as f:
            _check(f, cache_path, expected)
            pairs = [(name, severity) for name, severity in pairs if f"{name}/{severity}" not in f]
        if not pairs:
            return CorruptionCache(cache_path, names, severities)
        mode = "a"
    else:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        mode = "w-"
    with _open(cache_path, mode) as f:
        if mode == "w-":
            f.attrs.update(expected)
            f.create_dataset("labels", data=dataset.labels.numpy())
        for name, severity in pairs:
            log.info("generating %s severity %d for %d images", name, severity, len(dataset))
            f.create_dataset(f"{name}/{severity}", data=_corrupt_all(dataset.images.numpy(), name, severity, seed))
            f.flush()
    return CorruptionCache(cache_path, names, severities)


def evaluate_generated(
    model: nn.Module, cache: CorruptionCache, *, batch_size: int = 256, device: Device = None
) -> dict:
    """Error of ``model`` on each corruption and severity of ``cache``, and the unnormalised mean."""
    check_limit(batch_size, "batch_size")
    errors: Dict[str, Dict[int, float]] = {}
    n_examples = 0
    with eval_mode(model):
        for name in cache.corruptions:
            errors[name] = {}
            for severity in cache.severities:
                wrong, total = count_errors(model, cache.dataset(name, severity).batches(batch_size, device=device))
                errors[name][severity] = wrong / total
                n_examples += total
    return summarize("generated", cache.path, errors, n_examples)


def _open(path: str, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise AdvewsError(f"cannot open corruption cache {path} ({error}); delete it or choose another path") from None


def _check(f: h5py.File, path: str, expected: Dict[str, object]) -> None:
    """Refuse a cache whose source is not ``expected`` (it is never overwritten)."""
    if "format" not in f.attrs:
        raise AdvewsError(f"{path} is not an advews corruption cache; delete it or choose another path")
    for key, value in expected.items():
        stored = f.attrs.get(key)
        stored = stored.item() if isinstance(stored, np.generic) else stored
        if stored != value:
            raise AdvewsError(f"{path} was generated from another source ({key} {stored!r}, "
                              f"expected {value!r}); delete it or choose another cache path")


def _imagecorruptions():
    """``(corrupt, version)`` of imagecorruptions-imaug, an optional extra imported on first use (it
    brings numba, llvmlite, OpenCV and scikit-image, which nothing else in advews needs)."""
    try:
        from imagecorruptions import corrupt

        return corrupt, importlib.metadata.version("imagecorruptions-imaug")
    except (ImportError, importlib.metadata.PackageNotFoundError):
        raise AdvewsError("generated corruptions need the imagecorruptions-imaug package: "
                          "pip install 'advews[corruptions]'") from None


def _corrupt_all(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Corrupted copies of uint8 N x C x H x W ``images``, same shape, under the pair's own seed."""
    corrupt = _imagecorruptions()[0]
    channels, height, width = images.shape[1:]
    pad_h, pad_w = max(MIN_SIZE - height, 0), max(MIN_SIZE - width, 0)
    padding = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    key = hashlib.blake2b(f"{seed}:{name}:{severity}".encode(), digest_size=4).digest()
    state = np.random.get_state()
    np.random.seed(int.from_bytes(key, "little"))
    try:
        out = np.empty_like(images)
        for i, image in enumerate(images.transpose(0, 2, 3, 1)):
            rgb = np.repeat(image, 3, axis=2) if channels == 1 else image
            kwargs = {"seed": int(np.random.randint(2**31))} if name in SEEDED else {}
            corrupted = corrupt(np.pad(rgb, padding, mode="reflect"), severity=severity, corruption_name=name, **kwargs)
            corrupted = corrupted[padding[0][0]:padding[0][0] + height, padding[1][0]:padding[1][0] + width]
            if channels == 1:
                corrupted = np.rint(corrupted.mean(axis=2, keepdims=True)).astype(np.uint8)
            out[i] = corrupted.transpose(2, 0, 1)
    finally:
        np.random.set_state(state)
    return out
