"""advews-eval beyond one process's fp32 attacks: the entry points of sharded (torchrun or array
jobs), resumable (--state), mixed-precision (--amp) and flip-rate (--perturbations) runs, of
``--merge``, and the report lines they add."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from advews.api.checks import check_outputs
from advews.api.options import DEFAULTS, EvalOptions
from advews.errors import AdvewsError

MERGE_FLAGS = ("merge", "output", "hdf5", "force")


def needs_extended(args: EvalOptions) -> bool:
    """Runs ``run_extended`` handles instead of ``run_evaluation``."""
    return bool(args.state or args.amp or args.perturbations or args.perturbation_baseline
                or args.fixed_batches or args.shards is not None or args.shard is not None
                or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def run_extended(args: EvalOptions, model: Optional[nn.Module], prepare: Callable[..., Any]
                 ) -> Tuple[Dict[str, Any], List[str], bool]:
    """The result, the lines saying which files went to a fallback, and whether this process
    reports (every process but torchrun ranks other than 0); --hdf5 is written here, --output by
    the caller, so both write only once the whole evaluation is done. ``prepare``:
    advews.api.evaluate's, passed in because that module calls this one."""
    from advews.api.shard_merge import write_hdf5
    from advews.api.shards import run_sharded

    result, flags, main = run_sharded(args, model, prepare)
    failed: List[str] = []
    if main and args.hdf5:
        result["hdf5"], failure = write_hdf5(args.hdf5, result, flags)
        failed += [failure] if failure else []
    return result, failed, main


def run_merge(args: EvalOptions) -> Tuple[Dict[str, Any], List[str]]:
    """advews-eval --merge STATE...: the report of the shards' state files; only --output, --hdf5
    and --force go with it."""
    from advews.api.shard_merge import merge_files, write_hdf5

    given = [name for name, default in DEFAULTS.items() if name not in MERGE_FLAGS and getattr(args, name) != default]
    if given:
        raise AdvewsError(f"--merge takes only --output, --hdf5 and --force (the state files fix the rest), "
                          f"got --{given[0].replace('_', '-')}")
    missing = [p for p in args.merge if not os.path.isfile(p)]
    if missing:
        raise AdvewsError(f"--merge state file not found: {missing[0]}")
    check_outputs(args, {})
    result, flags = merge_files(args.merge)
    failed: List[str] = []
    if args.hdf5:
        result["hdf5"], failure = write_hdf5(args.hdf5, result, flags)
        failed += [failure] if failure else []
    return result, failed


def extra_lines(result: Dict[str, Any]) -> List[str]:
    """Report lines for what ``run_extended`` adds: the shard layout, --amp's two counts per attack,
    the flip-rate table."""
    lines = []
    if "shards" in result:
        shards = result["shards"]
        lines.append(f"{'shards':<12}{shards['count']} {shards['layout']} ranges "
                     + " ".join(f"[{a}, {b})" for a, b in shards["ranges"])
                     + f"; seconds per shard {', '.join(f'{s:g}' for s in shards['seconds'])}")
    if "shard" in result:
        shard = result["shard"]
        lines.append(f"{'shard':<12}{shard['index']} of {shard['of']}: examples [{shard['start']}, {shard['stop']}) "
                     f"only; merge all shards' --state files with advews-eval --merge")
    n = result["n_examples"]
    for name, entry in result["attacks"].items():
        if "amp" in entry:
            lines.append(f"{name} in {entry['amp']}: {entry['broken_low_precision']} points broken in "
                         f"{entry['amp']} ({100 * entry['broken_low_precision'] / max(n, 1):.2f}%), "
                         f"{entry['confirmed_fp32']} confirmed in fp32 "
                         f"({100 * entry['confirmed_fp32'] / max(n, 1):.2f}%); robust acc {entry['amp']} "
                         f"{100 * entry['robust_acc_low_precision']:.2f}%, fp32-verified {100 * entry['robust_acc']:.2f}%")
            if "precision_warning" in entry and name != "autoattack" and len(result["attacks"]) == 1:
                lines.append(f"warning: {entry['precision_warning']}")
    if "perturbations" in result:
        from advews.evaluation.flip_rate import format_flip_table

        lines.append(format_flip_table(result["perturbations"]))
    return lines
