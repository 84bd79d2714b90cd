"""--amp bf16|fp16: attacks run under autocast, every adversarial example is re-checked in fp32.

Half precision changes the logits, so an attack may "break" a point only the low-precision model
gets wrong (or miss one the fp32 model gets wrong). The robust accuracy reported is the fp32 one: a
point counts as broken only if the fp32 model misclassifies its adversarial example. The counts of
both (broken in low precision; of those, confirmed in fp32) go into the JSON and the report, with a
warning when they differ by more than 0.5 points of the examples.

The loop here also gives every attack other than AutoAttack its per-batch resume point (--state).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Tuple

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
) -> Tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """Per-example robust flags of ``attack`` (fp32-verified), the low-precision model's flags (with
    ``amp``) and the seconds spent, batch by batch as ``correct_flags`` draws them (so the flags
    equal its flags without ``amp``). ``progress_state``: what ``save`` stored after the last batch
    of an interrupted run; the batches it covers are skipped and the RNG is restored.
    ``batch_seeds`` (seed, global index of the first batch): reseed before every batch, so a batch's
    flags do not depend on the batches before it (--fixed-batches)."""
    autocast = low_precision(amp, device) if amp else None
    if autocast is not None:
        attack = dataclasses.replace(attack, autocast=autocast)
    done = progress_state or {"batches": 0, "robust": "", "low_robust": "", "seconds": 0.0}
    robust = [unpack(done["robust"], len(done["robust"]), "progress")] if done["robust"] else []
    low = [unpack(done["low_robust"], len(done["low_robust"]), "progress")] if done["low_robust"] else []
    if done["batches"]:
        restore_rng(done["rng"], device)
    start = time.time() - done["seconds"]
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
            x_adv = attack(model, x, y)
            robust.append((clean & (_predict(model, x_adv) == y)).cpu())
            if autocast is not None:
                low.append((_predict(model, x, autocast) == y).cpu() & (_predict(model, x_adv, autocast) == y).cpu())
            save({"batches": i + 1, "robust": pack(torch.cat(robust)),
                  "low_robust": pack(torch.cat(low)) if low else "", "seconds": round(time.time() - start, 2),
                  "rng": save_rng(device)})
    finally:
        model.train(was_training)
    empty = torch.zeros(0, dtype=torch.bool)
    flags = torch.cat(robust) if robust else empty
    return flags, (torch.cat(low) if low else empty) if autocast is not None else None, round(time.time() - start, 2)


def batch_seed(seed: int, first: int, i: int) -> int:
    """The seed of global batch ``first + i`` under --fixed-batches."""
    return (seed * 1_000_003 + first + i) % 2**63


def precision_summary(clean: torch.Tensor, robust: torch.Tensor, low_robust: torch.Tensor, amp: str) -> Dict[str, Any]:
    """The JSON's account of a low-precision attack: points broken according to the low-precision
    model, how many of them the fp32 model confirms, and the warning when the two differ by more
    than ``WARN_POINTS`` points of the examples."""
    n = max(len(clean), 1)
    broken_low = clean & ~low_robust
    confirmed = broken_low & ~robust
    out: Dict[str, Any] = {
        "amp": amp,
        "robust_acc_low_precision": int(low_robust.sum()) / n,
        "broken_low_precision": int(broken_low.sum()),
        "confirmed_fp32": int(confirmed.sum()),
        "broken_fp32": int((clean & ~robust).sum()),
    }
    gap = 100 * (out["broken_low_precision"] - out["confirmed_fp32"]) / n
    if gap > WARN_POINTS:
        out["precision_warning"] = (f"{out['broken_low_precision'] - out['confirmed_fp32']} of the "
                                    f"{out['broken_low_precision']} points broken in {amp} ({gap:.2f} points) are "
                                    f"classified correctly in fp32; the fp32 number is the one reported")
    return out
