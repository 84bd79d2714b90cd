"""Training objectives. Importing this package registers every defense and its derived variants."""

from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.registry import DEFENSES, build_defense, get_defense, register_defense, register_deriver
from advews.defenses.standard import Standard
from advews.defenses.at import AT
from advews.defenses.trades import TRADES, trades_kl
from advews.defenses.augment import AugMix, AutoAugment, jensen_shannon
from advews.defenses.mart import MART
from advews.defenses.awp import AT_AWP, AWPMixin, TRADES_AWP

__all__ = [
    "AT", "AT_AWP", "AWPMixin", "AugMix", "AutoAugment", "Batch", "DEFENSES", "Defense", "DefenseOutput", "MART", "Standard", "TRADES",
    "TRADES_AWP", "View", "build_defense", "get_defense", "register_defense", "register_deriver", "trades_kl",
    "jensen_shannon",
]

from advews.defenses.ews import EWSMixin, distillation_kl  # noqa: E402  (registers the _EWS deriver last)

__all__ += ["EWSMixin", "distillation_kl"]
