"""Activations selectable by name, so one architecture serves the ReLU (2020) and SiLU (DM-style) recipes.

The activation is a plain function, not a module: it holds no state, so choosing it never changes a
state_dict and checkpoints of either activation load into the same architecture.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

from advews.errors import AdvewsError

Activation = Callable[[torch.Tensor], torch.Tensor]

# SiLU, x * sigmoid(x), is the "Swish" of Gowal et al. 2020 and Rebuffi et al. 2021.
ACTIVATIONS: Dict[str, Activation] = {"relu": F.relu, "silu": F.silu}


def activation_fn(name: str) -> Activation:
    """The activation called ``name``; one AdvewsError line naming the allowed ones otherwise."""
    if name not in ACTIVATIONS:
        raise AdvewsError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]
