"""Training objectives. Importing this package registers every defense and its derived variants."""

from advews.defenses.base import Batch, Defense, DefenseOutput, View
from advews.defenses.registry import DEFENSES, build_defense, get_defense, register_defense, register_deriver
from advews.defenses.standard import Standard
from advews.defenses.at import AT
from advews.defenses.trades import TRADES, trades_kl

__all__ = [
    "AT", "Batch", "DEFENSES", "Defense", "DefenseOutput", "Standard", "TRADES", "View",
    "build_defense", "get_defense", "register_defense", "register_deriver", "trades_kl",
]

from advews.defenses.ews import EWSMixin, distillation_kl  # noqa: E402  (registers the _EWS deriver last)

__all__ += ["EWSMixin", "distillation_kl"]
