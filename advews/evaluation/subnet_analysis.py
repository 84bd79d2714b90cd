"""How weak are a model's subnets? Accuracy of the full net and of subnets found by each search.

Adversarial examples are computed once against the FULL net and reused for every subnet, as in the
paper's Fig. 1. The controller is first trained against the frozen model on the search split (the
checkpoint's validation split), then N subnets are drawn from it and evaluated on the test split,
so the search never sees the images it is judged on. Subnets are reported with BN in eval mode
(running statistics, as a deployed net runs: the primary numbers) and in train mode (batch statistics).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from advews.attacks import Attack
from advews.subnets import ControllerSearch, Subnet, build_search, set_bn_mode, space_of, subnet

STRATEGIES = ("random", "controller", "l1")


def summarize(values: Sequence[float]) -> Dict:
    """Mean, 10th/50th/90th percentiles and count, plus the raw ``values`` (box plots need them)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(t.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "n": len(t),
            "values": [float(v) for v in t]}


def attacked(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Optional[Attack], batch_size: int) -> torch.Tensor:
    if attack is None:
        return x
    return torch.cat([attack(model, x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: Optional[Subnet] = None,
    bn: str = "eval", batch_size: int = 256,
) -> float:
    """Accuracy of the full net (alpha None) or of subnet alpha; the model's modes are restored."""
    modes = [(m, m.training) for m in model.modules()]
    set_bn_mode(model, bn)
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if alpha is None:
                logits = model(xb)
            else:
                with subnet(model, alpha):
                    logits = model(xb)
            correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    finally:
        for m, training in modes:
            m.training = training
    return correct / max(len(x), 1)


def train_controller(
    model: nn.Module, search: ControllerSearch, x: torch.Tensor, y: torch.Tensor,
    updates: int, batch_size: int, bn: str, seed: int,
) -> List[float]:
    """Train the controller against the frozen model: each update scores its samples on a random batch."""
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(updates):
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        xb, yb = x[idx], y[idx]
        stats = search.update(lambda subnets: torch.tensor([accuracy(model, xb, yb, a, bn, batch_size) for a in subnets]))
        history.append(stats["subnet_acc"])
    return history


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
) -> Dict:
    """The analysis behind ``advews-eval --analysis subnets``; returns the JSON-ready result."""
    model.eval()
    space = space_of(model)
    torch.manual_seed(seed)
    xs, ys = search_set
    xt, yt = test_set
    xs_adv = attacked(model, xs, ys, attack, batch_size)
    xt_adv = attacked(model, xt, yt, attack, batch_size)
    result: Dict = {"rho": rho, "n_subnets": n_subnets, "n_examples": len(xt), "search_bn": search_bn,
                    "full": {"clean": summarize([accuracy(model, xt, yt)]),
                             "robust": summarize([accuracy(model, xt_adv, yt)])}}
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
                                       batch_size, search_bn, seed)
            result["controller_search"] = {"updates": search_updates, "lr": search_lr,
                                           "first_acc": history[0] if history else None,
                                           "last_acc": history[-1] if history else None}
        subnets = [search.sample() for _ in range(n_subnets)]
        for bn, target in (("eval", result), ("train", train_bn)):
            target[strategy] = {
                "clean": summarize([accuracy(model, xt, yt, a, bn, batch_size) for a in subnets]),
                "robust": summarize([accuracy(model, xt_adv, yt, a, bn, batch_size) for a in subnets]),
            }
    result["bn_train"] = train_bn
    return result
