"""advews-plot: training curves of a run, and the subnet figures of advews-eval analysis JSONs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from advews.cli.common import run_cli
from advews.errors import AdvewsError

DESCRIPTION = (
    "Draw PNG figures. RUN_DIR: training curves (clean/robust validation accuracy, training loss, EWS KL "
    "term, controller reward, learning rate per epoch) from RUN_DIR/metrics.jsonl into training_curves.png. "
    "--subnets: the paper's Fig. 1 (random-subnet accuracy boxes, one per analysis JSON, side by side) into "
    "subnets.png, and Fig. 7 (per-block vulnerability) for every JSON that holds one. Figures are derived "
    "files: an existing PNG of the same name is overwritten."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advews-plot", description=DESCRIPTION)
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="an advews-train output directory")
    p.add_argument("--subnets", nargs="+", default=[], metavar="JSON",
                   help="advews-eval --analysis subnets outputs (several: compared side by side)")
    p.add_argument("--labels", metavar="LIST", help="comma-separated labels for the --subnets files "
                   "(default: their file names)")
    p.add_argument("--output", metavar="DIR", help="where the PNGs go (default: RUN_DIR, or the first JSON's "
                   "directory); existing PNGs of the same names are overwritten")
    return p


def _load_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise AdvewsError(f"no analysis file {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AdvewsError(f"{path} is not JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, dict):
        raise AdvewsError(f"{path} is not an advews-eval analysis (expected a JSON object)")
    return data


def _labels(paths: List[str], given: Optional[str]) -> List[str]:
    if given is not None:
        labels = [s.strip() for s in given.split(",")]
        if len(labels) != len(paths):
            raise AdvewsError(f"--labels has {len(labels)} names for {len(paths)} --subnets files")
        return labels
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    # e.g. runs/at/analysis.json and runs/at_ews/analysis.json: name them by their directories
    return [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))), s) for p, s in zip(paths, stems)]


def _plot_run(run_dir: str, output: Optional[str]) -> List[str]:
    from advews.evaluation.plots import plot_training_curves, read_metrics

    if not os.path.isdir(run_dir):
        raise AdvewsError(f"no run directory {run_dir}")
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    path = os.path.join(output or run_dir, "training_curves.png")
    plot_training_curves(rows, path)
    return [path]


def _plot_analyses(paths: List[str], labels: Optional[str], output: Optional[str]) -> List[str]:
    from advews.evaluation.plots import plot_block_vulnerability, plot_subnet_boxes

    out_dir = output or os.path.dirname(os.path.abspath(paths[0]))
    analyses: List[Tuple[str, Dict[str, Any]]] = []
    written = []
    for path, label in zip(paths, _labels(paths, labels)):
        data = _load_json(path)
        blocks = data.get("block_vulnerability", data if "blocks" in data else None)
        subnets = "random" in data or "random" in data.get("bn_train", {})
        if not subnets and blocks is None:
            raise AdvewsError(f"{path} holds neither random-subnet results nor a block vulnerability result")
        if subnets:
            analyses.append((label, data))
        if blocks is not None:
            stem = os.path.splitext(os.path.basename(path))[0]
            written.append(os.path.join(out_dir, f"{stem}_block_vulnerability.png"))
            plot_block_vulnerability(blocks, written[-1])
    if analyses:
        written.append(os.path.join(out_dir, "subnets.png"))
        plot_subnet_boxes(analyses, written[-1])
    return written


def _main(args: argparse.Namespace) -> int:
    if args.run_dir is None and not args.subnets:
        raise AdvewsError("nothing to plot: give RUN_DIR and/or --subnets JSON ...")
    written = []
    if args.run_dir is not None:
        written += _plot_run(args.run_dir, args.output)
    if args.subnets:
        written += _plot_analyses(args.subnets, args.labels, args.output)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-plot", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
