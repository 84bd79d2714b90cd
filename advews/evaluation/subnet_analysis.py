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

import contextlib
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from advews.attacks import Attack
from advews.errors import AdvewsError
from advews.evaluation.progress import progress
from advews.subnets import ControllerSearch, Subnet, build_search, set_bn_mode, space_of, subnet

STRATEGIES = ("random", "controller", "l1")
BN_MODES = ("eval", "train")


def summarize(values: Sequence[float]) -> Dict:
    """Mean, 10th/50th/90th percentiles and count, plus the raw ``values`` (box plots need them)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(t.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "n": len(t),
            "values": [float(v) for v in t]}


def attacked(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Optional[Attack], batch_size: int,
    desc: Optional[str] = None,
) -> torch.Tensor:
    """Adversarial examples of ``x`` against the full net, batch by batch (``desc``: a progress bar)."""
    if attack is None:
        return x
    starts = range(0, len(x), batch_size)
    return torch.cat([attack(model, x[i:i + batch_size], y[i:i + batch_size]) for i in progress(starts, desc)])


@torch.no_grad()
def accuracies(
    model: nn.Module, views: Mapping[str, torch.Tensor], y: torch.Tensor, alpha: Optional[Subnet] = None,
    bn: str = "eval", batch_size: int = 256,
) -> Dict[str, float]:
    """Accuracy on each view (inputs sharing the labels ``y``) of the full net (alpha None) or of
    subnet alpha, inside one subnet context; the model's modes are restored.

    BN in eval mode classifies each example on its own, so the views' batches are concatenated into
    one forward of up to ``batch_size`` rows. In train mode the batch statistics depend on the batch,
    so each view runs alone in batches of ``batch_size``, as ``accuracy`` always has.
    """
    modes = [(m, m.training) for m in model.modules()]
    set_bn_mode(model, bn)
    names = list(views)
    correct = dict.fromkeys(names, 0)
    try:
        with subnet(model, alpha) if alpha is not None else contextlib.nullcontext():
            if bn == "eval":
                step = max(batch_size // len(names), 1)
                for i in range(0, len(y), step):
                    yb = y[i:i + step]
                    logits = model(torch.cat([views[k][i:i + step] for k in names]))
                    hits = (logits.argmax(1) == yb.repeat(len(names))).view(len(names), -1).sum(1)
                    for k, h in zip(names, hits.tolist()):
                        correct[k] += h
            else:
                for k in names:
                    for i in range(0, len(y), batch_size):
                        correct[k] += int((model(views[k][i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    finally:
        for m, training in modes:
            m.training = training
    return {k: c / max(len(y), 1) for k, c in correct.items()}


def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: Optional[Subnet] = None,
    bn: str = "eval", batch_size: int = 256,
) -> float:
    """Accuracy of the full net (alpha None) or of subnet alpha; the model's modes are restored."""
    return accuracies(model, {"x": x}, y, alpha, bn, batch_size)["x"]


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
        from advews.evaluation.block_vulnerability import block_vulnerability

        result["block_vulnerability"] = block_vulnerability(
            model, xt, yt, xt_adv if attack is not None else None, rho, n_samples=block_samples, bn="eval",
            seed=seed, batch_size=eval_batch, desc=bar("block vulnerability"))
    return result
