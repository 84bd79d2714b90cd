"""Clean and robust accuracy of a model under one or several attacks, and its error under common
corruptions: ``evaluate`` for Python callers, ``prepare`` and ``run_evaluation`` for advews-eval,
which prints the report between the run and writing --output."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from advews.api.arguments import check_arguments, public
from advews.api.checks import autoattack_cascade, check_flags, check_outputs, parse_attacks
from advews.api.eval_state import DiskFullLine, write_result
from advews.api.models import Facts, PathArg, arch_model, checkpoint_model, facts, module_model
from advews.api.options import EvalOptions, comma_list
from advews.api.sources import check_model_source, corruption_cache, load_eval_data
from advews.errors import AdvewsError, DiskFullError
from advews.evaluation.checks import check_eval_data
from advews.evaluation.robust import correct_flags
from advews.evaluation.worst_case import worst_case

ModelArg = Union[PathArg, nn.Module]


@dataclass
class Prepared:
    """Everything checked and loaded: the model on its device, the (subset of the) test data, the
    attacks by name with the parameters the JSON reports, and the entries that name the model."""

    model: nn.Module
    data: Any
    device: torch.device
    attack_spec: str
    names: List[str]
    attacks: Dict[str, Any]
    params: Dict[str, Dict[str, Any]]
    threat: Tuple[Optional[float], Optional[str]]
    info: Dict[str, Any]


def threat_model(args: EvalOptions, known: Facts) -> Tuple[float, str]:
    """eps and norm: the flags, else the ones the checkpoint was trained with."""
    eps = args.eps if args.eps is not None else known.threat_model.get("eps")
    if eps is None and "checkpoint" not in known.source:
        raise AdvewsError("--eps is required to attack a model without --checkpoint (no training threat model); "
                          "or use --attack none")
    if eps is None:
        raise AdvewsError("--eps is required: the checkpoint records no training threat model")
    return eps, args.norm or known.threat_model.get("norm", "Linf")


def make_attack(name: str, args: EvalOptions, eps: float, norm: str, cascade: Optional[List[str]]):
    """The attack called ``name`` and the parameters the JSON reports; autoattack has no Attack object
    (``run_autoattack`` runs it) and is only checked here, before anything slow runs."""
    from advews.attacks import FGSM, PGD
    from advews.attacks.autoattack import check_options
    from advews.attacks.custom import attack_class, build_custom, is_spec
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
    if is_spec(name):  # a user's MODULE:CLASS; fields it lacks (restarts, seed) are not passed
        attack = build_custom(attack_class(name), f"--attack {name!r}", eps=eps, norm=norm, steps=args.steps,
                              step_size=args.step_size, restarts=args.restarts, seed=args.seed)
    else:
        attack = build_zoo_attack(name, eps=eps, norm=norm, steps=args.steps, step_size=args.step_size,
                                  restarts=args.restarts, seed=args.seed)
    return attack, {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack) if f.name != "autocast"}


def prepare(args: EvalOptions, model: Optional[nn.Module] = None, figures: Optional[str] = None) -> Prepared:
    """Check everything that can be refused before anything slow (flags, outputs, the ``figures``
    stem's folder), then load the model (``model``, else the one ``args`` names) and the data."""
    from advews.engine.devices import resolve_device

    given = facts(model) if model is not None else None
    check_flags(args, has_dataset=bool(args.checkpoint or (given and given.data_spec)))
    if model is None:
        check_model_source(args)
    elif args.weights_from:
        raise AdvewsError("weights_from picks a checkpoint's weights; give the checkpoint's path, or "
                          "load_model(path, weights_from=...)")
    attack_spec = args.attack if args.attack is not None else "none" if args.corruptions else "pgd"
    names = parse_attacks(attack_spec)
    cascade = autoattack_cascade(args, names)
    if args.analysis == "subnets" and (args.hdf5 or args.corruptions):
        raise AdvewsError(f"--analysis subnets cannot be combined with {'--hdf5' if args.hdf5 else '--corruptions'}; "
                          "run them separately")
    if args.analysis == "subnets" and (len(names) > 1 or names == ["autoattack"]):
        raise AdvewsError(f"--analysis subnets takes one --attack other than autoattack, got {attack_spec!r}")
    named = given.source if given else {"checkpoint": args.checkpoint} if args.checkpoint else {}
    folders = {}
    home = os.path.dirname(os.path.abspath(figures)) if figures else None
    if home and not (args.output and home == os.path.dirname(os.path.abspath(args.output))):
        folders["figures into"] = home  # next to --output they go where --output was checked to go
    if (args.corruptions or "").startswith("generated"):
        folders["--cache-dir"] = corruption_cache(args.cache_dir, named)
    check_outputs(args, folders)
    device = resolve_device(args.device)
    if model is None and args.checkpoint:
        model = checkpoint_model(args.checkpoint, device, args.weights_from)
    known = facts(model) if model is not None else Facts({}, {}, {}, None)
    attacks: Dict[str, Any] = {}
    params: Dict[str, Dict[str, Any]] = {}
    eps = norm = None
    if names != ["none"]:
        eps, norm = threat_model(args, known)
        for name in names:
            attacks[name], params[name] = make_attack(name, args, eps, norm, cascade)
    data = load_eval_data(args.data, known.data_spec)
    if model is None:
        model = module_model(args.model) if args.model else arch_model(args, data.image_shape[0])
        known = facts(model)
    model = model.to(device)
    where = f"--data {args.data}" if args.data else f"the test split of {known.data_spec.get('dataset')}"
    check_eval_data(model, data, where, image_shape=known.image_shape, device=device)
    if args.n_examples is not None:
        data = data.subset(torch.arange(min(args.n_examples, len(data))))
    torch.manual_seed(args.seed)
    return Prepared(model, data, device, attack_spec, names, attacks, params, (eps, norm), dict(known.source))


def run_evaluation(args: EvalOptions, model: Optional[nn.Module] = None) -> Tuple[Dict[str, Any], List[str]]:
    """The result advews-eval writes as JSON (--output is left to the caller), and a line for each
    file (--hdf5) that had to go to a fallback instead."""
    run = prepare(args, model)
    start = time.time()
    corruptions = run_corruptions(args, run) if args.corruptions else None
    clean, robust, entries, stages = score_attacks(args, run)
    shared: Dict[str, Any] = {}  # one attack keeps its parameters at the top level, as before lists existed
    if len(run.params) == 1:
        shared = run.params[run.names[0]]
    elif run.params:
        shared = {"eps": run.threat[0], "norm": run.threat[1]}
    result = {
        **run.info,
        "attack": run.attack_spec,
        **shared,
        "clean_acc": fraction(clean),
        "robust_acc": fraction(worst_case(robust)) if robust else None,
        "n_examples": len(clean),
        "attacks": entries,
        **({"corruptions": corruptions} if corruptions else {}),
        "seconds": round(time.time() - start, 2),
    }
    failed: List[str] = []
    if args.hdf5:
        from advews.evaluation.per_example import save_per_example

        labels = torch.cat([y for _, y in run.data.batches(args.batch_size)])
        attrs = {"seed": args.seed, **run.info, **{k: result[k] for k in ("attack", "n_examples")}}
        result["hdf5"], failure = write_result(args.hdf5, "--hdf5", lambda path: save_per_example(
            path, labels=labels, clean=clean, robust=robust, params=run.params, stages=stages, attrs=attrs))
        failed += [failure] if failure else []
    return result, failed


def run_corruptions(args: EvalOptions, run: Prepared) -> Dict[str, Any]:
    """The --corruptions benchmark; generated ones are made from the test data (its first
    --n-examples) and cached. Run before the attacks, so a bad spec fails before anything slow."""
    from advews.evaluation.corruptions import run_corruption_benchmark

    return run_corruption_benchmark(run.model, args.corruptions, default_dataset=run.data,
                                    cache_dir=corruption_cache(args.cache_dir, run.info), batch_size=args.batch_size,
                                    device=run.device, n_examples=args.n_examples, seed=args.seed)


def score_attacks(
    args: EvalOptions, run: Prepared,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Dict[str, Dict[str, Any]], Dict[str, Dict[str, torch.Tensor]]]:
    """Per-example clean and per-attack robust flags, the JSON entry of each attack, and the per-stage
    flags of cascades. Each attack starts from ``--seed``, so its numbers do not depend on the others.
    Each entry also holds the attack's ``forward_passes`` and ``backward_passes`` through the model
    per example (its final predictions included) and its ``flops`` (``engine.ledger.AttackCost``)."""
    from advews.engine.ledger import AttackCost

    clean = correct_flags(run.model, run.data, batch_size=args.batch_size, device=run.device, desc="clean")
    robust: Dict[str, torch.Tensor] = {}
    entries: Dict[str, Dict[str, Any]] = {}
    stages: Dict[str, Dict[str, torch.Tensor]] = {}
    cost = AttackCost(run.model, next(iter(run.data.batches(1, device=run.device)))[0]) if run.attacks else None
    for name, attack in run.attacks.items():
        torch.manual_seed(args.seed)
        start = time.time()
        extra: Dict[str, Any] = {}
        with cost.count(extra, len(clean)):
            if name == "autoattack":
                res = run_autoattack_on(args, run, run.params[name])
                robust[name], stages[name] = res["robust"], res["stage_robust"]
                extra.update(stages=res["stages"], warnings=res["warnings"])
            else:
                robust[name] = correct_flags(run.model, run.data, attack, batch_size=args.batch_size,
                                             device=run.device, desc=name)
        entries[name] = {"robust_acc": fraction(robust[name]), **run.params[name], **extra,
                         "seconds": round(time.time() - start, 2)}
    return clean, robust, entries, stages


def run_autoattack_on(args: EvalOptions, run: Prepared, params: Dict[str, Any]) -> Dict[str, Any]:
    """The reference AutoAttack on the whole evaluation set (held on the CPU; batches go to the model's
    device), progress and sanity-check warnings on stderr."""
    from advews.attacks.autoattack import run_autoattack

    xs, ys = zip(*run.data.batches(args.batch_size))
    return run_autoattack(
        run.model, torch.cat(xs), torch.cat(ys), eps=params["eps"], norm=params["norm"], version=args.version,
        attacks=params.get("aa_attacks"), seed=args.seed, batch_size=args.batch_size, state_path=args.state,
        log=lambda line: print(f"autoattack: {line}", file=sys.stderr, flush=True),
    )


def fraction(flags: torch.Tensor) -> float:
    return int(flags.sum()) / max(len(flags), 1)


def write_json(path: Optional[str], result: Dict[str, Any], command: Optional[str] = None) -> List[str]:
    """Write --output (if given) atomically, with the ``command`` line that produced it when given (an
    export's model card cites it); a failure writes a fallback file and returns the line saying where."""
    if not path:
        return []

    def write(target: str) -> None:
        with open(target, "w") as f:
            json.dump({**result, "command": command} if command else result, f, indent=2)

    _, failure = write_result(path, "--output", write)
    return [failure] if failure else []


def report_failures(failed: List[str]) -> None:
    """Refuse (one line) when a result had to go to a fallback file; exit 4 when the disk was full."""
    if failed:
        raise (DiskFullError if any(isinstance(f, DiskFullLine) for f in failed) else AdvewsError)("; ".join(failed))


def split_model(model: ModelArg) -> Tuple[Optional[str], Optional[nn.Module]]:
    """A path (checkpoint or export) or a module: the --checkpoint flag, or the model itself."""
    return (None, model) if isinstance(model, nn.Module) else (os.fspath(model), None)


@public
def evaluate(
    model: ModelArg,
    data: Optional[str] = None,
    attacks: Union[str, Sequence[str], None] = None,
    eps: Optional[float] = None,
    *,
    steps: Optional[int] = None,
    step_size: Optional[float] = None,
    norm: Optional[str] = None,
    restarts: int = 1,
    n_examples: Optional[int] = None,
    batch_size: int = 256,
    seed: int = 0,
    version: str = "standard",
    aa_attacks: Union[str, Sequence[str], None] = None,
    state: Optional[str] = None,
    corruptions: Optional[str] = None,
    cache_dir: Optional[str] = None,
    hdf5: Optional[str] = None,
    output: Optional[str] = None,
    force: bool = False,
    device: str = "auto",
    weights_from: Optional[str] = None,
    amp: Optional[str] = None,
    perturbations: Optional[str] = None,
    perturbation_baseline: Optional[str] = None,
    fixed_batches: bool = False,
) -> Dict[str, Any]:
    """advews-eval as a function: each argument is the flag of that name (``attacks`` is --attack,
    a list or a comma-separated string; default pgd, none when ``corruptions`` is given) and the
    result is the dict --output would hold. ``model``: a checkpoint or export path, or an nn.Module
    taking [0, 1] pixels (from ``load_model``, whose training eps, norm and dataset are the defaults),
    moved to ``device``; ``weights_from``: a checkpoint's 'ema' or 'live' weights. Raises AdvewsError
    with the CLI's one-line message, also when --output or --hdf5 had to go to a fallback file (the
    message names it). Under torchrun each rank evaluates its shard and every rank returns the merged
    result (rank 0 writes the files)."""
    check_arguments("evaluate", locals())
    checkpoint, module = split_model(model)
    args = EvalOptions(checkpoint=checkpoint, attack=comma_list(attacks), eps=eps, steps=steps, step_size=step_size,
                       norm=norm, restarts=restarts, n_examples=n_examples, batch_size=batch_size, data=data,
                       corruptions=corruptions, cache_dir=cache_dir, seed=seed, version=version,
                       aa_attacks=comma_list(aa_attacks), state=state, hdf5=hdf5, device=device, output=output,
                       force=force, weights_from=weights_from, amp=amp, perturbations=perturbations,
                       perturbation_baseline=perturbation_baseline, fixed_batches=fixed_batches)
    from advews.api.extended import needs_extended, run_extended

    if needs_extended(args):  # --state, --amp, --perturbations, or a torchrun rank
        result, failed, main = run_extended(args, module, prepare)
        report_failures(failed + (write_json(output, result) if main else []))
        return result
    result, failed = run_evaluation(args, module)
    report_failures(failed + write_json(output, result))
    return result
