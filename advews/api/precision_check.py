"""--amp bf16|fp16: attacks run under autocast, then are verified in fp32 both ways.

Half precision changes the logits, so a low-precision attack may "break" a point only the
low-precision model gets wrong, or fail on a point an fp32 attack breaks (its gradients underflow,
its logits tie). So the robust accuracy reported is an fp32 one, checked in two steps:

1. every adversarial example of the low-precision attack is re-checked in fp32: a point counts as
   broken only if the fp32 model misclassifies it;
2. every point still counted robust (the "survivors") is attacked again in fp32 by the same attack
   with the same strength (eps, steps, restarts, AutoAttack version, seed; for the attacks other than
   AutoAttack, from the RNG state the low-precision attack of the batch started from), and counts as
   robust only if that attack fails too.

So every point counted robust has survived an fp32 attack of the same strength: a point the
low-precision attack misses still meets the fp32 one. The per-example flags after each step are the
attack's stages (``<attack>-<amp>`` and ``<attack>-fp32``; for AutoAttack its cascade, then its
stages again in fp32 as ``<stage>-fp32``), so their accuracies (the points re-attacked are those
robust after step 1, the re-attack broke the difference) are in the JSON and the --hdf5 file.
``precision_summary`` adds the counts by which the low-precision and fp32 results differ, with a
warning when either exceeds 0.5 points of the examples.

The loop here also gives every attack other than AutoAttack its per-batch resume point (--state).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from advews.api.eval_state import pack, restore_rng, save_rng, unpack
from advews.attacks.autoattack import low_precision
from advews.evaluation.progress import progress

WARN_POINTS = 0.5  # percentage points of the examples


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, autocast: Optional[Callable] = None) -> torch.Tensor:
    if autocast is None:
        return model(x).argmax(1)
    with autocast():
        return model(x).float().argmax(1)


class Flags(NamedTuple):
    """What ``attack_flags`` measured: the per-example robust flags (with ``amp``, fp32-verified both
    ways), the low-precision model's flags, the flags after the fp32 check of the low-precision
    examples alone (before the fp32 re-attack), and the seconds spent, of them in the fp32 re-attack."""

    robust: torch.Tensor
    low: Optional[torch.Tensor]
    checked: Optional[torch.Tensor]
    seconds: float
    fp32_seconds: float


def attack_flags(
    model: nn.Module,
    data: Any,
    attack: Any,
    *,
    batch_size: int,
    device: torch.device,
    amp: Optional[str],
    progress_state: Optional[Dict[str, Any]],
    save: Callable[[Dict[str, Any]], None],
    desc: str,
    batch_seeds: Optional[Tuple[int, int]] = None,
) -> Flags:
    """Per-example robust flags of ``attack`` batch by batch as ``correct_flags`` draws them (so the
    flags equal its flags without ``amp``). With ``amp`` the attack runs under autocast, its
    examples are re-checked in fp32 (``checked``), and the points still robust are attacked again by
    ``attack`` in fp32, starting from the RNG state the low-precision attack of the batch started
    from (``robust``: robust after both). ``progress_state``: what ``save`` stored after the last
    batch of an interrupted run; the batches it covers are skipped and the RNG is restored.
    ``batch_seeds`` (seed, global index of the first batch): reseed before every batch, so a batch's
    flags do not depend on the batches before it (--fixed-batches)."""
    autocast = low_precision(amp, device) if amp else None
    if autocast is not None:  # the attack in low precision, and its fp32 twin for the survivors
        attack, low_attack = dataclasses.replace(attack, autocast=None), dataclasses.replace(attack, autocast=autocast)
    else:
        low_attack = attack
    done = progress_state or {"batches": 0, "robust": "", "low_robust": "", "seconds": 0.0}
    kept = {key: [unpack(done[key], len(done[key]), "progress")] if done.get(key) else []
            for key in ("robust", "low_robust", "checked")}
    robust, low, checked = kept["robust"], kept["low_robust"], kept["checked"]
    if done["batches"]:
        restore_rng(done["rng"], device)
    start = time.time() - done["seconds"]
    fp32_seconds = done.get("fp32_seconds", 0.0)
    was_training = model.training
    model.eval()
    try:
        batches = progress(data.batches(batch_size, device=device), desc, total=data.num_batches(batch_size))
        for i, (x, y) in enumerate(batches):
            if i < done["batches"]:
                continue
            clean = _predict(model, x) == y
            if batch_seeds is not None:
                torch.manual_seed(batch_seed(*batch_seeds, i))
            rng = save_rng(device) if autocast is not None else None
            x_adv = low_attack(model, x, y)
            flags = clean & (_predict(model, x_adv) == y)  # without amp: the flags of the fp32 attack
            if autocast is not None:
                low.append((_predict(model, x, autocast) == y).cpu() & (_predict(model, x_adv, autocast) == y).cpu())
                checked.append(flags.cpu())
                began = time.time()
                flags = _reattack(model, attack, x, y, flags, rng, device)
                fp32_seconds += time.time() - began
            robust.append(flags.cpu())
            save({"batches": i + 1, "robust": pack(torch.cat(robust)),
                  "low_robust": pack(torch.cat(low)) if low else "",
                  **({"checked": pack(torch.cat(checked)), "fp32_seconds": round(fp32_seconds, 2)} if checked else {}),
                  "seconds": round(time.time() - start, 2), "rng": save_rng(device)})
    finally:
        model.train(was_training)
    empty = torch.zeros(0, dtype=torch.bool)

    def joined(parts):
        return (torch.cat(parts) if parts else empty) if autocast is not None else None

    return Flags(torch.cat(robust) if robust else empty, joined(low), joined(checked),
                 round(time.time() - start, 2), round(fp32_seconds, 2))


def _reattack(model: nn.Module, attack: Any, x: torch.Tensor, y: torch.Tensor, survivors: torch.Tensor,
              rng: Dict[str, str], device: torch.device) -> torch.Tensor:
    """``survivors`` after ``attack`` (fp32) on them, drawing from ``rng`` (the state the
    low-precision attack of the batch started from): robust only if that attack fails as well."""
    keep = survivors.nonzero().flatten()
    if not len(keep):
        return survivors
    restore_rng(rng, device)
    x_adv = attack(model, x[keep], y[keep])
    flags = survivors.clone()
    flags[keep] = _predict(model, x_adv) == y[keep]
    return flags


def batch_seed(seed: int, first: int, i: int) -> int:
    """The seed of global batch ``first + i`` under --fixed-batches."""
    return (seed * 1_000_003 + first + i) % 2**63


def precision_summary(clean: torch.Tensor, robust: torch.Tensor, low_robust: torch.Tensor, amp: str) -> Dict[str, Any]:
    """The JSON's account of a low-precision attack: points broken according to the low-precision
    model, how many of them the fp32 result counts broken too (``confirmed_fp32``: the fp32 model
    misclassifies their low-precision example, or the fp32 re-attack broke them), how many the fp32
    result counts broken that the low-precision attack did not break (``missed_low_precision``), and
    a warning when either difference exceeds ``WARN_POINTS`` points of the examples. How many points
    the fp32 re-attack attacked and broke: the accuracies of the attack's stages."""
    n = max(len(clean), 1)
    broken_low = clean & ~low_robust
    out: Dict[str, Any] = {
        "amp": amp,
        "robust_acc_low_precision": int(low_robust.sum()) / n,
        "broken_low_precision": int(broken_low.sum()),
        "confirmed_fp32": int((broken_low & ~robust).sum()),
        "missed_low_precision": int((clean & low_robust & ~robust).sum()),
        "broken_fp32": int((clean & ~robust).sum()),
    }
    warnings = []
    unconfirmed = out["broken_low_precision"] - out["confirmed_fp32"]
    if 100 * unconfirmed / n > WARN_POINTS:
        warnings.append(f"{unconfirmed} of the {out['broken_low_precision']} points broken in {amp} "
                        f"({100 * unconfirmed / n:.2f} points) are robust in fp32 (the fp32 model classifies "
                        f"their {amp} adversarial examples correctly and the fp32 re-attack fails)")
    missed = out["missed_low_precision"]
    if 100 * missed / n > WARN_POINTS:
        warnings.append(f"{missed} points the {amp} attack did not break ({100 * missed / n:.2f} points) are "
                        f"broken in fp32 (by the fp32 check of their {amp} examples or the fp32 re-attack): "
                        f"the attack is weaker in {amp}")
    if warnings:
        out["precision_warning"] = "; ".join(warnings) + "; the fp32 number is the one reported"
    return out
