"""advews-eval: clean and robust accuracy of a model under one or several attacks, its error under
common corruptions, and how weak its subnets are. The model is an advews-train checkpoint, a zoo
architecture holding a public state_dict, or any ``module:function`` returning an nn.Module."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from advews.attacks.autoattack import AA_ATTACKS, VERSIONS
from advews.cli.common import run_cli
from advews.cli.eval_checks import (
    OneLineParser,
    autoattack_cascade,
    check_checkpoint,
    check_flags,
    check_outputs,
    checkpoint_image_shape,
    parse_attacks,
    write_or_fallback,
)
from advews.cli.eval_sources import (
    check_model_source,
    corruption_cache,
    describe,
    home_dir,
    load_eval_data,
    load_model,
)
from advews.cli.eval_subnets import draw_subnet_figures, run_subnet_analysis
from advews.errors import AdvewsError
from advews.evaluation.checks import check_eval_data
from advews.evaluation.corruptions import SPEC_FORMS
from advews.evaluation.robust import correct_flags
from advews.evaluation.worst_case import worst_case
from advews.models.external import NORMALIZATIONS

ATTACK_HELP = (
    "comma-separated attacks, each reported alone and all together as the per-point worst case (a point "
    "is robust only if it survives every attack): pgd, fgsm (advews); cw (Carlini-Wagner L2, projected "
    "onto the eps-ball), apgd-ce, apgd-dlr, square (steps = queries), fab, mifgsm (torchattacks); "
    "autoattack (the reference AutoAttack via pyautoattack; torchattacks' own AutoAttack differs from it "
    "and is not offered); none: clean accuracy only. Default pgd, but none when --corruptions is given "
    "(name attacks explicitly to run both)"
)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="advews-eval", description="Evaluate a model's clean and robust accuracy, its corruption error "
        "or its subnets. The model: exactly one of --checkpoint, --arch with --weights, or --model.")
    p.add_argument("--checkpoint", metavar="PATH", help="a best.pt or last.pt of advews-train")
    p.add_argument("--arch", metavar="NAME", help="zoo architecture to load --weights into (a model trained "
                   "elsewhere; needs --data, and --eps for attacks)")
    p.add_argument("--weights", metavar="FILE", help="a state_dict file for --arch (torch.load weights_only; "
                   "kuangliu, torchvision and TRADES/RobustBench WRN key names are mapped)")
    p.add_argument("--normalization", choices=tuple(NORMALIZATIONS), help="input normalization the --weights "
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
    p.add_argument("--norm", choices=("Linf", "L2"), help="threat model norm (default: the training one)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts of pgd, apgd-*, square, fab (default 1)")
    p.add_argument("--n-examples", type=int, help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", metavar="SPEC", help="test data: default the checkpoint dataset's test split "
                   "(required for --arch/--model); npz:FILE for arrays x (N x H x W x C uint8) and y (N ints); "
                   "dataset:NAME[:ROOT] for the test split of a registered dataset (cifar10, mnist5k, ...)")
    p.add_argument("--corruptions", metavar="SPEC", help=f"common-corruption benchmark, one of {SPEC_FORMS}: "
                   "CIFAR-C arrays or ImageNet-C folders in DIR, or corruptions generated from the test data "
                   "(--n-examples of them, cached); prints errors per corruption and severity, JSON under "
                   "'corruptions'")
    p.add_argument("--cache-dir", metavar="DIR", help="cache of generated corruptions (default: "
                   "corruption_cache next to the checkpoint, else in the current directory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' randomness; every attack starts "
                   "from it, so its numbers do not depend on the other attacks run (default 0)")
    p.add_argument("--version", choices=VERSIONS, default="standard",
                   help="AutoAttack version (default standard: apgd-ce, apgd-t, fab-t, square)")
    p.add_argument("--aa-attacks", metavar="LIST", help="AutoAttack cascade for --version custom, "
                   f"comma-separated from {', '.join(AA_ATTACKS)}")
    p.add_argument("--state", metavar="FILE", help="AutoAttack resume file: rewritten after every cascade "
                   "stage; rerunning with it skips the stages done (refused for another eps, norm, "
                   "version, seed, data or model)")
    p.add_argument("--hdf5", metavar="FILE", help="write per-example correctness (clean, per attack, per "
                   "AutoAttack stage, worst case) and labels to an HDF5 file (refuses to overwrite)")
    p.add_argument("--device", default="auto")
    p.add_argument("--analysis", choices=("subnets",), help="subnets: accuracy of the full net and of "
                   "subnets from each search strategy (adversarial examples computed against the full net), "
                   "and the error with one block thinned at a time; draws the paper's Fig. 1 and Fig. 7 into "
                   "<output stem>_fig1.png and _fig7.png (without --output: subnets_fig1.png and "
                   "subnets_fig7.png next to the checkpoint; PNGs are overwritten)")
    p.add_argument("--rho", type=float, default=0.7, help="subnet width for --analysis subnets (default 0.7)")
    p.add_argument("--n-subnets", type=int, default=50, help="subnets drawn per strategy (default 50)")
    p.add_argument("--search", default="random,controller,l1", help="comma-separated strategies to analyse")
    p.add_argument("--search-updates", type=int, default=300,
                   help="controller updates against the frozen model before sampling (default 300)")
    p.add_argument("--search-lr", type=float, default=3e-3, help="controller learning rate for the analysis")
    p.add_argument("--search-bn", choices=("eval", "train"), default="eval",
                   help="BN mode of the controller's reward during the analysis search (default eval)")
    p.add_argument("--bn-modes", default="eval,train", metavar="LIST",
                   help="BN modes subnets are scored in: eval (running statistics, as a deployed net runs: "
                   "the primary numbers, at the JSON's top level and in Fig. 7) and train (batch statistics: "
                   "'bn_train' in the JSON); 'eval' alone halves the scoring time (default eval,train)")
    p.add_argument("--eval-batch-size", type=int, metavar="N", help="rows per forward when subnets are "
                   "scored with BN in eval mode, where it changes only the speed (default --batch-size; "
                   "on 2 CPU cores batches beyond ~256 MNIST digits ran slower, not faster)")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON (refuses to overwrite)")
    p.add_argument("--force", action="store_true", help="allow --output and --hdf5 to overwrite existing files")
    return p


def threat_model(args: argparse.Namespace, threat: Dict[str, Any]) -> Tuple[float, str]:
    """eps and norm: the flags, else the ones the checkpoint was trained with."""
    eps = args.eps if args.eps is not None else threat.get("eps")
    if eps is None and not args.checkpoint:
        raise AdvewsError("--eps is required to attack a model without --checkpoint (no training threat model); "
                          "or use --attack none")
    if eps is None:
        raise AdvewsError("--eps is required: the checkpoint records no training threat model")
    return eps, args.norm or threat.get("norm", "Linf")


def make_attack(name: str, args: argparse.Namespace, eps: float, norm: str, cascade: Optional[List[str]]):
    """The attack called ``name`` and the parameters the JSON reports; autoattack has no Attack object
    (``run_autoattack`` runs it) and is only checked here, before anything slow runs."""
    from advews.attacks import FGSM, PGD
    from advews.attacks.autoattack import check_options
    from advews.attacks.zoo import build_zoo_attack

    if name == "fgsm":
        return FGSM(eps=eps, norm=norm), {"eps": eps, "norm": norm}
    if name == "pgd":
        steps = args.steps if args.steps is not None else 20
        step_size = args.step_size if args.step_size is not None else 2.5 * eps / max(steps, 1)
        params = {"eps": eps, "norm": norm, "steps": steps, "step_size": step_size, "restarts": args.restarts}
        return PGD(**params), params
    if name == "autoattack":
        check_options(eps=eps, norm=norm, version=args.version, attacks=cascade)
        params = {"eps": eps, "norm": norm, "version": args.version, "seed": args.seed}
        return None, ({**params, "aa_attacks": cascade} if cascade else params)
    attack = build_zoo_attack(name, eps=eps, norm=norm, steps=args.steps, step_size=args.step_size,
                              restarts=args.restarts, seed=args.seed)
    return attack, {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack) if f.name != "autocast"}


def _main(args: argparse.Namespace) -> int:
    from advews.engine.checkpoint import load_checkpoint
    from advews.engine.trainer import resolve_device

    check_flags(args)  # everything below that can be refused is refused before anything slow
    check_model_source(args)
    attack_spec = args.attack if args.attack is not None else "none" if args.corruptions else "pgd"
    names = parse_attacks(attack_spec)
    cascade = autoattack_cascade(args, names)
    if args.analysis == "subnets" and (args.hdf5 or args.corruptions):
        raise AdvewsError(f"--analysis subnets cannot be combined with {'--hdf5' if args.hdf5 else '--corruptions'}; "
                          "run them separately")
    if args.analysis == "subnets" and (len(names) > 1 or names == ["autoattack"]):
        raise AdvewsError(f"--analysis subnets takes one --attack other than autoattack, got {attack_spec!r}")
    folders = {"figures into": home_dir(args)} if args.analysis == "subnets" and not args.output else {}
    if (args.corruptions or "").startswith("generated"):
        folders["--cache-dir"] = corruption_cache(args)
    check_outputs(args, folders)
    device = resolve_device(args.device)
    state: Dict[str, Any] = {}
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint, map_location=device)
        check_checkpoint(args.checkpoint, state)
    attacks: Dict[str, Any] = {}
    params: Dict[str, Dict[str, Any]] = {}
    if names != ["none"]:
        eps, norm = threat_model(args, state.get("threat_model") or {})
        for name in names:
            attacks[name], params[name] = make_attack(name, args, eps, norm, cascade)
    data = load_eval_data(args.data, state.get("data_spec", {}))
    model, info = load_model(args, state, data)
    model = model.to(device)
    where = f"--data {args.data}" if args.data else f"the test split of {state['data_spec'].get('dataset')}"
    check_eval_data(model, data, where, image_shape=checkpoint_image_shape(state) if state else None,
                    device=device)
    if args.n_examples is not None:
        data = data.subset(torch.arange(min(args.n_examples, len(data))))
    torch.manual_seed(args.seed)
    start = time.time()
    if args.analysis == "subnets":
        result = run_subnet_analysis(args, model, data, attacks.get(names[0]), params.get(names[0], {}),
                                     state, info, attack_spec, device)
        result["seconds"] = round(time.time() - start, 2)
        failed = write_json(args, result)
        try:
            for path in draw_subnet_figures(args, result, info):
                print(f"wrote {path}")
        except OSError as error:
            failed.append(f"could not draw the figures ({error.strerror or error}); the numbers are in the report "
                          "above" + (" and in --output" if args.output else ""))
        return report_failures(failed)
    corruptions = run_corruptions(args, model, data, device) if args.corruptions else None
    clean, robust, entries, stages = evaluate(args, model, data, attacks, params, device)
    shared: Dict[str, Any] = {}  # one attack keeps its parameters at the top level, as before lists existed
    if len(params) == 1:
        shared = params[names[0]]
    elif params:
        shared = {"eps": eps, "norm": norm}
    result = {
        **info,
        "attack": attack_spec,
        **shared,
        "clean_acc": _fraction(clean),
        "robust_acc": _fraction(worst_case(robust)) if robust else None,
        "n_examples": len(clean),
        "attacks": entries,
        **({"corruptions": corruptions} if corruptions else {}),
        "seconds": round(time.time() - start, 2),
    }
    failed: List[str] = []
    if args.hdf5:
        from advews.evaluation.per_example import save_per_example

        labels = torch.cat([y for _, y in data.batches(args.batch_size)])
        attrs = {"seed": args.seed, **info, **{k: result[k] for k in ("attack", "n_examples")}}
        result["hdf5"], failure = write_or_fallback(args.hdf5, "--hdf5", lambda path: save_per_example(
            path, labels=labels, clean=clean, robust=robust, params=params, stages=stages, attrs=attrs))
        failed += [failure] if failure else []
    print_report(result, names, info)
    if corruptions:
        from advews.evaluation.corruptions import format_table

        print(format_table(corruptions))
    return report_failures(failed + write_json(args, result))


def run_corruptions(
    args: argparse.Namespace, model: torch.nn.Module, data: Any, device: torch.device,
) -> Dict[str, Any]:
    """The --corruptions benchmark; generated ones are made from ``data`` (the first --n-examples of the
    test split) and cached. Run before the attacks, so a bad spec fails before anything slow."""
    from advews.evaluation.corruptions import run_corruption_benchmark

    return run_corruption_benchmark(model, args.corruptions, default_dataset=data, cache_dir=corruption_cache(args),
                                    batch_size=args.batch_size, device=device, n_examples=args.n_examples,
                                    seed=args.seed)


def evaluate(
    args: argparse.Namespace,
    model: torch.nn.Module,
    data: Any,
    attacks: Dict[str, Any],
    params: Dict[str, Dict[str, Any]],
    device: torch.device,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, Dict[str, Any]], Dict[str, Dict[str, torch.Tensor]]]:
    """Per-example clean and per-attack robust flags, the JSON entry of each attack, and the per-stage
    flags of cascades. Each attack starts from ``--seed``, so its numbers do not depend on the others."""
    clean = correct_flags(model, data, batch_size=args.batch_size, device=device, desc="clean")
    robust: Dict[str, torch.Tensor] = {}
    entries: Dict[str, Dict[str, Any]] = {}
    stages: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, attack in attacks.items():
        torch.manual_seed(args.seed)
        start = time.time()
        extra: Dict[str, Any] = {}
        if name == "autoattack":
            res = run_autoattack_on(args, model, data, params[name])
            robust[name], stages[name] = res["robust"], res["stage_robust"]
            extra = {"stages": res["stages"], "warnings": res["warnings"]}
        else:
            robust[name] = correct_flags(model, data, attack, batch_size=args.batch_size, device=device,
                                         desc=name)
        entries[name] = {"robust_acc": _fraction(robust[name]), **params[name], **extra,
                         "seconds": round(time.time() - start, 2)}
    return clean, robust, entries, stages


def run_autoattack_on(args: argparse.Namespace, model: torch.nn.Module, data: Any, params: Dict[str, Any]) -> Dict[str, Any]:
    """The reference AutoAttack on the whole evaluation set (held on the CPU; batches go to the model's
    device), progress and sanity-check warnings on stderr."""
    from advews.attacks.autoattack import run_autoattack

    xs, ys = zip(*data.batches(args.batch_size))
    return run_autoattack(
        model, torch.cat(xs), torch.cat(ys), eps=params["eps"], norm=params["norm"], version=args.version,
        attacks=params.get("aa_attacks"), seed=args.seed, batch_size=args.batch_size, state_path=args.state,
        log=lambda line: print(f"autoattack: {line}", file=sys.stderr, flush=True),
    )


def _fraction(flags: torch.Tensor) -> float:
    return int(flags.sum()) / max(len(flags), 1)


def _format_params(params: Dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ",".join(v) if isinstance(v, list) else str(v)

    return " ".join(f"{k}={show(v)}" for k, v in params.items())


def print_report(result: Dict[str, Any], names: List[str], info: Dict[str, Any]) -> None:
    """One attack other than autoattack: the classic lines. Otherwise a table with a row per attack,
    per AutoAttack stage, and the per-point worst case over all of them."""
    print(f"{'checkpoint' if 'checkpoint' in info else 'model':<12}{describe(info)}")
    print(f"{'examples':<12}{result['n_examples']}")
    attacks = result["attacks"]
    if len(names) == 1 and names != ["autoattack"]:
        params = {k: v for k, v in attacks.get(names[0], {}).items() if k not in ("robust_acc", "seconds")}
        print(f"{'attack':<12}{names[0]} {_format_params(params)}".rstrip())
        print(f"{'clean acc':<12}{100 * result['clean_acc']:.2f}%")
        if result["robust_acc"] is not None:
            print(f"{'robust acc':<12}{100 * result['robust_acc']:.2f}%")
        return
    print(f"{'clean acc':<12}{100 * result['clean_acc']:.2f}%")
    print(f"{'attack':<16}{'robust acc':>11}  parameters")
    for name, entry in attacks.items():
        params = {k: v for k, v in entry.items() if k not in ("robust_acc", "seconds", "stages", "warnings")}
        print(f"{name:<16}{100 * entry['robust_acc']:>10.2f}%  {_format_params(params)}")
        for stage in entry.get("stages", []):
            print(f"{'  after ' + stage['attack']:<16}{100 * stage['robust_acc']:>10.2f}%")
        for warning in entry.get("warnings", []):
            print(f"  warning: {warning}")
    print(f"{'worst case':<16}{100 * result['robust_acc']:>10.2f}%  robust only if every attack above fails")


def write_json(args: argparse.Namespace, result: Dict[str, Any]) -> List[str]:
    """Write --output (if given); a failure writes a fallback file and returns the line saying where."""
    if not args.output:
        return []

    def write(path: str) -> None:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

    _, failure = write_or_fallback(args.output, "--output", write)
    return [failure] if failure else []


def report_failures(failed: List[str]) -> int:
    """Exit 0, or refuse (one line) when a result had to go to a fallback file."""
    if failed:
        raise AdvewsError("; ".join(failed))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-eval", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
