"""What a run cost, for ``advews-report``: the compute ledger's totals that advews-train writes into
each metrics.jsonl row (``engine.ledger``), and the cost of reaching a validation robust accuracy.

Columns (not percent, unlike the accuracies): ``PFLOPs`` (the run's training FLOPs: matmul, conv and
attention FLOPs of every iteration, elementwise ops excluded), ``device_hours`` (training wall time
times ranks), ``passes/example`` (forward plus backward passes through the network per training
example and iteration); with ``cost_to`` X: ``epoch_to_X%`` and ``PFLOPs_to_X%``, the first epoch
whose ``val_robust_acc`` (the live weights') reaches X percent and the cumulative PFLOPs by its end.
A run that never reaches X has neither (its cell says 'not reached'); a run without a ledger (trained
before it existed) has no cost columns.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from advews.errors import AdvewsError

COST = ("PFLOPs", "device_hours", "passes/example")


def check_cost_to(value: Any) -> Optional[float]:
    """``--cost-to``: a validation robust accuracy in percent, in (0, 100]; None for none."""
    if value is None:
        return None
    try:
        percent = float(value)
    except (TypeError, ValueError):
        percent = math.nan
    if isinstance(value, bool) or not 0 < percent <= 100:
        raise AdvewsError(f"--cost-to {value!r} is not a validation robust accuracy in percent; give a number in "
                          "(0, 100], e.g. --cost-to 45")
    return percent


def reach_columns(percent: float) -> Tuple[str, str]:
    return f"epoch_to_{percent:g}%", f"PFLOPs_to_{percent:g}%"


def is_cost(name: str) -> bool:
    """A column in its own unit (PFLOPs, hours, passes, epochs), printed as is, not in percent."""
    return name in COST or name.startswith(("epoch_to_", "PFLOPs_to_"))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_cost(rows: Sequence[Mapping[str, Any]], cost_to: Optional[float] = None) -> Tuple[Dict[str, float], List[str]]:
    """The cost columns of one run's metrics rows, and the reach columns it never reached."""
    last = rows[-1]
    if not _number(last.get("pflops_total")):
        return {}, []
    out = {"PFLOPs": float(last["pflops_total"])}
    if _number(last.get("device_seconds_total")):
        out["device_hours"] = last["device_seconds_total"] / 3600
    if _number(last.get("forward_passes")) and _number(last.get("backward_passes")):
        out["passes/example"] = last["forward_passes"] + last["backward_passes"]
    if cost_to is None:
        return out, []
    epoch, pflops = reach_columns(cost_to)
    for row in rows:
        acc = row.get("val_robust_acc")
        if _number(acc) and acc >= cost_to / 100 - 1e-12 and _number(row.get("pflops_total")):
            out[epoch], out[pflops] = float(row["epoch"]), float(row["pflops_total"])
            return out, []
    return out, [epoch, pflops]


def format_cost(mean: float, sd: Optional[float], ci: Optional[Tuple[float, float]], signed: bool) -> str:
    """A cost cell: ``mean ± sd`` or ``+diff [CI]`` to 4 significant digits."""
    text = f"{mean:+.4g}" if signed else f"{mean:.4g}"
    if sd is not None and abs(sd) <= 1e-9 * max(abs(mean), 1.0):  # float noise of equal values, not spread
        sd = 0.0
    if ci is not None:
        return text + f" [{ci[0]:+.4g}, {ci[1]:+.4g}]"
    return text + (f" ± {sd:.2g}" if sd is not None else "")


NOTE = (" Cost columns are not percent: PFLOPs (training matmul/conv FLOPs), device_hours (training time x ranks), "
        "passes/example (forward + backward per training example); *_to_X%: the first epoch whose val robust "
        "accuracy reaches X% and the PFLOPs spent by its end.")
