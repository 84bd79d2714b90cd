"""ImageNet-C (Hendrycks & Dietterich, 2019): corruption error normalised by AlexNet's.

Layout ``<root>/<corruption>/<severity>/<class>/*.JPEG``, classes numbered in sorted folder order
(torchvision's ImageFolder, and ``advews.data.folder``). The released images are already 224 x 224
center crops, so the evaluation transform is CenterCrop(image_size) + to-tensor, a no-op crop at
224 (as in hendrycks/robustness ImageNet-C/test.py; AugMix's imagenet.py instead resizes them to
256 and crops 224 again, which rescales the corruptions).

CE of a corruption = sum over severities of the model's error / the same sum for AlexNet; mCE =
mean CE over the corruptions evaluated. Both are ratios (1.0 = AlexNet's robustness); x100 gives
the % the papers quote (ResNet-50 about 76.7%).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from advews.data.arrays import to_batch
from advews.data.folder import scan_folder
from advews.errors import AdvewsError
from advews.evaluation.corruption_scoring import (
    CORRUPTIONS,
    SEVERITIES,
    Device,
    check_corruptions,
    check_limit,
    check_severities,
    count_errors,
    eval_mode,
    summarize,
)

# AlexNet's top-1 error on ImageNet-C, per corruption, severities 1..5. Numbers (facts) from
# UCSC-VLAA/RobustCNN timm/utils/imagenet_c.py ("imagenetc_alexnet_error_rates_list"); their
# means over severities equal the per-corruption ALEXNET_ERR of google-research/augmix
# imagenet.py ("Raw AlexNet errors taken from https://github.com/hendrycks/robustness") to 6 digits.
# Float artefacts of the source (0.656239999999999) are written out (0.65624).
ALEXNET_ERRORS: Dict[str, Tuple[float, ...]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}


def evaluate_imagenet_c(
    model: nn.Module,
    root: str,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 256,
    device: Device = None,
    num_workers: int = 0,
    image_size: int = 224,
    n_per_severity: Optional[int] = None,
) -> dict:
    """Errors, CE per corruption and mCE of ``model`` on the ImageNet-C tree ``root``.

    ``n_per_severity`` keeps the first N images of each folder (interleaved by class, so any N
    spans the classes); AlexNet's errors are on all 50000, so a limited run's mCE is an estimate.
    Every folder is scanned before any is evaluated, so a missing one fails early.
    """
    names = check_corruptions(corruptions, CORRUPTIONS, "ImageNet-C (AlexNet's errors cover these)")
    severities = check_severities(severities)
    check_limit(n_per_severity, "n_per_severity")
    check_limit(batch_size, "batch_size")
    check_limit(image_size, "image_size")
    if num_workers < 0:
        raise AdvewsError(f"num_workers must be non-negative, got {num_workers}")
    folders = _scan(root, names, severities, n_per_severity)
    errors: Dict[str, Dict[int, float]] = {}
    n_examples = 0
    with eval_mode(model):
        for name in names:
            errors[name] = {}
            for s in severities:
                folder, files, labels = folders[name, s]
                loader = torch.utils.data.DataLoader(
                    _Images(folder, files, labels, image_size), batch_size=batch_size, num_workers=num_workers,
                    pin_memory=torch.device(device or "cpu").type == "cuda",
                )
                wrong, total = count_errors(model, (to_batch(x, y, None, None, device) for x, y in loader))
                errors[name][s] = wrong / total
                n_examples += total
    result = summarize("imagenet-c", root, errors, n_examples)
    for name in names:
        alexnet = sum(ALEXNET_ERRORS[name][s - 1] for s in severities)
        result["corruptions"][name]["ce"] = sum(errors[name].values()) / alexnet
    result["mce"] = float(np.mean([result["corruptions"][name]["ce"] for name in names]))
    return result


def _scan(
    root: str, names: Sequence[str], severities: Sequence[int], limit: Optional[int]
) -> Dict[Tuple[str, int], Tuple[str, np.ndarray, Tensor]]:
    """(folder, files, labels) per (corruption, severity), every folder with the same classes."""
    if not os.path.isdir(root):
        raise AdvewsError(f"ImageNet-C directory not found: {root} "
                          "(expected <root>/<corruption>/<severity>/<class>/*.JPEG)")
    reference: Optional[Tuple[str, List[str]]] = None
    found = {}
    for name in names:
        for s in severities:
            folder = os.path.join(root, name, str(s))
            if not os.path.isdir(folder):
                raise AdvewsError(f"ImageNet-C folder not found: {folder} "
                                  "(expected <root>/<corruption>/<severity>/<class>/)")
            classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
            if reference is None:
                reference = (folder, classes)
            elif classes != reference[1]:
                raise AdvewsError(f"{folder} has {len(classes)} class folders that differ from the "
                                  f"{len(reference[1])} of {reference[0]}; every folder needs the same classes")
            _, files, labels = scan_folder(folder)
            if limit is not None:
                files, labels = files[:limit], labels[:limit]
            found[name, s] = (folder, files, labels)
    return found


class _Images(torch.utils.data.Dataset):
    """One severity folder's images as uint8 CHW tensors (center crop only: they are 224 px crops already)."""

    def __init__(self, folder: str, files: np.ndarray, labels: Tensor, image_size: int):
        from torchvision import transforms  # slow import, only when images are loaded

        self.transform = transforms.Compose([transforms.CenterCrop(image_size), transforms.PILToTensor()])
        self.folder, self.files, self.labels = folder, files, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        from PIL import Image

        path = os.path.join(self.folder, os.fsdecode(self.files[index]))
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), int(self.labels[index])
        except OSError as error:
            raise AdvewsError(f"cannot read image {path}: {error}") from None
