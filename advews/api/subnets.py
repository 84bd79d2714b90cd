"""How weak a model's subnets are (advews-eval --analysis subnets): the accuracy of subnets from each
search strategy and of the full net, the error with one block thinned at a time, and the paper's
Fig. 1 and Fig. 7 drawn from them."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from advews.api.arguments import check_arguments, public
from advews.api.evaluate import ModelArg, prepare, report_failures, split_model, write_json
from advews.api.models import facts
from advews.api.options import EvalOptions, comma_list
from advews.api.sources import TRAIN_ONLY_DATA, dataset_args
from advews.errors import AdvewsError

MAX_BLOCK_SAMPLES = 20  # block-vulnerability samples per block: Fig. 7 needs a mean, not a distribution


def run_subnet_analysis(args: EvalOptions, model: Optional[nn.Module] = None,
                        figures: Optional[str] = None) -> Dict[str, Any]:
    """The analysis advews-eval writes as JSON: the search trains on the validation split of the
    model's dataset (or of --data dataset:NAME), subnets are judged on the test data. ``figures``:
    the stem the figures will be drawn to, checked for writability before anything slow."""
    from advews.data import load_data
    from advews.evaluation.subnet_analysis import analyze_subnets as analyze

    run = prepare(args, model, figures)  # checks the analysis flags too
    start = time.time()
    data_spec = facts(run.model).data_spec
    if data_spec or "checkpoint" in run.info:
        bundle_spec = {k: v for k, v in data_spec.items() if k not in TRAIN_ONLY_DATA}
    else:
        bundle_spec = dataset_args(args.data)
    search_data = load_data(**bundle_spec).val if bundle_spec else None
    if search_data is None:
        raise AdvewsError("--analysis subnets needs the checkpoint's validation split to train the search on")

    def tensors(ds):
        xs, ys = zip(*ds.batches(1024, device=run.device))
        return torch.cat(xs), torch.cat(ys)

    result = analyze(
        run.model, tensors(search_data), tensors(run.data), run.attacks.get(run.names[0]), args.rho,
        n_subnets=args.n_subnets, strategies=[s for s in args.search.split(",") if s],
        search_updates=args.search_updates, search_lr=args.search_lr, search_bn=args.search_bn,
        batch_size=args.batch_size, seed=args.seed, bn_modes=[m for m in args.bn_modes.split(",") if m],
        eval_batch_size=args.eval_batch_size, block_samples=min(args.n_subnets, MAX_BLOCK_SAMPLES),
        show_progress=True,
    )
    result = {**run.info, "attack": run.attack_spec, **run.params.get(run.names[0], {}), **result}
    result["seconds"] = round(time.time() - start, 2)
    return result


def draw_subnet_figures(stem: str, result: Dict[str, Any]) -> List[str]:
    """Fig. 1 (random-subnet boxes, when random was analysed) and Fig. 7 (block vulnerability) as
    <stem>_fig1.png and <stem>_fig7.png; returns the files written."""
    from advews.evaluation.plots import plot_block_vulnerability, plot_subnet_boxes

    if "checkpoint" in result:  # the run directory names the model
        label = os.path.basename(os.path.dirname(os.path.abspath(result["checkpoint"])))
    else:
        label = result.get("arch") or result["model"]
    written = []
    if "random" in result or "random" in result.get("bn_train", {}):
        written.append(f"{stem}_fig1.png")
        plot_subnet_boxes([(label, result)], written[-1])
    written.append(f"{stem}_fig7.png")
    plot_block_vulnerability(result["block_vulnerability"], written[-1])
    return written


def figure_failure(error: OSError, output: Optional[str]) -> str:
    return (f"could not draw the figures ({error.strerror or error}); the numbers are in the report above"
            + (" and in --output" if output else ""))


@public
def analyze_subnets(
    model: ModelArg,
    data: Optional[str] = None,
    attack: str = "pgd",
    eps: Optional[float] = None,
    *,
    steps: Optional[int] = None,
    step_size: Optional[float] = None,
    norm: Optional[str] = None,
    restarts: int = 1,
    rho: float = 0.7,
    n_subnets: int = 50,
    search: Union[str, Sequence[str]] = "random,controller,l1",
    search_updates: int = 300,
    search_lr: float = 3e-3,
    search_bn: str = "eval",
    bn_modes: Union[str, Sequence[str]] = "eval,train",
    eval_batch_size: Optional[int] = None,
    n_examples: Optional[int] = None,
    batch_size: int = 256,
    seed: int = 0,
    output: Optional[str] = None,
    figures: Optional[str] = None,
    force: bool = False,
    device: str = "auto",
) -> Dict[str, Any]:
    """advews-eval --analysis subnets as a function: each argument is the flag of that name (``search``
    and ``bn_modes`` also as lists) and the result is the dict --output would hold. ``model`` as for
    ``evaluate``. Figures are drawn only when ``figures`` names a stem (``runs/x/subnets`` gives
    runs/x/subnets_fig1.png and _fig7.png). Raises AdvewsError with the CLI's one-line message."""
    check_arguments("analyze_subnets", locals())
    checkpoint, module = split_model(model)
    args = EvalOptions(checkpoint=checkpoint, attack=attack, eps=eps, steps=steps, step_size=step_size, norm=norm,
                       restarts=restarts, n_examples=n_examples, batch_size=batch_size, data=data, seed=seed,
                       device=device, analysis="subnets", rho=rho, n_subnets=n_subnets, search=comma_list(search),
                       search_updates=search_updates, search_lr=search_lr, search_bn=search_bn,
                       bn_modes=comma_list(bn_modes), eval_batch_size=eval_batch_size, output=output, force=force)
    result = run_subnet_analysis(args, module, figures)
    failed = write_json(output, result)
    if figures:
        try:
            draw_subnet_figures(figures, result)
        except OSError as error:
            failed.append(figure_failure(error, output))
    report_failures(failed)
    return result
