"""advews-eval --analysis subnets: the analysis, its table and the paper's Fig. 1 and Fig. 7."""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List

import torch

from advews.cli.eval_sources import TRAIN_ONLY_DATA, dataset_args, describe, home_dir
from advews.errors import AdvewsError

MAX_BLOCK_SAMPLES = 20  # block-vulnerability samples per block: Fig. 7 needs a mean, not a distribution


def run_subnet_analysis(
    args: argparse.Namespace, model: torch.nn.Module, test: Any, attack: Any, params: Dict[str, Any],
    state: Dict[str, Any], info: Dict[str, Any], attack_spec: str, device: torch.device,
) -> Dict[str, Any]:
    """--analysis subnets: the search trains on the validation split of the checkpoint's dataset (or of
    --data dataset:NAME), subnets are judged on ``test``; prints the tables and returns the JSON."""
    from advews.data import load_data
    from advews.evaluation.subnet_analysis import analyze_subnets

    # the flags were checked before anything was loaded (eval_checks.check_analysis_flags)
    strategies = [s for s in args.search.split(",") if s]
    bn_modes = [m for m in args.bn_modes.split(",") if m]
    if state:
        bundle_spec = {k: v for k, v in state.get("data_spec", {}).items() if k not in TRAIN_ONLY_DATA}
    else:
        bundle_spec = dataset_args(args.data)
    search_data = load_data(**bundle_spec).val if bundle_spec else None
    if search_data is None:
        raise AdvewsError("--analysis subnets needs the checkpoint's validation split to train the search on")

    def tensors(ds):
        xs, ys = zip(*ds.batches(1024, device=device))
        return torch.cat(xs), torch.cat(ys)

    result = analyze_subnets(
        model, tensors(search_data), tensors(test), attack, args.rho, n_subnets=args.n_subnets,
        strategies=strategies, search_updates=args.search_updates, search_lr=args.search_lr,
        search_bn=args.search_bn, batch_size=args.batch_size, seed=args.seed, bn_modes=bn_modes,
        eval_batch_size=args.eval_batch_size, block_samples=min(args.n_subnets, MAX_BLOCK_SAMPLES),
        show_progress=True,
    )
    result = {**info, "attack": attack_spec, **params, **result}
    print(f"subnet analysis of {describe(info)}, rho {args.rho}, {result['n_examples']} test examples")
    for mode in bn_modes:
        per_mode = result if mode == "eval" else result["bn_train"]
        print(f"{'BN ' + mode:<12}{'clean mean':>11}{'robust mean':>12}{'p10':>8}{'median':>8}{'p90':>8}")
        rows = (["full"] if mode == "eval" else []) + strategies
        for name in rows:
            c, r = per_mode[name]["clean"], per_mode[name]["robust"]
            print(f"{name:<12}{100 * c['mean']:>10.2f}%{100 * r['mean']:>11.2f}%"
                  f"{100 * r['p10']:>7.1f}%{100 * r['median']:>7.1f}%{100 * r['p90']:>7.1f}%")
    blocks = result["block_vulnerability"]
    kind = "robust" if "robust" in blocks["full"] else "clean"
    print(f"{kind} error with one block thinned (BN eval, {blocks['n_samples']} subnets per block; "
          f"full net {100 * blocks['full'][kind]:.1f}%): " + ", ".join(
              f"{b['name']} {100 * b[kind]['mean']:.1f}%" for b in blocks["blocks"]))
    return result


def draw_subnet_figures(args: argparse.Namespace, result: Dict[str, Any], info: Dict[str, Any]) -> List[str]:
    """Fig. 1 (random-subnet boxes, when random was analysed) and Fig. 7 (block vulnerability), next to
    --output as <stem>_fig1.png / _fig7.png, else as subnets_fig*.png in the checkpoint's directory."""
    from advews.evaluation.plots import plot_block_vulnerability, plot_subnet_boxes

    stem = os.path.splitext(args.output)[0] if args.output else os.path.join(home_dir(args), "subnets")
    if args.checkpoint:  # the run directory names the model
        label = os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    else:
        label = info.get("arch") or info["model"]
    written = []
    if "random" in result or "random" in result.get("bn_train", {}):
        written.append(f"{stem}_fig1.png")
        plot_subnet_boxes([(label, result)], written[-1])
    written.append(f"{stem}_fig7.png")
    plot_block_vulnerability(result["block_vulnerability"], written[-1])
    return written
