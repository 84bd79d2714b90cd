"""advews-eval: clean and robust accuracy of a model under one or several attacks, its error under
common corruptions, and how weak its subnets are. The model is an advews-train checkpoint or export,
a zoo architecture holding a public state_dict, or any ``module:function`` returning an nn.Module.

This module parses flags and prints reports; the work is advews.api's (what ``advews.evaluate`` and
``advews.analyze_subnets`` run). Only torch-free modules are imported before the flags are parsed,
so ``--help`` and a bad flag answer at once."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Callable, Dict, List, Optional

from advews.api.options import (
    AA_ATTACKS,
    AMP,
    CORRUPTION_SPECS,
    DEFAULTS,
    NORMALIZATION_NAMES,
    NORMS,
    PERTURBATION_SPECS,
    SEARCH_BN,
    VERSIONS,
    WEIGHTS_FROM,
    EvalOptions,
)
from advews.cli.common import OneLineParser, run_cli
from advews.errors import AdvewsError

ATTACK_HELP = (
    "comma-separated attacks, each reported alone and all together as the per-point worst case (a point "
    "is robust only if it survives every attack): pgd, fgsm (advews); cw (Carlini-Wagner L2, projected "
    "onto the eps-ball), apgd-ce, apgd-dlr, square (steps = queries), fab, mifgsm (torchattacks); "
    "autoattack (the reference AutoAttack via pyautoattack; torchattacks' own AutoAttack differs from it "
    "and is not offered); your own attack as MODULE:CLASS, a subclass of advews.attacks.Attack imported from "
    "the current directory first (e.g. attacks.multi_targeted:MultiTargetedPGD; it gets --eps, --norm, --steps, "
    "--step-size, --restarts and --seed where it has such fields); none: clean accuracy only. Default pgd, but "
    "none when --corruptions is given (name attacks explicitly to run both)"
)

EPILOG = ("exit codes: 0 done; 2 bad input or a refusal (one line on stderr, e.g. a --state file of another "
          "evaluation, edited, or in use by another advews-eval); 4 the disk (or quota) is full: one line naming "
          "the file and what is kept (a --state file keeps the work finished before it, and the same command "
          "resumes once there is space; a result that could not be written went to a fallback file it names, "
          "no partial file is left); 130 interrupted (Ctrl-C; --state keeps the work finished)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="advews-eval", description="Evaluate a model's clean and robust accuracy, its corruption error "
        "or its subnets. The model: exactly one of --checkpoint, --arch with --weights, or --model.",
        epilog=EPILOG)
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a best.pt or last.pt of advews-train, or a directory written by advews-export")
    p.add_argument("--weights-from", choices=WEIGHTS_FROM, help="a checkpoint's weights to evaluate: ema (its "
                   "exponential moving average, the default when it was trained with train.ema_decay) or live")
    p.add_argument("--arch", metavar="NAME", help="zoo architecture to load --weights into (a model trained "
                   "elsewhere; needs --data, and --eps for attacks)")
    p.add_argument("--weights", metavar="FILE", help="a state_dict file for --arch (torch.load weights_only; "
                   "kuangliu, torchvision and TRADES/RobustBench WRN key names are mapped)")
    p.add_argument("--normalization", choices=NORMALIZATION_NAMES, help="input normalization the --weights "
                   "were trained with (default: that of --data dataset:NAME; required with npz data)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="outputs of --arch (default: the --data dataset's classes, else 10)")
    p.add_argument("--model", metavar="MODULE:FUNCTION", help="any model: FUNCTION() of MODULE (importable "
                   "from the current directory) returns an nn.Module taking [0, 1] pixels; needs --data, "
                   "and --eps for attacks")
    p.add_argument("--attack", help=ATTACK_HELP)
    p.add_argument("--eps", type=float, help="perturbation budget (default: the one the checkpoint was trained "
                   "with; required for attacks on --arch/--model)")
    p.add_argument("--steps", type=int, help="attack iterations (default 20 for pgd, else each attack's own: "
                   "cw 50, apgd 100, fab 100, square 5000 queries, mifgsm 10)")
    p.add_argument("--step-size", type=float, help="attack step size (default pgd 2.5 * eps / steps, mifgsm eps / steps)")
    p.add_argument("--norm", choices=NORMS, help="threat model norm (default: the training one)")
    p.add_argument("--restarts", type=int, help="random restarts of pgd, apgd-*, square, fab (default 1)")
    p.add_argument("--n-examples", type=int, help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per batch in every pass: clean, attacks, "
                   "corruptions, subnet analysis (default 256; lower it when the device runs out of memory; "
                   "random starts and BN batch statistics follow the batches, so keep it fixed to compare runs)")
    p.add_argument("--data", metavar="SPEC", help="test data: default the checkpoint dataset's test split "
                   "(required for --arch/--model); npz:FILE for arrays x (N x H x W x C uint8) and y (N ints); "
                   "dataset:NAME[:ROOT] for the test split of a registered dataset (cifar10, mnist5k, ...)")
    p.add_argument("--corruptions", metavar="SPEC", help=f"common-corruption benchmark, one of {CORRUPTION_SPECS}: "
                   "CIFAR-C arrays or ImageNet-C folders in DIR, or corruptions generated from the test data "
                   "(--n-examples of them, cached); prints errors per corruption and severity, JSON under "
                   "'corruptions'")
    p.add_argument("--cache-dir", metavar="DIR", help="cache of generated corruptions (default: "
                   "corruption_cache next to the checkpoint, else in the current directory)")
    p.add_argument("--seed", type=int, help="seed of the attacks' randomness; every attack starts "
                   "from it, so its numbers do not depend on the other attacks run (default 0)")
    p.add_argument("--version", choices=VERSIONS,
                   help="AutoAttack version (default standard: apgd-ce, apgd-t, fab-t, square); fast: apgd-ce and "
                   "apgd-t set up as in standard, for screening only (on AWP's published WRN-34-10 logs fab-t and "
                   "square took ~70%% of the time and changed 0.00 points), reported as not the standard AA")
    p.add_argument("--aa-attacks", metavar="LIST", help="AutoAttack cascade for --version custom, "
                   f"comma-separated from {', '.join(AA_ATTACKS)}")
    p.add_argument("--state", metavar="FILE", help="resume file for every attack: rewritten after every batch "
                   "(AutoAttack: every cascade stage); rerunning the same command skips the work done and gives the "
                   "same flags (refused for other attacks, parameters, seed, model, or data: the content of the "
                   "evaluated examples, whatever path names them; refused when edited, as a content hash guards it). "
                   "One evaluation per file: FILE.lock is held while it runs. Sharded runs keep one file per shard: "
                   "FILE with .shardIofN before its extension")
    p.add_argument("--amp", choices=AMP, help="run the attacks under autocast in bf16 or fp16, re-check every "
                   "adversarial example in fp32 (a point counts as broken only if the fp32 model misclassifies it), "
                   "then attack the points still robust again in fp32 with the same attack; reports the counts "
                   "after each and warns when they differ by more than 0.5 points")
    p.add_argument("--shards", type=int, metavar="N", help="split the examples into N contiguous shards and run one "
                   "(--shard) in this process, e.g. one per array job (needs --state; combine them with --merge). "
                   "Under torchrun --nproc_per_node=N each rank runs one shard and rank 0 writes the result")
    p.add_argument("--shard", type=int, metavar="I", help="the shard this process runs, 0 to N - 1")
    p.add_argument("--fixed-batches", action="store_true", help="flags that do not depend on the number of "
                   "shards: shards are whole batches of --batch-size, every attack reseeds per batch (from --seed "
                   "and the batch's global index) and AutoAttack keeps each batch's points through its cascade "
                   "(pyautoattack re-packs the robust points into full batches, so its numbers depend on the split)")
    p.add_argument("--merge", nargs="+", metavar="STATE", help="combine the --state files of all shards of one "
                   "sharded run into its report, --output and --hdf5 (no model is loaded); refused in one line for shards of "
                   "another evaluation (other data content, model weights or settings) or an edited state file")
    p.add_argument("--perturbations", metavar="SPEC", help=f"flip rates on {PERTURBATION_SPECS}: flip probability "
                   "and top-5 distance per perturbation (Hendrycks & Dietterich's Table 3), JSON under "
                   "'perturbations'; runs alone unless --attack is given")
    p.add_argument("--perturbation-baseline", metavar="FILE", help="the JSON of an earlier --perturbations run "
                   "(e.g. AlexNet's) whose rates normalise these into mFR and mT5D")
    p.add_argument("--hdf5", metavar="FILE", help="write per-example correctness (clean, per attack, per "
                   "AutoAttack stage, worst case) and labels to an HDF5 file (refuses to overwrite)")
    p.add_argument("--device", help="where the model runs: auto (default: cuda when available, else cpu), "
                   "cpu, cuda or cuda:N")
    p.add_argument("--analysis", choices=("subnets",), help="subnets: accuracy of the full net and of "
                   "subnets from each search strategy (adversarial examples computed against the full net), "
                   "and the error with one block thinned at a time; draws the paper's Fig. 1 and Fig. 7 into "
                   "<output stem>_fig1.png and _fig7.png (without --output: subnets_fig1.png and "
                   "subnets_fig7.png next to the checkpoint; PNGs are overwritten)")
    p.add_argument("--audit", action="store_true", help="run every indicator of attack failure (unbounded "
                   "attack, eps sweep, convergence, Square and noise after the white-box attacks, transfer, "
                   "gradients, stochasticity, class count) on --n-examples (default 200) and write the audit "
                   "card: --output (default audit.json next to the checkpoint) and the same stem .md; "
                   "resumable with --state, sharded with --shards/--shard and --merge")
    p.add_argument("--audit-indicators", metavar="LIST", help="the indicators to run (default all: "
                   "stochasticity,classes,gradients,unbounded,monotone,convergence,black_box,noise,transfer)")
    p.add_argument("--audit-sweep", metavar="LIST", help="eps fractions of the monotonicity sweep, strictly "
                   "increasing (default 0,0.25,0.5,1,2)")
    p.add_argument("--best-of", type=int, metavar="K", help="a randomized model's point counts robust only if "
                   "correct in all K passes (default 10)")
    p.add_argument("--eot", type=int, metavar="N", help="gradients averaged per step on a randomized model "
                   "(default 20, as AutoAttack's rand version)")
    p.add_argument("--square-queries", type=int, metavar="N", help="Square's query budget in the audit "
                   "(default 5000, AutoAttack's)")
    p.add_argument("--surrogate", metavar="PATH", help="a checkpoint or export (e.g. the same architecture "
                   "trained without the defense) whose PGD examples the audit transfers")
    p.add_argument("--bpda", metavar="MODULES", help="comma-separated submodules of the model to treat as the "
                   "identity in the backward pass (BPDA) for the audit's transfer indicator")
    p.add_argument("--rho", type=float, help="subnet width for --analysis subnets (default 0.7)")
    p.add_argument("--n-subnets", type=int, help="subnets drawn per strategy (default 50)")
    p.add_argument("--search", help="comma-separated strategies to analyse")
    p.add_argument("--search-updates", type=int,
                   help="controller updates against the frozen model before sampling (default 300)")
    p.add_argument("--search-lr", type=float, help="controller learning rate for the analysis")
    p.add_argument("--search-bn", choices=SEARCH_BN,
                   help="BN mode of the controller's reward during the analysis search (default eval)")
    p.add_argument("--bn-modes", metavar="LIST",
                   help="BN modes subnets are scored in: eval (running statistics, as a deployed net runs: "
                   "the primary numbers, at the JSON's top level and in Fig. 7) and train (batch statistics: "
                   "'bn_train' in the JSON); 'eval' alone halves the scoring time (default eval,train)")
    p.add_argument("--eval-batch-size", type=int, metavar="N", help="rows per forward when subnets are "
                   "scored with BN in eval mode, where it changes only the speed (default --batch-size; "
                   "on 2 CPU cores batches beyond ~256 MNIST digits ran slower, not faster)")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON (refuses to overwrite)")
    p.add_argument("--force", action="store_true", help="allow --output and --hdf5 to overwrite existing files")
    p.set_defaults(**DEFAULTS)  # one source of defaults for the CLI and the Python API
    return p


def _main(args: EvalOptions, command: Optional[str] = None) -> int:
    from advews.api.evaluate import prepare, report_failures, run_evaluation, write_json
    from advews.api.extended import needs_extended, run_extended, run_merge

    if args.audit:
        return _audit(args)
    if args.merge:
        result, failed = run_merge(args)
        print_report(result)
        report_failures(failed + write_json(args.output, result, command))
        return 0
    if args.analysis == "subnets":
        return _analyze(args)
    if needs_extended(args):
        result, failed, main = run_extended(args, None, prepare)
        if not main:
            return 0  # a torchrun rank other than 0: rank 0 reports
    else:
        result, failed = run_evaluation(args)
    print_report(result)
    if "corruptions" in result:
        from advews.evaluation.corruptions import format_table

        print(format_table(result["corruptions"]))
    report_failures(failed + write_json(args.output, result, command))
    return 0


def _audit(args: EvalOptions) -> int:
    """--audit: the indicators' table and verdict, then the card's files."""
    from advews.api.audit import audit_from_options

    card, written = audit_from_options(args)
    if args.shards is not None:
        print(f"audit shard {args.shard} of {args.shards}: counts saved to {written[0]}; combine the shards with "
              "advews-eval --audit --merge")
        return 0
    print(f"audit of {card.get('checkpoint', 'the model')}: {card['n_examples']} examples, clean "
          f"{100 * card['clean_acc']:.2f}%, robust (PGD-{card['settings']['steps']}) {100 * card['robust_acc']:.2f}%")
    for row in card["indicators"]:
        flag = "n/a" if row["flagged"] is None else "FLAG" if row["flagged"] else "pass"
        print(f"  {row['indicator']:<14}{flag:<6}{row['finding']}")
    print(f"verdict: {card['verdict']}")
    for path in written:
        print(f"wrote {path}")
    return 0


def _analyze(args: EvalOptions) -> int:
    """--analysis subnets: the tables, --output, then Fig. 1 and Fig. 7 next to --output (else as
    subnets_fig*.png next to the checkpoint, or in the current directory)."""
    from advews.api.evaluate import report_failures, write_json
    from advews.api.sources import home_dir
    from advews.api.subnets import draw_subnet_figures, figure_failure, run_subnet_analysis

    if args.output:
        stem = os.path.splitext(args.output)[0]
    else:
        stem = os.path.join(home_dir({"checkpoint": args.checkpoint} if args.checkpoint else {}), "subnets")
    result = run_subnet_analysis(args, figures=stem)
    print_subnet_report(args, result)
    failed = write_json(args.output, result)
    try:
        for path in draw_subnet_figures(stem, result):
            print(f"wrote {path}")
    except OSError as error:
        failed.append(figure_failure(error, args.output))
    report_failures(failed)
    return 0


# Entries of an attack that are results, not parameters (--amp's counts: advews.api.extended.extra_lines).
NOT_PARAMS = ("robust_acc", "seconds", "stages", "warnings", "amp", "robust_acc_low_precision",
              "broken_low_precision", "confirmed_fp32", "broken_fp32", "precision_warning",
              "missed_low_precision")


def _format_params(params: Dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ",".join(v) if isinstance(v, list) else str(v)

    return " ".join(f"{k}={show(v)}" for k, v in params.items())


def print_report(result: Dict[str, Any]) -> None:
    """One attack other than autoattack: the classic lines. Otherwise a table with a row per attack,
    per AutoAttack stage, and the per-point worst case over all of them."""
    from advews.api.extended import extra_lines
    from advews.api.sources import describe

    names = list(result["attacks"]) or ["none"]
    print(f"{'checkpoint' if 'checkpoint' in result else 'model':<12}{describe(result)}")
    print(f"{'examples':<12}{result['n_examples']}")
    attacks = result["attacks"]
    if len(names) == 1 and names != ["autoattack"]:
        params = {k: v for k, v in attacks.get(names[0], {}).items() if k not in NOT_PARAMS}
        print(f"{'attack':<12}{names[0]} {_format_params(params)}".rstrip())
        print(f"{'clean acc':<12}{100 * result['clean_acc']:.2f}%")
        if result["robust_acc"] is not None:
            print(f"{'robust acc':<12}{100 * result['robust_acc']:.2f}%")
        _print_lines(extra_lines(result))
        return
    print(f"{'clean acc':<12}{100 * result['clean_acc']:.2f}%")
    width = max([16] + [len(n) + 2 for n in attacks])  # a user's MODULE:CLASS name is long
    print(f"{'attack':<{width}}{'robust acc':>11}  parameters")
    for name, entry in attacks.items():
        params = {k: v for k, v in entry.items() if k not in NOT_PARAMS}
        print(f"{name:<{width}}{100 * entry['robust_acc']:>10.2f}%  {_format_params(params)}")
        for stage in entry.get("stages", []):
            print(f"{'  after ' + stage['attack']:<{width}}{100 * stage['robust_acc']:>10.2f}%")
        for warning in entry.get("warnings", []):
            print(f"  warning: {warning}")
    print(f"{'worst case':<{width}}{100 * result['robust_acc']:>10.2f}%  robust only if every attack above fails")
    _print_lines(extra_lines(result))


def _print_lines(lines: List[str]) -> None:
    for line in lines:
        print(line)


def print_subnet_report(args: EvalOptions, result: Dict[str, Any]) -> None:
    """Per BN mode, the full net's and each strategy's clean and robust accuracy, then the error with
    one block thinned at a time."""
    from advews.api.sources import describe

    print(f"subnet analysis of {describe(result)}, rho {args.rho}, {result['n_examples']} test examples")
    for mode in [m for m in args.bn_modes.split(",") if m]:
        per_mode = result if mode == "eval" else result["bn_train"]
        print(f"{'BN ' + mode:<12}{'clean mean':>11}{'robust mean':>12}{'p10':>8}{'median':>8}{'p90':>8}")
        rows = (["full"] if mode == "eval" else []) + [s for s in args.search.split(",") if s]
        for name in rows:
            c, r = per_mode[name]["clean"], per_mode[name]["robust"]
            print(f"{name:<12}{100 * c['mean']:>10.2f}%{100 * r['mean']:>11.2f}%"
                  f"{100 * r['p10']:>7.1f}%{100 * r['median']:>7.1f}%{100 * r['p90']:>7.1f}%")
    blocks = result["block_vulnerability"]
    kind = "robust" if "robust" in blocks["full"] else "clean"
    print(f"{kind} error with one block thinned (BN eval, {blocks['n_samples']} subnets per block; "
          f"full net {100 * blocks['full'][kind]:.1f}%): " + ", ".join(
              f"{b['name']} {100 * b[kind]['mean']:.1f}%" for b in blocks["blocks"]))


def _once(body: Callable[[], int]) -> Callable[[], int]:
    """``body``, but a refusal every torchrun rank raises alike (``main_rank`` False) is printed by
    rank 0 only; the other ranks exit with its code silently."""
    def run() -> int:
        try:
            return body()
        except AdvewsError as error:
            if getattr(error, "main_rank", True):
                raise
            return getattr(error, "exit_code", 2)
    return run


def main(argv: Optional[List[str]] = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(words)
    command = shlex.join(["advews-eval", *words])  # recorded in --output
    return run_cli("advews-eval", _once(lambda: _main(EvalOptions(**vars(args)), command)))


if __name__ == "__main__":
    sys.exit(main())
