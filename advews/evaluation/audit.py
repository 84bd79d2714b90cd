"""Indicators of attack failure (Carlini et al. 2019; Pintor et al. 2022): is a robust accuracy to be trusted?

Each indicator is measured batch by batch as counts over examples (points still robust, points
broken, summed loss per step), so a batch is the unit of resume and shard, and totals are plain
sums; ``judge`` turns the totals into a figure, a flag and one sentence per indicator.

The white-box attack is PGD on the cross-entropy (random start, a cosine step size from 2 eps, the
best iterate kept; see ``pgd``), computed in fp64 from the model's logits so the loss saturates only where the model truly saturates it (a fp32
softmax rounds to exactly 1 at a margin of ~17, which honest confident models reach; fp64 at ~36).
Two attacks on the same points differ beyond noise when the points only one of them breaks outnumber
those only the other breaks by more than twice the standard deviation of that difference (McNemar).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from advews.attacks.ball import ascent_step, project, random_start
from advews.errors import AdvewsError

INDICATORS = ("stochasticity", "classes", "gradients", "unbounded", "monotone", "convergence", "black_box",
              "noise", "transfer")
MEANING = {
    "stochasticity": "two forward passes in eval mode must agree; a randomized model needs EoT gradients and "
                     "counts a point robust only if it is correct in all k re-evaluations",
    "classes": "AutoAttack's targeted attacks use min(9, classes - 1) targets and its DLR loss is undefined "
               "below 4 classes",
    "gradients": "input gradients of the loss must be finite and non-zero and the outputs logits, not "
                 "probabilities; else gradient attacks cannot move (masked or saturated gradients)",
    "unbounded": "with an unbounded budget every point can be changed into any image, so the attack must reach "
                 "~0% accuracy; else gradients are masked or the attack is broken",
    "monotone": "robust accuracy must not rise with a larger eps beyond sampling noise",
    "convergence": "5x more steps and 5 restarts must not lower robust accuracy beyond noise, and with 5x the "
                   "steps the attack loss must have flattened (Pintor et al.'s incomplete-optimisation test)",
    "black_box": "a score-based black-box attack (Square) must not break points the white-box attack left "
                 "standing",
    "noise": "random noise of norm eps must not break points the white-box attack left standing",
    "transfer": "examples crafted on a surrogate (or through BPDA) must not break points the white-box attack "
                "left standing",
}


@dataclass
class AuditSettings:
    """What the audit runs; every figure of the card follows from these, the model and the data."""

    eps: float
    norm: str = "Linf"
    steps: int = 50
    sweep: Tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    unbounded_eps: Optional[float] = None
    square_queries: int = 5000
    noise_draws: int = 10
    best_of: int = 10
    eot: int = 20
    seed: int = 0
    indicators: Tuple[str, ...] = INDICATORS
    surrogate: Optional[str] = field(default=None)  # a description for the card; the module is passed apart

    def __post_init__(self) -> None:
        if not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) or self.eps <= 0:
            raise AdvewsError(f"the audit needs eps > 0, got {self.eps!r}")
        if self.norm not in ("Linf", "L2"):
            raise AdvewsError(f"the audit's norm must be Linf or L2, got {self.norm!r}")
        for name in ("steps", "square_queries", "noise_draws", "best_of", "eot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdvewsError(f"audit {name} (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}")
        sweep = tuple(self.sweep)
        if len(sweep) < 2 or any(not math.isfinite(s) or s < 0 for s in sweep) or \
                any(b <= a for a, b in zip(sweep, sweep[1:])):
            raise AdvewsError(f"the audit's eps sweep (--audit-sweep) must be at least two strictly increasing "
                              f"fractions >= 0 of eps, got {', '.join(f'{s:g}' for s in sweep)}")
        self.sweep = sweep
        unknown = [i for i in self.indicators if i not in INDICATORS]
        if unknown or not self.indicators:
            raise AdvewsError(f"unknown audit indicator {', '.join(map(repr, unknown)) or '(none given)'} "
                              "(--audit-indicators); "
                              f"choose from {', '.join(INDICATORS)}")
        if self.unbounded_eps is None:
            self.unbounded_eps = 1.0 if self.norm == "Linf" else None  # L2: the image's diagonal, set per batch


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=6).digest(), "big")


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).double()


@torch.no_grad()
def correct_all(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Correct in every one of ``k`` forward passes (k = 1 for a deterministic model)."""
    ok = torch.ones_like(y, dtype=torch.bool)
    for _ in range(k):
        ok &= model(x).argmax(1) == y
    return ok


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, steps: int, eot: int,
        restarts: int = 1, k: int = 1) -> Tuple[torch.Tensor, List[float], torch.Tensor]:
    """Per-example robust flags of CE-PGD (the best of ``restarts``), its summed loss at each step of
    the first restart, and per example whether that restart's optimisation was incomplete.

    The step size decays from 2 eps to 0 on a cosine (APGD's first step, without its adaptive
    halving), and a point is broken once any iterate misclassifies it (APGD keeps its best iterate the
    same way); on the quickstart digits PGD-50 so reaches within 1.5 points of AutoAttack, where a
    fixed step of 2.5 eps / steps stays 7 points above it. Gradients are averaged over ``eot`` passes
    and a randomized model (``k`` > 1) is judged on the last iterate only, in ``k`` passes."""
    robust = correct_all(model, x, y, k)
    curve: List[float] = []
    history: List[torch.Tensor] = []
    for r in range(restarts):
        x_adv = random_start(x, eps, norm)
        for i in range(steps):
            x_adv.requires_grad_(True)
            grad = torch.zeros_like(x)
            each = torch.zeros(len(y), dtype=torch.float64, device=x.device)
            for _ in range(eot):
                logits = _logits(model, x_adv)
                if k == 1:
                    robust &= logits.argmax(1) == y
                loss = F.cross_entropy(logits, y, reduction="none")
                (g,) = torch.autograd.grad(loss.sum(), x_adv)
                grad += torch.nan_to_num(g)
                each += loss.detach() / eot
            if r == 0:
                curve.append(float(each.sum()))
                history.append(each)
            size = eps * (1 + math.cos(math.pi * i / steps))
            x_adv = project(x, ascent_step(x_adv.detach(), grad, size, norm), eps, norm)
        robust &= correct_all(model, x_adv, y, k)
    return robust, curve, incomplete(torch.stack(history, 1))


def incomplete(losses: torch.Tensor, last: int = 10, tol: float = 0.05) -> torch.Tensor:
    """Pintor et al.'s incomplete-optimisation indicator per example: the best loss so far, rescaled
    to [0, 1] over the trajectory, still rose by more than ``tol`` within the last ``last`` steps."""
    if losses.shape[1] < 2:
        return torch.zeros(losses.shape[0], dtype=torch.bool, device=losses.device)
    lo, hi = losses.min(1, keepdim=True).values, losses.max(1, keepdim=True).values
    best = torch.cummax((losses - lo) / (hi - lo).clamp_min(1e-12), dim=1).values[:, -last:]
    return (best[:, -1] - best[:, 0]) > tol


def _noise(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        delta = eps * torch.randint(0, 2, x.shape, dtype=x.dtype).mul(2).sub(1).to(x.device)
    else:
        delta = torch.randn_like(x)
        delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0, 1)


def is_randomized(model: nn.Module, x: torch.Tensor) -> Tuple[bool, float]:
    """Whether two eval-mode passes disagree (beyond float noise), and their largest logit difference."""
    from advews.attacks.autoattack import randomized

    with torch.no_grad():
        diff = float((model(x).double() - model(x).double()).abs().max()) if len(x) else 0.0
    return randomized(model, x), diff


def audit_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AuditSettings, index: int,
                randomized: bool, surrogate: Optional[nn.Module] = None,
                square: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = None
                ) -> Dict[str, Any]:
    """The counts of every selected indicator on one batch (``index`` seeds it, so a resumed or
    sharded audit draws the same noise). ``model`` is in eval mode with frozen parameters."""
    want = set(s.indicators)
    k, eot = (s.best_of, s.eot) if randomized else (1, 1)
    c: Dict[str, Any] = {"n": len(y)}

    def seeded(name: str) -> None:
        torch.manual_seed(_seed(s.seed, index, name))

    seeded("stochasticity")
    flip, diff = is_randomized(model, x)
    c["stochastic_batches"], c["max_logit_diff"] = int(flip), diff
    clean = correct_all(model, x, y, k)
    c["clean"] = int(clean.sum())
    with torch.no_grad():
        out = model(x).double()
    c["classes"] = int(out.shape[1])
    if "gradients" in want:
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(_logits(model, xg), y, reduction="sum"), xg)
        flat = g.flatten(1)
        finite = torch.isfinite(flat).all(1)
        c["grad_nonfinite"] = int((~finite).sum())
        c["grad_zero"] = int((finite & (flat.abs().sum(1) == 0)).sum())
        probs = (out.min(1).values >= 0) & (out.max(1).values <= 1) & ((out.sum(1) - 1).abs() < 1e-3)
        c["probability_rows"] = int(probs.sum())
    seeded("base")
    base, curve, unfinished = pgd(model, x, y, s.eps, s.norm, s.steps, eot, k=k)
    c["base_robust"], c["loss_curve"] = int(base.sum()), curve
    c["incomplete_base"] = int((base & unfinished).sum())  # standing points whose loss had not settled
    if "unbounded" in want:
        seeded("unbounded")
        big = s.unbounded_eps if s.unbounded_eps is not None else math.sqrt(x[0].numel())
        c["unbounded_robust"] = int(pgd(model, x, y, big, s.norm, s.steps, eot, k=k)[0].sum())
    if "monotone" in want:
        flags = []
        for i, frac in enumerate(s.sweep):
            seeded(f"sweep{i}")
            flags.append(clean if frac == 0 else base if frac == 1 else
                         pgd(model, x, y, frac * s.eps, s.norm, s.steps, eot, k=k)[0])
        c["sweep_robust"] = [int(f.sum()) for f in flags]
        c["sweep_gained"] = [int((b & ~a).sum()) for a, b in zip(flags, flags[1:])]  # robust only at the larger eps
        c["sweep_lost"] = [int((a & ~b).sum()) for a, b in zip(flags, flags[1:])]
    if "convergence" in want:
        seeded("more_steps")
        more, _, unsettled = pgd(model, x, y, s.eps, s.norm, 5 * s.steps, eot, k=k)
        c["incomplete"] = int((more & unsettled).sum())  # still unsettled with 5x the steps
        seeded("restarts")
        restarts = pgd(model, x, y, s.eps, s.norm, s.steps, eot, restarts=5, k=k)[0]
        c["more_steps_robust"], c["restarts_robust"], c["_more"], c["_restarts"] = \
            int(more.sum()), int(restarts.sum()), more, restarts
        # paired counts: broken only by the stronger attack / only by the base attack
        c["more_steps_only"], c["base_only_vs_steps"] = int((base & ~more).sum()), int((more & ~base).sum())
        c["restarts_only"], c["base_only_vs_restarts"] = int((base & ~restarts).sum()), int((restarts & ~base).sum())
    held = base
    if "convergence" in want:  # what every white-box attempt left standing
        held = base & c.pop("_more") & c.pop("_restarts")
    c["white_box_robust"] = int(held.sum())
    standing = held.nonzero().flatten()
    if "black_box" in want:
        seeded("square")
        broken = 0
        if len(standing) and square is not None:
            x_sq = square(model, x[standing], y[standing])
            broken = int((~correct_all(model, x_sq, y[standing], k)).sum())
        c["square_broken"] = broken
    if "noise" in want:
        seeded("noise")
        hit = torch.zeros(len(standing), dtype=torch.bool, device=x.device)
        for _ in range(s.noise_draws if len(standing) else 0):
            hit |= ~correct_all(model, _noise(x[standing], s.eps, s.norm), y[standing], k)
        c["noise_broken"] = int(hit.sum())
    if "transfer" in want and surrogate is not None:
        seeded("transfer")
        x_tr = _transfer_examples(surrogate, x, y, s)
        fooled = ~correct_all(model, x_tr, y, k)
        c["transfer_broken"] = int((held & fooled).sum())
        c["transfer_missed"] = int((clean & ~held & ~fooled).sum())  # broken by white-box only
    return c


def _transfer_examples(surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AuditSettings) -> torch.Tensor:
    """PGD (the base attack's steps) against the surrogate, as examples to try on the audited model."""
    x_adv = random_start(x, s.eps, s.norm)
    for _ in range(s.steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(_logits(surrogate, x_adv), y, reduction="sum"), x_adv)
        x_adv = project(x, ascent_step(x_adv.detach(), torch.nan_to_num(g), 2.5 * s.eps / s.steps, s.norm),
                        s.eps, s.norm)
    return x_adv.detach()


def add(total: Dict[str, Any], counts: Dict[str, Any]) -> Dict[str, Any]:
    """Sum two count dicts (lists elementwise; the largest logit difference by max)."""
    out = dict(total)
    for key, value in counts.items():
        if key not in out:
            out[key] = value
        elif key == "max_logit_diff":
            out[key] = max(out[key], value)
        elif key == "classes":
            out[key] = value
        elif isinstance(value, list):
            out[key] = [a + b for a, b in zip(out[key], value)]
        else:
            out[key] = out[key] + value
    return out


def paired(gained: int, lost: int) -> bool:
    """McNemar's rule on the same points: ``gained`` (changed one way) exceeds ``lost`` (changed the
    other way) by more than twice the standard deviation sqrt(gained + lost) of their difference,
    and by at least two points."""
    return gained - lost >= 2 and gained - lost > 2 * math.sqrt(gained + lost)


def judge(t: Dict[str, Any], s: AuditSettings, randomized: bool, surrogate: bool) -> List[Dict[str, Any]]:
    """One entry per indicator: its figures, whether it flags, and what it means."""
    n = max(t["n"], 1)
    acc = lambda count: count / n  # noqa: E731
    base = acc(t["base_robust"])
    few = max(1, int(0.01 * n))  # "~0" and "breaks none" allow 1% of the points, at least one
    rows: List[Dict[str, Any]] = []

    def row(name: str, flagged: Optional[bool], figures: Dict[str, Any], finding: str) -> None:
        rows.append({"indicator": name, "flagged": flagged, "figures": figures, "finding": finding,
                     "meaning": MEANING[name]})

    want = set(s.indicators)
    if "stochasticity" in want:
        row("stochasticity", randomized, {"stochastic_batches": t["stochastic_batches"],
                                          "max_logit_diff": t["max_logit_diff"],
                                          "best_of": s.best_of if randomized else 1, "eot": s.eot if randomized else 1},
            "the model is randomized: every figure uses EoT gradients and best-of-k correctness; report "
            "AutoAttack's rand version" if randomized else "two eval-mode passes agree")
    if "classes" in want:
        c = t["classes"]
        row("classes", c < 4, {"classes": c, "autoattack_targets": min(9, c - 1), "dlr_defined": c >= 4},
            f"{c} classes: DLR is undefined, run AutoAttack with --version custom --aa-attacks apgd-ce,fab,square"
            if c < 4 else f"{c} classes: targeted attacks use {min(9, c - 1)} targets")
    if "gradients" in want:
        bad = t["grad_zero"] + t["grad_nonfinite"]
        probs = t["probability_rows"] > n / 2
        row("gradients", bad > few or probs,
            {"zero_gradient": acc(t["grad_zero"]), "nonfinite_gradient": acc(t["grad_nonfinite"]),
             "probability_outputs": acc(t["probability_rows"])},
            "the outputs are probabilities (a softmax head saturates the cross-entropy): attack the logits"
            if probs else f"{acc(bad):.1%} of the points have a zero or non-finite input gradient"
            if bad > few else "input gradients are finite and non-zero")
    if "unbounded" in want:
        row("unbounded", t["unbounded_robust"] > few, {"eps": s.unbounded_eps, "robust_acc": acc(t["unbounded_robust"])},
            f"{acc(t['unbounded_robust']):.1%} of the points survive an unbounded attack")
    if "monotone" in want:
        accs = [acc(v) for v in t["sweep_robust"]]
        rises = [(s.sweep[i + 1], g - lo) for i, (g, lo) in enumerate(zip(t["sweep_gained"], t["sweep_lost"]))
                 if paired(g, lo)]
        row("monotone", bool(rises), {"eps": [f * s.eps for f in s.sweep], "robust_acc": accs},
            "robust accuracy rises with eps at " + ", ".join(f"{f:g} eps (+{d} points)" for f, d in rises)
            if rises else "robust accuracy does not rise with eps beyond noise")
    if "convergence" in want:
        more, rest = acc(t["more_steps_robust"]), acc(t["restarts_robust"])
        curve = [v / n for v in t["loss_curve"]]
        rising = t["incomplete"] > max(few, 0.05 * t["more_steps_robust"])
        worse = [(what, a - b) for what, a, b in (("5x steps", t["more_steps_only"], t["base_only_vs_steps"]),
                                                  ("5 restarts", t["restarts_only"], t["base_only_vs_restarts"]))
                 if paired(a, b)]
        row("convergence", bool(worse) or rising,
            {"robust_acc": base, "robust_acc_5x_steps": more, "robust_acc_5_restarts": rest,
             "incomplete": acc(t["incomplete_base"]), "incomplete_5x_steps": acc(t["incomplete"]),
             "loss_curve": [round(v, 6) for v in curve]},
            ", ".join(f"{what} break {d} more points" for what, d in worse) + " (beyond noise)" if worse else
            f"even with 5x the steps the loss of {t['incomplete']} standing points still rose at the end" if rising
            else "5x steps and 5 restarts break no more points than noise allows, and with 5x the steps the loss "
                 "has flattened")
    if "black_box" in want:
        row("black_box", t["square_broken"] > few, {"queries": s.square_queries,
                                                    "broken_after_white_box": acc(t["square_broken"])},
            f"Square breaks {t['square_broken']} of the {t['white_box_robust']} points the white-box attacks left standing")
    if "noise" in want:
        row("noise", t["noise_broken"] > 0, {"draws": s.noise_draws, "broken_after_white_box": acc(t["noise_broken"])},
            f"random noise breaks {t['noise_broken']} of the {t['white_box_robust']} points the white-box attacks left "
            "standing")
    if "transfer" in want:
        if not surrogate:
            row("transfer", None, {}, "not run: give a surrogate model or BPDA modules to run it")
        else:
            row("transfer", paired(t["transfer_broken"], t["transfer_missed"]),
                {"broken_after_white_box": acc(t["transfer_broken"]), "missed": acc(t["transfer_missed"])},
                f"transferred examples break {t['transfer_broken']} of the {t['white_box_robust']} points the white-box "
                "attacks left standing")
    return rows


def verdict(rows: List[Dict[str, Any]]) -> str:
    flags = [r["indicator"] for r in rows if r["flagged"]]
    return "no indicator of attack failure" if not flags else "flagged: " + ", ".join(flags)
