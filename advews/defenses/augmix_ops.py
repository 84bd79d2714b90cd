"""AugMix's augmentation (Hendrycks et al., ICLR 2020), vectorised over a batch of uint8 images.

The operations and their magnitudes follow the AugMix reference ``augmentations.py``: an op applied
at severity s draws a level uniformly in [0.1, s) and scales it to the op's maximum at level 10
(rotate 30 degrees, shear 0.3, translate a third of the image, posterize 4 - floor(level * 4 / 10)
bits, solarize threshold 256 - floor(level * 25.6), enhance factor 0.1 + level * 0.18); geometric
ops flip the sign with probability 1/2, resample bilinearly with zero fill, and use PIL's
conventions (shear about the top-left corner, rotation about the image centre).

Every image draws its own ops and magnitudes, but images that drew the same op are transformed in
one call, so a 128-image batch costs a few dozen tensor ops instead of ~1500 per-image calls. All
randomness comes from torch's global CPU generator (``torch.rand``/``torch.distributions``), so a
resumed run that restores it draws the same augmentations (and CPU and GPU runs the same parameters).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Beta, Dirichlet
from torchvision.transforms.v2 import functional as TF

# (uint8 images [k, C, H, W], level [k], sign [k] in {-1, 1}) -> uint8 images
Op = Callable[[Tensor, Tensor, Tensor], Tensor]


def _int_parameter(level: Tensor, maxval: float) -> Tensor:
    return torch.floor(level * maxval / 10)


def _float_parameter(level: Tensor, maxval: float) -> Tensor:
    return level * maxval / 10


def _per_image(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def _to_uint8(images: Tensor) -> Tensor:
    return images.round().clamp(0, 255).to(torch.uint8)


def _resample(images: Tensor, matrix: Tensor) -> Tensor:
    """Output pixel (x, y) takes the input at ``matrix @ (x, y, 1)`` (PIL's ``Image.transform``
    convention, continuous coordinates with pixel i spanning [i, i + 1]); bilinear, zero fill."""
    n, c, h, w = images.shape
    to_unit = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]], device=images.device)
    from_unit = torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], device=images.device)
    theta = to_unit @ matrix @ from_unit  # the same map in grid_sample's [-1, 1] coordinates
    grid = F.affine_grid(theta[:, :2], [n, c, h, w], align_corners=False)
    return _to_uint8(F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False))


def _identity_matrices(images: Tensor) -> Tensor:
    return torch.eye(3, device=images.device).repeat(images.shape[0], 1, 1)


def autocontrast(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return TF.autocontrast(images)


def equalize(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return TF.equalize(images)


def posterize(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    bits = 4 - _int_parameter(level, 4).long()
    mask = (255 << (8 - bits)) & 255
    return images & _per_image(mask.to(torch.uint8))


def solarize(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    threshold = _per_image(256 - _int_parameter(level, 256))
    return torch.where(images >= threshold, 255 - images, images)


def rotate(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """Counter-clockwise by ``sign * floor(3 * level)`` degrees about the centre (as ``TF.rotate``)."""
    angle = torch.deg2rad(sign * _int_parameter(level, 30))
    cos, sin = torch.cos(angle), torch.sin(angle)
    h, w = images.shape[-2:]
    cx, cy = w / 2, h / 2
    matrix = _identity_matrices(images)
    matrix[:, 0, 0], matrix[:, 0, 1] = cos, -sin
    matrix[:, 1, 0], matrix[:, 1, 1] = sin, cos
    matrix[:, 0, 2] = cx - cos * cx + sin * cy
    matrix[:, 1, 2] = cy - sin * cx - cos * cy
    return _resample(images, matrix)


def shear_x(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    matrix = _identity_matrices(images)
    matrix[:, 0, 1] = sign * _float_parameter(level, 0.3)
    return _resample(images, matrix)


def shear_y(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    matrix = _identity_matrices(images)
    matrix[:, 1, 0] = sign * _float_parameter(level, 0.3)
    return _resample(images, matrix)


def translate_x(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    matrix = _identity_matrices(images)
    matrix[:, 0, 2] = sign * _int_parameter(level, images.shape[-1] / 3)
    return _resample(images, matrix)


def translate_y(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    matrix = _identity_matrices(images)
    matrix[:, 1, 2] = sign * _int_parameter(level, images.shape[-2] / 3)
    return _resample(images, matrix)


def _enhance(images: Tensor, degenerate: Tensor, level: Tensor) -> Tensor:
    """PIL ``ImageEnhance``: blend from the degenerate image towards (and past) the image."""
    factor = _per_image(_float_parameter(level, 1.8) + 0.1)
    degenerate = degenerate.float()
    return _to_uint8(degenerate + factor * (images.float() - degenerate))


def color(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _enhance(images, TF.adjust_saturation(images, 0.0), level)


def contrast(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _enhance(images, TF.adjust_contrast(images, 0.0), level)


def brightness(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _enhance(images, torch.zeros_like(images), level)


def sharpness(images: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _enhance(images, TF.adjust_sharpness(images, 0.0), level)


OPS: Dict[str, Op] = {
    "autocontrast": autocontrast, "equalize": equalize, "posterize": posterize, "rotate": rotate,
    "solarize": solarize, "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x,
    "translate_y": translate_y,
}
# AugMix leaves these out by default: they overlap with ImageNet-C / CIFAR-C test corruptions.
CORRUPTION_LIKE_OPS: Dict[str, Op] = {
    "color": color, "contrast": contrast, "brightness": brightness, "sharpness": sharpness,
}
ALL_OPS: Dict[str, Op] = {**OPS, **CORRUPTION_LIKE_OPS}


def apply_ops(images: Tensor, ops: Sequence[Op], op_ids: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """Image i gets ``ops[op_ids[i]]`` at ``level[i]``, ``sign[i]`` (op id -1: left unchanged).

    ``op_ids``, ``level`` and ``sign`` live on the CPU, so grouping images by op never waits on a GPU.
    """
    out = images.clone()
    for k, op in enumerate(ops):
        index = (op_ids == k).nonzero().squeeze(1)
        if index.numel():
            dev_index = index.to(images.device)
            out[dev_index] = op(images[dev_index], level[index].to(images.device), sign[index].to(images.device))
    return out


def augment_and_mix(
    images: Tensor, ops: Sequence[Op], *, severity: int, width: int, depth: int, alpha: float
) -> Tensor:
    """One AugMix image per input: ``(1 - m) x + m * sum_i w_i chain_i(x)``, float in [0, 1].

    ``images``: uint8 [N, C, H, W]. Each of the ``width`` chains applies ``depth`` random ops (a
    random 1-3 per chain and image when ``depth`` <= 0); w ~ Dirichlet(alpha), m ~ Beta(alpha, alpha).
    """
    n = images.shape[0]
    device = images.device
    weights = Dirichlet(torch.full((width,), float(alpha))).sample((n,)).to(device)  # [n, width]
    mix_ratio = Beta(float(alpha), float(alpha)).sample((n,)).to(device)
    depths = torch.full((width * n,), depth) if depth > 0 else torch.randint(1, 4, (width * n,))
    steps = int(depths.max())
    op_ids = torch.randint(len(ops), (steps, width * n))
    op_ids[torch.arange(steps)[:, None] >= depths] = -1  # chains shorter than ``steps`` stop early
    levels = 0.1 + (severity - 0.1) * torch.rand(steps, width * n)
    signs = torch.randint(0, 2, (steps, width * n)) * 2.0 - 1.0

    chains = images.repeat(width, 1, 1, 1)  # chain-major: rows [i * n, (i + 1) * n) are chain i
    for s in range(steps):
        chains = apply_ops(chains, ops, op_ids[s], levels[s], signs[s])
    chains = chains.view(width, *images.shape).float().div_(255)
    mixed = torch.einsum("nk,knchw->nchw", weights, chains)
    clean = images.float().div_(255)
    m = _per_image(mix_ratio)
    return ((1 - m) * clean + m * mixed).clamp_(0, 1)  # convex already; the clamp absorbs float rounding
