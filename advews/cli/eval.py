"""advews-eval: clean and robust accuracy of a trained checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from advews.attacks.autoattack import AA_ATTACKS, VERSIONS
from advews.attacks.zoo import ZOO
from advews.cli.common import run_cli
from advews.errors import AdvewsError

NATIVE = ("pgd", "fgsm")
ATTACKS = NATIVE + tuple(ZOO) + ("autoattack", "none")

ATTACK_HELP = (
    "comma-separated attacks, each reported alone and all together as the per-point worst case (a point "
    "is robust only if it survives every attack): pgd, fgsm (advews); cw (Carlini-Wagner L2, projected "
    "onto the eps-ball), apgd-ce, apgd-dlr, square (steps = queries), fab, mifgsm (torchattacks); "
    "autoattack (the reference AutoAttack via pyautoattack; torchattacks' own AutoAttack differs from it "
    "and is not offered); none: clean accuracy only (default pgd)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advews-eval", description="Evaluate a checkpoint's clean and robust accuracy.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a best.pt or last.pt of advews-train")
    p.add_argument("--attack", default="pgd", help=ATTACK_HELP)
    p.add_argument("--eps", type=float, help="perturbation budget (default: the one the checkpoint was trained with)")
    p.add_argument("--steps", type=int, help="attack iterations (default 20 for pgd, else each attack's own: "
                   "cw 50, apgd 100, fab 100, square 5000 queries, mifgsm 10)")
    p.add_argument("--step-size", type=float, help="attack step size (default pgd 2.5 * eps / steps, mifgsm eps / steps)")
    p.add_argument("--norm", choices=("Linf", "L2"), help="threat model norm (default: the training one)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts of pgd, apgd-*, square, fab (default 1)")
    p.add_argument("--n-examples", type=int, help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", metavar="SPEC", help="test data: default the checkpoint dataset's test split; "
                   "npz:FILE for arrays x (N x H x W x C uint8) and y (N ints)")
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
                   "subnets from each search strategy (adversarial examples computed against the full net)")
    p.add_argument("--rho", type=float, default=0.7, help="subnet width for --analysis subnets (default 0.7)")
    p.add_argument("--n-subnets", type=int, default=50, help="subnets drawn per strategy (default 50)")
    p.add_argument("--search", default="random,controller,l1", help="comma-separated strategies to analyse")
    p.add_argument("--search-updates", type=int, default=300,
                   help="controller updates against the frozen model before sampling (default 300)")
    p.add_argument("--search-lr", type=float, default=3e-3, help="controller learning rate for the analysis")
    p.add_argument("--search-bn", choices=("eval", "train"), default="eval",
                   help="BN mode of the controller's reward during the analysis search (default eval)")
    p.add_argument("--output", metavar="FILE", help="write the results as JSON (refuses to overwrite)")
    p.add_argument("--force", action="store_true", help="allow --output and --hdf5 to overwrite existing files")
    return p


def load_npz(path: str):
    from advews.data import ArrayDataset

    if not os.path.isfile(path):
        raise AdvewsError(f"--data npz file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f or "y" not in f:
            raise AdvewsError(f"{path} must hold arrays 'x' and 'y', found {', '.join(f.files) or 'none'}")
        x, y = f["x"], f["y"]
    if x.dtype != np.uint8 or x.ndim != 4:
        raise AdvewsError(f"{path}: x must be N x H x W x C uint8, got {x.dtype} with shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise AdvewsError(f"{path}: y must be {len(x)} integers, got {y.dtype} with shape {y.shape}")
    return ArrayDataset(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64)))


def load_eval_data(spec: Optional[str], data_spec: Dict[str, Any]):
    if spec is None:
        from advews.data import load_data

        kwargs = {k: v for k, v in data_spec.items() if k not in ("train_limit",)}
        return load_data(**kwargs).test
    if spec.startswith("npz:"):
        return load_npz(spec[4:])
    raise AdvewsError(f"bad --data {spec!r}; use npz:FILE or leave it out for the checkpoint's test split")


def make_attack(args: argparse.Namespace, threat: Dict[str, Any]):
    from advews.attacks import FGSM, PGD

    if args.attack not in ATTACKS:
        raise AdvewsError(f"unknown --attack {args.attack!r}; choose one of {', '.join(ATTACKS)}")
    if args.attack == "none":
        return None, {}
    eps = args.eps if args.eps is not None else threat.get("eps")
    if eps is None:
        raise AdvewsError("--eps is required: the checkpoint records no training threat model")
    norm = args.norm or threat.get("norm", "Linf")
    if args.attack == "fgsm":
        return FGSM(eps=eps, norm=norm), {"eps": eps, "norm": norm}
    step_size = args.step_size if args.step_size is not None else 2.5 * eps / max(args.steps, 1)
    params = {"eps": eps, "norm": norm, "steps": args.steps, "step_size": step_size, "restarts": args.restarts}
    return PGD(**params), params


def _main(args: argparse.Namespace) -> int:
    from advews.engine.checkpoint import load_checkpoint
    from advews.engine.trainer import resolve_device
    from advews.evaluation.robust import robust_accuracy
    from advews.models import build_model

    if args.output and os.path.exists(args.output) and not args.force:
        raise AdvewsError(f"{args.output} exists; choose another --output or pass --force")
    if args.n_examples is not None and args.n_examples < 1:
        raise AdvewsError(f"--n-examples must be >= 1, got {args.n_examples}")
    if args.batch_size < 1:
        raise AdvewsError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint, map_location=device)
    if "model_spec" not in state:
        raise AdvewsError(f"{args.checkpoint} is not an advews checkpoint (no model_spec)")
    attack, params = make_attack(args, state.get("threat_model") or {})
    model = build_model(state["model_spec"]).to(device)
    model.load_state_dict(state["model"])
    data = load_eval_data(args.data, state.get("data_spec", {}))
    if args.n_examples is not None:
        data = data.subset(torch.arange(min(args.n_examples, len(data))))
    torch.manual_seed(args.seed)
    start = time.time()
    if args.analysis == "subnets":
        result = run_subnet_analysis(args, model, data, attack, params, state, device)
        result["seconds"] = round(time.time() - start, 2)
        write_json(args, result)
        return 0
    res = robust_accuracy(model, data, attack, args.batch_size, device)
    result = {
        "checkpoint": args.checkpoint,
        "epoch": state.get("epoch"),
        "attack": args.attack,
        **params,
        "clean_acc": res["clean_acc"],
        "robust_acc": res.get("robust_acc"),
        "n_examples": res["n_examples"],
        "seconds": round(time.time() - start, 2),
    }
    print(f"{'checkpoint':<12}{args.checkpoint} (epoch {state.get('epoch')})")
    print(f"{'examples':<12}{result['n_examples']}")
    print(f"{'attack':<12}{args.attack} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in params.items()))
    print(f"{'clean acc':<12}{100 * result['clean_acc']:.2f}%")
    if result["robust_acc"] is not None:
        print(f"{'robust acc':<12}{100 * result['robust_acc']:.2f}%")
    write_json(args, result)
    return 0


def write_json(args: argparse.Namespace, result: Dict[str, Any]) -> None:
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


def run_subnet_analysis(args, model, test, attack, params, state, device) -> Dict[str, Any]:
    from advews.data import load_data
    from advews.evaluation.subnet_analysis import STRATEGIES, analyze_subnets

    strategies = [s for s in args.search.split(",") if s]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise AdvewsError(f"bad --search {args.search!r}; use a comma-separated list of {', '.join(STRATEGIES)}")
    if not 0 < args.rho <= 1:
        raise AdvewsError(f"--rho must be in (0, 1], got {args.rho}")
    if args.n_subnets < 1:
        raise AdvewsError(f"--n-subnets must be >= 1, got {args.n_subnets}")
    if args.search_updates < 0:
        raise AdvewsError(f"--search-updates must be >= 0, got {args.search_updates}")
    bundle_spec = {k: v for k, v in state.get("data_spec", {}).items() if k != "train_limit"}
    search_data = load_data(**bundle_spec).val if bundle_spec else None
    if search_data is None:
        raise AdvewsError("--analysis subnets needs the checkpoint's validation split to train the search on")

    def tensors(ds):
        xs, ys = zip(*ds.batches(1024, device=device))
        return torch.cat(xs), torch.cat(ys)

    result = analyze_subnets(
        model, tensors(search_data), tensors(test), attack, args.rho, n_subnets=args.n_subnets,
        strategies=strategies, search_updates=args.search_updates, search_lr=args.search_lr,
        search_bn=args.search_bn, batch_size=args.batch_size, seed=args.seed,
    )
    result = {"checkpoint": args.checkpoint, "epoch": state.get("epoch"), "attack": args.attack, **params, **result}
    print(f"subnet analysis of {args.checkpoint} (epoch {state.get('epoch')}), rho {args.rho}, "
          f"{result['n_examples']} test examples, BN eval mode")
    print(f"{'':<12}{'clean mean':>11}{'robust mean':>12}{'p10':>8}{'median':>8}{'p90':>8}")
    for name in ["full"] + strategies:
        c, r = result[name]["clean"], result[name]["robust"]
        print(f"{name:<12}{100 * c['mean']:>10.2f}%{100 * r['mean']:>11.2f}%"
              f"{100 * r['p10']:>7.1f}%{100 * r['median']:>7.1f}%{100 * r['p90']:>7.1f}%")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-eval", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
