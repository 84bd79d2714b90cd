"""--perturbations: flip probability and top-5 distance (Hendrycks & Dietterich 2019, Table 3) on
CIFAR-10-P / CIFAR-100-P / ImageNet-P, through ``advews.evaluation.flip_rate``; the set and the
--perturbation-baseline are read before anything slow runs.

mFR / mT5D need a baseline's per-perturbation rates. The paper normalises by AlexNet, but
hendrycks/robustness publishes no per-perturbation AlexNet values (its ImageNet-P/test.py computes
them for torchvision's AlexNet), so the baseline is a file: the JSON of an earlier advews-eval
--perturbations run (e.g. of torchvision's AlexNet via --arch) on the same data."""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from advews.errors import AdvewsError

BASELINE_FORMS = ("the JSON of an earlier advews-eval --perturbations run, or its 'perturbations' entry, or "
                  "{perturbation: {flip_probability, top5_distance}}")


def read_baseline(path: str) -> Dict[str, Mapping[str, float]]:
    """Per-perturbation rates of a baseline file (any of ``BASELINE_FORMS``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise AdvewsError(f"cannot read --perturbation-baseline {path}: {' '.join(str(error).split())}") from None
    for _ in range(2):  # result -> its flip-rate result -> the per-perturbation rows
        if isinstance(data, dict) and isinstance(data.get("perturbations"), dict):
            data = data["perturbations"]
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, dict) and "flip_probability" in v for v in data.values()):
        raise AdvewsError(f"--perturbation-baseline {path} holds no per-perturbation flip rates; give {BASELINE_FORMS}")
    return data


def open_perturbations(spec: str, baseline_path: Optional[str]) -> Tuple[Any, Optional[Dict[str, Mapping[str, float]]]]:
    """The perturbation set ``spec`` names and the baseline, read now (whether the baseline covers
    every perturbation of the set is checked as the evaluation starts, before any model runs)."""
    from advews.data.perturbation_sets import open_perturbation_set

    return open_perturbation_set(spec), read_baseline(baseline_path) if baseline_path else None


def flip_rates(model: nn.Module, opened: Tuple[Any, Any], *, batch_size: int, device: Any) -> Dict[str, Any]:
    """The flip-rate result of ``model`` on the opened set (JSON under 'perturbations')."""
    from advews.evaluation.flip_rate import evaluate_flip_rates

    data, baseline = opened
    return evaluate_flip_rates(model, data, batch_size=batch_size, device=device, baseline=baseline)
