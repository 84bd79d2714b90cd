"""A RobustBench-style ``model_info`` entry (the JSON their leaderboard is built from) from an
AutoAttack evaluation next to the checkpoint.

RobustBench ranks by standard AutoAttack accuracy on the full test set (ImageNet: its fixed 5000
validation images) at the leaderboard's eps. An entry is written only for an evaluation that is
exactly that: ``--version standard``, every test example, the model's own threat model (norm and
eps), the dataset's test split; anything else (a screening run on --n-examples 1000, the fast or a
custom cascade, another eps or --data) is refused in one line naming the JSON and what differs,
since a number that looks like a leaderboard entry but is not one is worse than none. Values follow
their files: accuracies as strings of percentages with two decimals, eps as '8/255'."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from advews import __version__
from advews.engine.evaluations import RESULT, Evaluation, data_flag
from advews.errors import AdvewsError

# Test examples a standard AutoAttack run covers: the full test split (RobustBench's 5000 ImageNet images).
TEST_SIZES = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000, "mnist5k": 1000}
INFO = "model_info.json"
AA_COMMAND = "advews-eval --checkpoint CKPT --attack autoattack --output aa.json"


def format_eps(eps: float) -> str:
    """RobustBench spells eps as k/255 when it is one (8/255), else as the number (0.5)."""
    k = eps * 255
    return f"{round(k)}/255" if 0 < eps < 1 and abs(k - round(k)) < 1e-6 else f"{eps:g}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def why_not_standard(evaluation: Evaluation, config: Dict[str, Any]) -> Optional[str]:
    """Why ``evaluation`` is not a standard full-test-set AutoAttack run of the exported model, or None."""
    entry = evaluation.data.get("attacks", {}).get("autoattack")
    if evaluation.kind != RESULT or not isinstance(entry, dict):
        return "it runs no AutoAttack"
    dataset = (config.get("data_spec") or {}).get("dataset")
    threat = config.get("threat_model") or {}
    if entry.get("version") != "standard":
        return f"AutoAttack version {entry.get('version')!r}, not 'standard' (rerun with --version standard)"
    if dataset not in TEST_SIZES:
        return f"dataset {dataset!r} has no standard test set here (one of {', '.join(TEST_SIZES)})"
    data = data_flag(evaluation.command)
    if data is not None and data.split(":")[:2] != ["dataset", dataset]:
        return f"it ran on --data {data}, not the {dataset} test split"
    n, size = evaluation.data.get("n_examples"), TEST_SIZES[dataset]
    if n != size:
        return f"{n} examples, not the full {dataset} test set of {size} (rerun without --n-examples)"
    if not threat:
        return "the checkpoint records no threat model to compare the eps with"
    if entry.get("norm") != threat.get("norm"):
        return f"norm {entry.get('norm')}, the model's threat model is {threat.get('norm')}"
    eps = entry.get("eps")
    if not isinstance(eps, (int, float)) or not math.isclose(eps, threat["eps"], rel_tol=1e-9, abs_tol=1e-12):
        return f"eps {eps}, the model's threat model is eps {threat['eps']} (rerun without --eps)"
    if entry.get("aa_attacks"):
        return f"a custom cascade {entry['aa_attacks']}"
    return None


def pick_standard(evaluations: List[Evaluation], config: Dict[str, Any], checkpoint: str) -> Evaluation:
    """The standard AutoAttack evaluation among ``evaluations`` (the lowest accuracy when there are
    several), or a one-line refusal naming each AutoAttack JSON and what differs."""
    reasons: List[Tuple[str, str]] = []
    standard: List[Evaluation] = []
    for evaluation in evaluations:
        if "autoattack" not in evaluation.data.get("attacks", {}):
            continue
        why = why_not_standard(evaluation, config)
        if why is None:
            standard.append(evaluation)
        else:
            reasons.append((evaluation.name, why))
    if standard:
        return min(standard, key=lambda e: e.data["attacks"]["autoattack"]["robust_acc"])
    if not reasons:
        raise AdvewsError(f"--robustbench needs an AutoAttack evaluation of {checkpoint} next to it, found none "
                          f"({AA_COMMAND.replace('CKPT', checkpoint)})")
    raise AdvewsError("--robustbench needs a standard full-test-set AutoAttack evaluation at the model's threat "
                      "model; " + "; ".join(f"{name}: {why}" for name, why in reasons))


def model_info(evaluation: Evaluation, config: Dict[str, Any], name: str, weights_sha256: str) -> Dict[str, Any]:
    """The model_info entry of a standard AutoAttack ``evaluation`` (see ``pick_standard``)."""
    entry = evaluation.data["attacks"]["autoattack"]
    data_spec = config.get("data_spec") or {}
    spec = config["model_spec"]
    options = spec.get("options") or {}
    architecture = spec["arch"] + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"
                                   if options else "")
    accuracy = _percent(entry["robust_acc"])
    return {
        "name": name,
        "dataset": data_spec.get("dataset"),
        "threat_model": entry["norm"],
        "architecture": architecture,
        "eps": format_eps(entry["eps"]),
        "clean_acc": _percent(evaluation.data["clean_acc"]),
        "reported": accuracy,
        "autoattack_acc": accuracy,
        "additional_data": bool(data_spec.get("extra_data") or data_spec.get("extra_folders")),
        # RobustBench's field: forward passes of the model per prediction (1: deterministic, no test-time
        # augmentation); the attack's own cost goes in the footnote.
        "number_forward_passes": 1,
        "footnote": (f"Trained with advews {config.get('advews_version', __version__)} ({config.get('defense')}); "
                     f"AutoAttack standard (pyautoattack) on all {evaluation.data['n_examples']} test images, "
                     f"seed {entry.get('seed')}"
                     + (f", {entry['forward_passes']:.0f} forward passes per example" if "forward_passes" in entry
                        else "")
                     + f"; {evaluation.name} sha256 {evaluation.sha256}, model.safetensors "
                     f"sha256 {weights_sha256}."),
    }
