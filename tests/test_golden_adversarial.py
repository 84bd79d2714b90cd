"""Golden steps: one advews training iteration per adversarial paper-row recipe against an independent
transcription of the reference script's iteration (tests/golden_reference.py), and proof that each
reference switch the row depends on, flipped, breaks the agreement.

Each row parses its REAL recipe (gin/<row>.gin) plus the reference positions of the README's
differences table that the recipe leaves at advews's own default (``REFERENCE_POSITIONS``), builds
``train.defense``, and runs the calls ``Trainer._train_step`` makes (set_progress, prepare,
begin_step, zero_grad, training_loss with a staged backward, optimizer step, end_step) on a tiny
PreAct net (float32: the attacks' fp32 logits then match the reference op for op) and a
16-image 16x16 batch. The reference runs from a deepcopy of the same weights,
the same batch, the same attack noise (same global seed right before each side's attack, same dtype)
and, for EWS, the same controller weights and the subnets advews drew (recorded from its controller);
the reward on the reference side is the reference's own subnet accuracy. Compared to 1e-5: the loss,
every model gradient, the weights after the optimizer step (and AWP restore), and for EWS the policy
loss, the controller's clipped gradients, its parameters after the Adam step and the baseline.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Dict, List, Tuple

import gin
import pytest
import torch
from torch import nn

import golden_reference as ref
from advews.api.config import parse_gin
from advews.defenses import build_defense
from advews.engine.optim import make_optimizer
from advews.models import build_model
from advews.subnets import space_of

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")
ATOL = 1e-5
EPOCH = 10  # past TRADES-AWP's 10 warm-up epochs; the search enters a new epoch (baseline restart)
PRIOR_BASELINE = -0.3  # the search's baseline carried from the previous epoch (the reference restarts at 0)
ATTACK_SEED, CONTROLLER_SEED = 1234, 7

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)  # all scripts: SGD lr 0.1 momentum 0.9 wd 5e-4
AT_ATTACK = dict(eps=8 / 255, step_size=2 / 255, steps=10)  # train_adv_at.py --epsilon 8 --pgd-alpha 2
TRADES_ATTACK = dict(eps=0.031, step_size=0.007, steps=10)  # train_adv_trades.py / trades.py
MART_ATTACK = dict(eps=0.031, step_size=0.007, steps=10)  # mart.py defaults
EWS_REF = dict(lam=0.1, entropy_coeff=0.01)  # train_adv_*.py --lambda_kl 0.1 --entropy_coeff 0.01

# The authors' controller objective and baseline (ControllerSearch's reference positions).
AUTHORS_CONTROLLER = [
    "ControllerSearch.objective = 'authors'",
    "ControllerSearch.baseline = 'advantage'",
    "ControllerSearch.reset_baseline_each_epoch = True",
]
# Reference positions that the recipes leave at advews's default (README "Differences" table).
REFERENCE_POSITIONS: Dict[str, List[str]] = {
    "at_ews": ["EWS.search_bn = 'train'"] + AUTHORS_CONTROLLER,  # train_adv_at.py scores in train mode
    "at_awp_ews": ["EWS.search_bn = 'train'"] + AUTHORS_CONTROLLER,
    "trades_ews": AUTHORS_CONTROLLER,  # train_adv_trades.py scores in eval mode (advews's default)
    "trades_awp_ews": AUTHORS_CONTROLLER,
    "trades_awp_unlabeled_ews": AUTHORS_CONTROLLER,
    "mart_ews": AUTHORS_CONTROLLER,
}


def reference_step(row: str, model, x, y, ews, awp_gamma=None) -> Dict[str, torch.Tensor]:
    """The reference iteration of ``row`` with the reference scripts' own settings (not the recipe's)."""
    awp = "awp" in row
    if row.startswith("at"):
        return ref.ref_at_step(model, x, y, **AT_ATTACK, smoothing=0.1, sgd=SGD,
                               awp=(awp_gamma or 0.01, 0.01) if awp else None, ews=ews, seed=ATTACK_SEED)
    if row.startswith("trades"):  # EWS TRADES script: smoothing 0.1, beta 6, TradesAWP proxy lr = lr 0.1
        return ref.ref_trades_step(model, x, y, **TRADES_ATTACK, beta=6.0, smoothing=0.1, sgd=SGD,
                                   awp=(awp_gamma or 0.005, 0.1) if awp else None, ews=ews, seed=ATTACK_SEED)
    return ref.ref_mart_step(model, x, y, **MART_ATTACK, beta=6.0, sgd=SGD, ews=ews, seed=ATTACK_SEED)


ROWS = ["at", "at_ews", "at_awp", "at_awp_ews", "trades", "trades_ews", "trades_awp", "trades_awp_ews",
        "trades_awp_unlabeled", "trades_awp_unlabeled_ews", "mart", "mart_ews"]


def flips(row: str) -> List[str]:
    """Each reference switch the row depends on, set away from its reference position."""
    out = []
    if row.startswith("at"):
        out += ["AT.attack_mode = 'eval'", "AT.label_smoothing = 0.0", "AT.final_forward = False"]
    elif row.startswith("trades"):
        out += ["TRADES.attack_mode = 'train'", "TRADES.clamp_start = True", "TRADES.label_smoothing = 0.0"]
    else:
        out += ["MART.attack_mode = 'train'", "MART.start = 'uniform'", "MART.clamp_start = True",
                "MART.label_smoothing = 0.1"]
    if "awp" in row:
        out += ["AWP.smooth_proxy_labels = True"]
    if row.endswith("_ews"):
        out += ["EWS.search_bn = 'eval'" if row.startswith("at") else "EWS.search_bn = 'train'",
                "ControllerSearch.objective = 'exact'", "ControllerSearch.baseline = 'reward'",
                "ControllerSearch.reset_baseline_each_epoch = False"]
        if row.startswith("at_awp"):  # TRADES-AWP rows: test_search_at_awp_weights_switch_trades
            out += ["EWS.search_at_awp_weights = True"]
    return out


# --- the tiny setting ------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(dropout: float = 0.0) -> nn.Module:
    """PreAct net with widths 10/12/12, so rho 0.9 keeps 9/11/11 channels (a real subnet); BN running
    statistics and affine parameters randomised, so eval-mode and train-mode BN disagree."""
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 3,
                         "options": {"widths": [10, 12, 12], "dropout": dropout}})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


def tiny_batch(model: nn.Module, n: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images with saturated rows (0 and 1: the TRADES/MART unclipped start leaves the box there);
    labels: the net's own train-mode predictions for 12 images (so subnets score above 0), random for 4."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 16, 16, generator=g)
    x[:, :, :3] = 0.0
    x[:, :, -2:] = 1.0
    with torch.no_grad():
        y = copy.deepcopy(model).train()(x).argmax(1)
    y[12:] = torch.randint(0, 10, (n - 12,), generator=g)
    return x, y


class StagedBackward:
    """The loop's ``Backward`` without DDP: plain autograd, ``local`` a no-op."""

    def __call__(self, loss: torch.Tensor) -> None:
        loss.backward()

    def local(self):
        return contextlib.nullcontext()


# --- the advews side -------------------------------------------------------------------------------
def advews_step(row: str, extra: List[str], model0: nn.Module, x, y, dropout: float = 0.0):
    """One iteration as Trainer._train_step makes it, from ``gin/<row>.gin`` plus the reference
    positions plus ``extra``. Returns (results, the controller before the step, the recorded draws)."""
    parse_gin([os.path.join(GIN_DIR, f"{row}.gin")], REFERENCE_POSITIONS.get(row, []) + extra)
    defense = build_defense(gin.query_parameter("train.defense"))
    model = copy.deepcopy(model0)
    torch.manual_seed(CONTROLLER_SEED)  # ControllerSearch seeds from torch.initial_seed()
    defense.setup(model)
    optimizer = make_optimizer(model.parameters())
    search = getattr(defense, "search", None)
    controller0, draws = None, []
    if search is not None:
        search.epoch, search.baseline, search.baseline_ready = EPOCH - 1, PRIOR_BASELINE, True
        controller0 = copy.deepcopy(search.controller)
        sample = search.controller.sample

        def recording(n=1, generator=None):
            s = sample(n, generator)
            draws.append(s.subnets[0].canonical())
            return s

        search.controller.sample = recording
    defense.set_progress(EPOCH, 1.0)
    model.train()
    torch.manual_seed(ATTACK_SEED)
    batch = defense.prepare(model, x, y)
    defense.begin_step(model, batch)
    optimizer.zero_grad(set_to_none=True)
    out = defense.training_loss(model, batch, StagedBackward())
    if not out.backpropagated:
        out.loss.backward()
    res = {"loss": out.loss.detach()}
    res.update({f"grad/{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    optimizer.step()
    defense.end_step(model)
    res.update({f"weight/{n}": p.detach().clone() for n, p in model.named_parameters()})
    res.update(ref.running_stats(model))
    if search is not None:
        c = search.controller
        res["policy_loss"] = out.metrics["search_loss"]
        res["baseline"] = torch.tensor(search.baseline)
        res["reward"] = -out.metrics["search_subnet_acc"]
        res.update({f"controller/{n}": p.detach().clone() for n, p in c.named_parameters()})
        res.update({f"controller_grad/{n}": p.grad.clone() for n, p in c.named_parameters() if p.grad is not None})
    gin.clear_config()
    return res, controller0, draws


def reference_for(row: str, model0, x, y, controller0, draws, awp_gamma=None) -> Dict[str, torch.Tensor]:
    model = copy.deepcopy(model0)
    ews = None
    if row.endswith("_ews"):
        assert len(draws) == 2, f"expected a search draw and a distillation draw, got {len(draws)}"
        ews = dict(EWS_REF, controller=copy.deepcopy(controller0), search_subnet=draws[0],
                   distill_subnet=draws[1], space=space_of(model), baseline=0.0)  # restarted each epoch
    return reference_step(row, model, x, y, ews, awp_gamma)


_GOLDEN: Dict[str, tuple] = {}


def golden(row: str):
    """(model0, x, y, advews result at the reference positions, reference result), computed once."""
    if row not in _GOLDEN:
        model0 = tiny_model()
        x, y = tiny_batch(model0)
        res, controller0, draws = advews_step(row, [], model0, x, y)
        _GOLDEN[row] = (model0, x, y, res, reference_for(row, model0, x, y, controller0, draws))
    return _GOLDEN[row]


# --- tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS)
def test_golden_step_matches_reference(row):
    """Loss, gradients, updated weights, BN running statistics (the AT references' 11 BN-updating
    attack forwards included) and the controller's update, as the reference computes them."""
    _, _, _, res, expected = golden(row)
    if row.endswith("_ews"):
        assert float(expected["reward"]) < 0, "subnets must score above 0 for the controller checks to bite"
    ref.assert_close_tree(res, expected, ATOL, f"{row}: advews vs reference")


@pytest.mark.parametrize("row, flip", [(r, f) for r in ROWS for f in flips(r)])
def test_flipped_reference_switch_breaks_the_golden_step(row, flip):
    model0, x, y, _, expected = golden(row)
    res, _, _ = advews_step(row, [flip], model0, x, y)
    diffs = ref.tree_diffs(res, expected)
    worst = max(diffs.values())
    assert worst > ATOL, f"{row} with {flip} still matches the reference (max diff {worst:.3g})"
    with pytest.raises(AssertionError, match="differ by more than"):
        ref.assert_close_tree(res, expected, ATOL, f"{row} with {flip}")


@pytest.mark.parametrize("row", ["trades_awp_ews", "trades_awp_unlabeled_ews"])
def test_search_at_awp_weights_switch_trades(row):
    """EWS.search_at_awp_weights on the TRADES-AWP rows: at their gamma 0.005 no prediction of the 16
    images moves, so the reward cannot tell the two orders apart; at AWP.gamma 0.05 (both sides) it does."""
    model0 = tiny_model()
    x, y = tiny_batch(model0)
    res, controller0, draws = advews_step(row, ["AWP.gamma = 0.05"], model0, x, y)
    expected = reference_for(row, model0, x, y, controller0, draws, awp_gamma=0.05)
    ref.assert_close_tree(res, expected, ATOL, f"{row}, AWP.gamma 0.05")
    flipped, _, _ = advews_step(row, ["AWP.gamma = 0.05", "EWS.search_at_awp_weights = True"], model0, x, y)
    assert float(flipped["reward"]) != float(expected["reward"])
    with pytest.raises(AssertionError, match="differ by more than"):
        ref.assert_close_tree(flipped, expected, ATOL, f"{row} with EWS.search_at_awp_weights = True")


def test_subnet_dropout_switch():
    """EWS.subnet_dropout: the authors' switch_to_subnet sets dropout p = 0 (their --drop_rate defaults
    to 0, so the rows never exercise it): a net with dropout 0.3 on trades_ews, where both sides draw the
    dropout masks in the same order (eval-mode attack and scoring, then f(x), f(x'), then the subnet)."""
    model0 = tiny_model(dropout=0.3)
    x, y = tiny_batch(model0)
    res, controller0, draws = advews_step("trades_ews", [], model0, x, y)
    expected = reference_for("trades_ews", model0, x, y, controller0, draws)
    ref.assert_close_tree(res, expected, ATOL, "trades_ews, dropout 0.3")
    flipped, _, _ = advews_step("trades_ews", ["EWS.subnet_dropout = True"], model0, x, y)
    with pytest.raises(AssertionError, match="differ by more than"):
        ref.assert_close_tree(flipped, expected, ATOL, "trades_ews with EWS.subnet_dropout = True")
