"""advews-report: compare advews-train runs across seeds as a paper-style table."""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from advews.cli.common import run_cli
from advews.errors import AdvewsError
from advews.evaluation.report import FORMATS, report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advews-report", description="Group advews-train runs by configuration (config.gin minus "
        "train.seed and output paths), print mean ± sd over seeds of each metric (metrics.jsonl's final "
        "validation accuracies, the run's compute cost, and every advews-eval --output JSON in the run "
        "directory), and the paired "
        "difference by seed with its 95% Student-t CI between two groups or against --baseline.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="advews-train output directories")
    p.add_argument("--group-by", metavar="KEYS", help="comma-separated gin keys to group by instead of the "
                   "whole config, e.g. train.defense,EWS.rho")
    p.add_argument("--metrics", metavar="LIST", help="comma-separated columns (default: clean, every attack, "
                   "final_val_clean/robust, subnet robust median and p10); an unknown one lists those found")
    p.add_argument("--baseline", metavar="GROUP", help="compare every other group with this one: a group "
                   "label or key=value pairs, e.g. 'train.defense=AT' (default: the first of exactly two)")
    p.add_argument("--label", action="append", default=[], metavar="NAME=GROUP",
                   help="rename a group, e.g. --label 'EWS (authors)=EWS.rho=0.9' (repeatable)")
    p.add_argument("--cost-to", metavar="PERCENT", help="also the cost to reach this val robust accuracy (in "
                   "percent): the first epoch whose val_robust_acc reaches it and the PFLOPs spent by then")
    p.add_argument("--format", default="md", help=f"table format: {', '.join(FORMATS)} (default md)")
    return p


def _labels(specs: List[str]) -> Dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, group = spec.partition("=")
        if not (sep and name and group):
            raise AdvewsError(f"bad --label {spec!r}; use NAME=GROUP, e.g. 'vanilla=train.defense=AT'")
        out[name] = group
    return out


def _split(text: Optional[str]) -> Optional[List[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _main(args: argparse.Namespace) -> int:
    print(report(args.run_dirs, group_by=_split(args.group_by), metrics=_split(args.metrics), fmt=args.format,
                 baseline=args.baseline, labels=_labels(args.label), cost_to=args.cost_to), end="")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-report", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
