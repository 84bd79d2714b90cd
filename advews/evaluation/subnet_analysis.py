"""How weak are a model's subnets? Accuracy of the full net and of subnets found by each search.

Adversarial examples are computed once against the FULL net and reused for every subnet, as in the
paper's Fig. 1. The controller is first trained against the frozen model on the search split (the
checkpoint's validation split), then N subnets are drawn from it and evaluated on the test split,
so the search never sees the images it is judged on. Subnets are reported with BN in eval mode
(running statistics, as a deployed net runs: the primary numbers) and in train mode (batch statistics).

Cost (2 CPU threads): most of the time goes to forwards of the same small net, so each subnet's
context is entered once for all its batches, clean and adversarial inputs share forwards when BN is
in eval mode (each example's logits then do not depend on its batch), and a subnet drawn again (l1
draws one subnet N times; a trained controller repeats itself) is scored once: its numbers cannot
differ. Eval-mode batches stay at ``batch_size`` unless asked otherwise: on the CPU batches above
256 MNIST digits ran slower per image (cache misses), not faster.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from advews.attacks import Attack
from advews.errors import AdvewsError
from advews.evaluation.block_vulnerability import block_vulnerability
from advews.evaluation.progress import progress
from advews.evaluation.subnet_scoring import accuracies, accuracy, attacked, summarize  # noqa: F401  (re-exported)
from advews.subnets import ControllerSearch, Subnet, build_search, space_of

STRATEGIES = ("random", "controller", "l1")
BN_MODES = ("eval", "train")


def train_controller(
    model: nn.Module, search: ControllerSearch, x: torch.Tensor, y: torch.Tensor,
    updates: int, batch_size: int, bn: str, seed: int, desc: Optional[str] = None,
) -> List[float]:
    """Train the controller against the frozen model: each update scores its samples on a random batch."""
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in progress(range(updates), desc):
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        xb, yb = x[idx], y[idx]
        stats = search.update(lambda subnets: torch.tensor([accuracy(model, xb, yb, a, bn, batch_size) for a in subnets]))
        history.append(stats["subnet_acc"])
    return history


def subnet_stats(
    model: nn.Module, subnets: Sequence[Subnet], views: Mapping[str, torch.Tensor], y: torch.Tensor,
    bn: str, batch_size: int, desc: Optional[str] = None,
) -> Dict[str, Dict]:
    """``summarize`` of each view's accuracy over ``subnets``; a subnet drawn again is scored once."""
    scores: Dict[Subnet, Dict[str, float]] = {}
    for alpha in progress(subnets, desc):
        key = alpha.canonical()
        if key not in scores:
            scores[key] = accuracies(model, views, y, alpha, bn, batch_size)
    return {k: summarize([scores[a.canonical()][k] for a in subnets]) for k in views}


def analyze_subnets(
    model: nn.Module,
    search_set: Sequence[torch.Tensor],
    test_set: Sequence[torch.Tensor],
    attack: Optional[Attack],
    rho: float,
    n_subnets: int = 50,
    strategies: Sequence[str] = STRATEGIES,
    search_updates: int = 300,
    search_lr: float = 3e-3,
    search_samples: int = 4,
    search_bn: str = "eval",
    batch_size: int = 256,
    seed: int = 0,
    bn_modes: Sequence[str] = BN_MODES,
    eval_batch_size: Optional[int] = None,
    block_samples: int = 0,
    show_progress: bool = False,
) -> Dict:
    """The analysis behind ``advews-eval --analysis subnets``; returns the JSON-ready result.

    ``bn_modes``: the BN modes subnets are scored in (eval at the top level, train under
    ``bn_train``). ``eval_batch_size``: rows per forward with BN in eval mode, where it changes only
    the speed (default ``batch_size``). ``block_samples`` > 0 adds ``block_vulnerability`` (the
    paper's Fig. 7, BN eval mode) with that many subnets per block, on the same adversarial inputs.
    ``show_progress``: a progress bar per stage on a terminal (the analysis can take many minutes).
    """
    bad = [m for m in bn_modes if m not in BN_MODES]
    if bad or not bn_modes:
        raise AdvewsError(f"bad BN modes {list(bn_modes)}; choose one or both of {', '.join(BN_MODES)}")
    eval_batch = eval_batch_size or batch_size
    model.eval()
    space = space_of(model)
    torch.manual_seed(seed)
    xs, ys = search_set
    xt, yt = test_set
    def bar(text: str) -> Optional[str]:
        return text if show_progress else None

    xs_adv = attacked(model, xs, ys, attack, batch_size, bar("attacking the search split"))
    xt_adv = attacked(model, xt, yt, attack, batch_size, bar("attacking the test split"))
    # without an attack the robust numbers are the clean ones: score the inputs once
    views = {"clean": xt} if attack is None else {"clean": xt, "robust": xt_adv}

    def stats(subnets: Sequence[Subnet], bn: str, strategy: str) -> Dict[str, Dict]:
        out = subnet_stats(model, subnets, views, yt, bn, eval_batch if bn == "eval" else batch_size,
                           bar(f"{strategy} subnets, BN {bn}"))
        return {"clean": out["clean"], "robust": out.get("robust", out["clean"])}

    full = accuracies(model, views, yt, None, "eval", eval_batch)
    result: Dict = {"rho": rho, "n_subnets": n_subnets, "n_examples": len(xt), "search_bn": search_bn,
                    "bn_modes": list(bn_modes),
                    "full": {kind: summarize([full.get(kind, full["clean"])]) for kind in ("clean", "robust")}}
    train_bn: Dict = {}
    for strategy in strategies:
        options = {}
        if strategy == "controller":
            options = {"lr": search_lr, "num_samples": search_samples, "leave_one_out": search_samples > 1,
                       "seed": seed}
        elif strategy == "random":
            options = {"seed": seed}
        search = build_search(strategy, space, rho, **options)
        if strategy == "controller":
            history = train_controller(model, search, xs_adv if attack else xs, ys, search_updates,
                                       batch_size, search_bn, seed, bar("controller search"))
            result["controller_search"] = {"updates": search_updates, "lr": search_lr,
                                           "first_acc": history[0] if history else None,
                                           "last_acc": history[-1] if history else None}
        subnets = [search.sample() for _ in range(n_subnets)]
        for bn, target in (("eval", result), ("train", train_bn)):
            if bn in bn_modes:
                target[strategy] = stats(subnets, bn, strategy)
    if "train" in bn_modes:
        result["bn_train"] = train_bn
    if block_samples > 0:
        # imported here: block_vulnerability builds on this module's accuracy()

        result["block_vulnerability"] = block_vulnerability(
            model, xt, yt, xt_adv if attack is not None else None, rho, n_samples=block_samples, bn="eval",
            seed=seed, batch_size=eval_batch, desc=bar("block vulnerability"))
    return result
