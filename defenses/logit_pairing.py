"""A new adversarial objective in your own file: AT plus clean/adversarial logit pairing.

``@register_defense`` makes ``LogitPairingAT`` usable from gin and derives ``LogitPairingAT_EWS``.
"""

import torch.nn.functional as F

from advews.defenses import AT, View, register_defense


@register_defense
class LogitPairingAT(AT):
    """Cross-entropy on PGD examples + ``pairing`` * squared distance between clean and adversarial logits."""

    def __init__(self, pairing: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.pairing = pairing

    def loss(self, model, batch):
        out = super().loss(model, batch)  # CE on batch.x_adv, crafted by AT.prepare
        clean = model(batch.x)
        out.loss = out.loss + self.pairing * F.mse_loss(out.logits, clean)
        out.views.append(View(batch.x, clean))  # EWS distils subnets on the clean view too
        return out
