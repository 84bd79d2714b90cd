"""Corruption-robustness objectives: AutoAugment (Cubuk et al. 2019) and AugMix with its
Jensen-Shannon consistency loss (Hendrycks et al. 2020).

Both augment in ``prepare`` on top of the dataset's crop/flip, on the batch's device, drawing from
torch's global RNG (which checkpoints save), so a resumed run replays the same augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.transforms import v2

from advews.defenses.augmix_ops import ALL_OPS, OPS, augment_and_mix
from advews.defenses.base import Batch, DefenseOutput, View
from advews.defenses.params import require_number
from advews.defenses.registry import register_defense
from advews.defenses.standard import Standard
from advews.errors import AdvewsError, require_bool


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8, the form the augmentation ops (like PIL) work on."""
    return (x * 255).round().to(torch.uint8)


def jensen_shannon(*logits: torch.Tensor) -> torch.Tensor:
    """Mean over views of KL(p_v || M), M the mean of the views' probabilities.

    As in AugMix's code, log M is taken of M clamped to [1e-7, 1] so the term cannot explode; KL is
    summed over classes and averaged over the batch.
    """
    probs = [z.float().softmax(dim=1) for z in logits]
    log_mixture = torch.stack(probs).mean(0).clamp(1e-7, 1).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / len(probs)


@register_defense
class AutoAugment(Standard):
    """Cross-entropy on AutoAugment-ed images; every example draws its own sub-policy.

    A torchvision v2 transform called on a batch tensor applies one random sub-policy to the whole
    batch, so the policy is applied image by image.
    """

    def __init__(self, policy: str = "cifar10", label_smoothing: float = 0.0):
        super().__init__(label_smoothing=label_smoothing)
        choices = [p.value for p in v2.AutoAugmentPolicy]
        if policy not in choices:
            raise AdvewsError(f"AutoAugment.policy must be one of {', '.join(choices)}, got {policy!r}")
        self.policy = v2.AutoAugment(v2.AutoAugmentPolicy(policy))

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Batch:
        augmented = torch.stack([self.policy(image) for image in to_uint8(x)])
        return Batch(augmented.float().div_(255), y)


@dataclass
class AugMixBatch(Batch):
    """The clean batch plus its AugMix views."""

    x_aug: Tuple[torch.Tensor, ...] = ()


SEARCH_VIEWS = ("clean_of_all", "all", "clean")


@register_defense
class AugMix(Standard):
    """CE on the clean batch + ``jsd_weight`` * JSD(p_clean, p_aug1, p_aug2) over two AugMix views.

    Defaults: width 3, depth 1-3 (``depth=-1``), Dirichlet/Beta alpha 1, JSD weight 12 (AugMix);
    severity 5, the EWS paper's CIFAR setting (AugMix's own CIFAR script uses 3). ``all_ops`` adds
    color/contrast/brightness/sharpness, which overlap with the test corruptions. The three views go
    through one concatenated forward so BN normalises them together, as in AugMix; EWS distils the
    subnet on each view with weight 1/3. ``search_on``: what the EWS search scores subnets on.
    'clean_of_all' (default, the authors' ``train_augmix``): the subnet runs on the concatenated
    clean + two augmented views (so BN in train mode normalises over all three) and the reward is the
    accuracy of the clean third; 'all': the accuracy over all three views; 'clean': the clean images
    alone are forwarded (equal to 'clean_of_all' when ``EWS.search_bn = 'eval'``).
    """

    def __init__(
        self,
        severity: int = 5,
        width: int = 3,
        depth: int = -1,
        alpha: float = 1.0,
        all_ops: bool = False,
        jsd_weight: float = 12.0,
        label_smoothing: float = 0.0,
        search_on: str = "clean_of_all",
    ):
        super().__init__(label_smoothing=label_smoothing)
        if search_on not in SEARCH_VIEWS:
            raise AdvewsError(f"AugMix.search_on must be one of {', '.join(SEARCH_VIEWS)}, got {search_on!r}")
        self.search_on = search_on
        require_number("AugMix.severity", severity, "in 1..10", integer=True)
        require_number("AugMix.width", width, ">= 1", integer=True)
        require_number("AugMix.depth", depth, ">= 1, or -1 for a random 1-3", integer=True)
        require_number("AugMix.alpha", alpha, "> 0")
        require_number("AugMix.jsd_weight", jsd_weight, ">= 0")
        require_bool("AugMix.all_ops", all_ops)
        if not 1 <= severity <= 10:
            raise AdvewsError(f"AugMix.severity must be in 1..10, got {severity}")
        if width < 1:
            raise AdvewsError(f"AugMix.width must be >= 1, got {width}")
        if depth == 0 or depth < -1:
            raise AdvewsError(f"AugMix.depth must be >= 1, or -1 for a random 1-3, got {depth}")
        if alpha <= 0:
            raise AdvewsError(f"AugMix.alpha must be > 0, got {alpha}")
        if jsd_weight < 0:
            raise AdvewsError(f"AugMix.jsd_weight must be >= 0, got {jsd_weight}")
        self.severity, self.width, self.depth, self.alpha = severity, width, depth, alpha
        self.jsd_weight = jsd_weight
        self.ops = list((ALL_OPS if all_ops else OPS).values())

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AugMixBatch:
        images = to_uint8(x)
        views = augment_and_mix(
            torch.cat([images, images]), self.ops,
            severity=self.severity, width=self.width, depth=self.depth, alpha=self.alpha,
        )
        return AugMixBatch(x, y, x_aug=tuple(views.chunk(2)))

    def search_view(self, batch: AugMixBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Label -1 marks rows that are forwarded but not scored (see ``Defense.search_view``)."""
        if self.search_on == "clean":
            return batch.x, batch.y
        x = torch.cat((batch.x, *batch.x_aug))
        if self.search_on == "all":
            return x, batch.y.repeat(1 + len(batch.x_aug))
        unscored = batch.y.new_full((batch.y.shape[0] * len(batch.x_aug),), -1)
        return x, torch.cat((batch.y, unscored))

    def loss(self, model: nn.Module, batch: AugMixBatch) -> DefenseOutput:
        inputs = torch.cat((batch.x, *batch.x_aug))
        all_logits = model(inputs)
        logits = all_logits.split(batch.x.shape[0])
        natural = self.cross_entropy(logits[0], batch.y)
        jsd = jensen_shannon(*logits)
        return DefenseOutput(
            loss=natural + self.jsd_weight * jsd,
            # One view over the concatenated (clean, aug1, aug2) batch: its batch-mean KL is the average
            # of the three views' KLs (the paper's averaging), and the subnet sees the same BN batch
            # statistics as the full net did.
            views=[View(inputs, all_logits)],
            search_x=batch.x,
            search_y=batch.y,
            logits=logits[0],
            metrics={"natural_loss": natural.detach(), "jsd": jsd.detach()},
        )
