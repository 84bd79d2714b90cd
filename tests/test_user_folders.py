"""The user folders beside the package, run as a user runs them: ``defenses/`` (the README's logit-pairing
defense and its recipes) and ``attacks/`` (multi-targeted PGD), loaded through gin's ``import`` in a recipe
and through ``advews-eval --attack MODULE:CLASS``, from the repository root and from a copy of the
folders elsewhere with the installed console scripts (so the folders are found from the working
directory, never from the checkout), and the AT training attack chosen by a gin binding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import gin
import pytest
import torch
from torch import nn
from test_bad_input import Q, check_row, ev, gp, out, train

from advews.attacks import PGD
from advews.cli.train import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.epochs = 1", "data.train_limit = 128", "data.val_size = 64", "AT.steps = 1", "train.val_steps = 1"]
USER_FOLDERS = ("defenses", "attacks")
MT = "attacks.multi_targeted:MultiTargetedPGD"
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(name: str) -> str:
    """The installed console script: unlike ``python -m``, it does not put the working directory on
    sys.path itself, so a user folder is found only because advews puts it there."""
    path = shutil.which(name)
    assert path, f"{name} is not on PATH: install advews (pip install -e '.[test]')"
    return path


def run(tool: str, args: list, cwd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    proc = subprocess.run([cli(tool), *args], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def tiny(bindings: list) -> list:
    return [a for b in bindings for a in ("--gin-param", b)]


def last_row(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def root_run(tmp_path_factory):
    """advews-train --gin defenses/logit_pairing.gin, run in the repository root."""
    run_dir = tmp_path_factory.mktemp("root") / "lp"
    run("advews-train", ["--gin", "defenses/logit_pairing.gin", "--output", str(run_dir), "--quiet", *tiny(TINY)], ROOT)
    return run_dir


def test_user_defense_trains_from_the_repository_root(root_run):
    config = (root_run / "config.gin").read_text()
    assert "import defenses.logit_pairing" in config  # --resume re-imports it
    assert "train.defense = 'LogitPairingAT'" in config and "LogitPairingAT.pairing = 0.5" in config
    assert last_row(root_run)["epoch"] == 1


def test_user_attack_evaluates_from_the_repository_root(root_run, tmp_path):
    result = tmp_path / "eval.json"
    run("advews-eval", ["--checkpoint", str(root_run / "last.pt"), "--attack", f"pgd,{MT}", "--n-examples", "32",
                        "--steps", "2", "--output", str(result)], ROOT)
    res = json.loads(result.read_text())
    entry = res["attacks"][MT]
    assert (entry["eps"], entry["steps"], entry["targets"], entry["norm"]) == (0.3, 2, 3, "Linf")
    assert res["robust_acc"] <= min(entry["robust_acc"], res["attacks"]["pgd"]["robust_acc"]) <= res["clean_acc"]


def test_user_folders_work_from_elsewhere_with_the_installed_tools(tmp_path):
    """A copy of defenses/ and attacks/ in a project of the user's own: the EWS variant of the user
    defense, trained with the user attack named by a gin binding (AT.attack, which LogitPairingAT
    inherits), then evaluated under that attack."""
    for folder in USER_FOLDERS:
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run("advews-train", ["--gin", "defenses/logit_pairing_ews.gin", "--output", "run", "--quiet",
                         *tiny(TINY + [f"AT.attack = '{MT}'"])], str(tmp_path))
    config = (tmp_path / "run" / "config.gin").read_text()
    assert "train.defense = 'LogitPairingAT_EWS'" in config and f"AT.attack = '{MT}'" in config
    assert last_row(tmp_path / "run")["train_ews_kl"] > 0
    run("advews-eval", ["--checkpoint", "run/last.pt", "--attack", MT, "--n-examples", "32", "--steps", "1",
                        "--output", "eval.json"], str(tmp_path))
    assert json.loads((tmp_path / "eval.json").read_text())["attacks"][MT]["steps"] == 1
    assert os.path.isdir(tmp_path / "attacks" / "__pycache__")  # imported from the copy, not the checkout


@pytest.fixture
def at_root(monkeypatch):
    """In-process runs from the repository root, as advews-train run there."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(ROOT)


def test_user_attack_is_ats_training_attack_by_gin_reference(at_root, tmp_path):
    assert train_main(["--gin", "defenses/at_multi_targeted.gin", "--output", str(tmp_path / "r"), "--quiet",
                       *tiny(TINY)]) == 0
    config = (tmp_path / "r" / "config.gin").read_text()
    assert "import attacks.multi_targeted" in config and "AT.attack = @MultiTargetedPGD" in config
    assert "MultiTargetedPGD.targets = 2" in config


def _at(bindings: list):
    from advews.api.config import parse_gin
    from advews.defenses import build_defense

    parse_gin([], ["include 'quickstart.gin'", *bindings])
    return build_defense("AT")


def test_at_attack_binding_builds_the_named_class_with_ats_settings(at_root):
    from attacks.multi_targeted import MultiTargetedPGD

    default = _at([]).attack  # unchanged: the PGD AT always built
    assert default == PGD(eps=0.3, norm="Linf", steps=10, step_size=0.05, random_start=True, model_mode="train",
                          final_forward=False)
    by_name = _at([f"AT.attack = '{MT}'", "AT.steps = 4"]).attack
    assert type(by_name) is MultiTargetedPGD
    assert (by_name.eps, by_name.steps, by_name.step_size, by_name.model_mode, by_name.targets) == (0.3, 4, 0.05,
                                                                                                    "train", 3)
    by_ref = _at(["import attacks.multi_targeted", "AT.attack = @MultiTargetedPGD", "MultiTargetedPGD.targets = 5"])
    assert type(by_ref.attack) is MultiTargetedPGD and by_ref.attack.targets == 5
    assert type(by_ref.attack.scaled(0.5)) is MultiTargetedPGD  # the eps ramp keeps the class
    gin.clear_config()


def test_multi_targeted_pgd_finds_the_exact_worst_case_of_a_linear_model(at_root):
    """For a linear model one Linf step of size eps toward target t reaches the maximiser of z_t - z_y
    over the ball and the pixel box, so trying every wrong class is exact: the attack fools exactly the
    points some vertex fools, and never does worse than the clean point."""
    from attacks.multi_targeted import MultiTargetedPGD, margin

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.rand(64, 1, 3, 4), torch.randint(0, 4, (64,))
    eps = 0.1
    attack = MultiTargetedPGD(eps=eps, steps=1, step_size=eps, targets=3, random_start=False)
    x_adv = attack(model, x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    w = model[1].weight
    with torch.no_grad():
        best = torch.full((64,), -float("inf"))
        for t in range(4):
            direction = (w[t] - w[y]).sign().view_as(x)  # per example: the ascent direction of z_t - z_y
            vertex = (x + eps * direction).clamp(0, 1)
            z = model(vertex)
            value = z[:, t] - z.gather(1, y[:, None]).squeeze(1)
            best = torch.where(t == y, best, torch.maximum(best, value))
        reached = margin(model(x_adv), y)
    assert torch.allclose(reached, best, atol=1e-5)
    assert ((reached > 0) == (best > 0)).all() and (best > 0).any() and (best <= 0).any()
    assert (reached >= margin(model(x), y) - 1e-6).all()


@pytest.fixture(scope="module")
def user_world(world, tmp_path_factory):
    """A working directory with the bad-input world's trained run and a copy of attacks/."""
    root = tmp_path_factory.mktemp("user_world")
    shutil.copytree(os.path.join(world, "run"), root / "run")
    shutil.copytree(os.path.join(ROOT, "attacks"), root / "attacks", ignore=shutil.ignore_patterns("__pycache__"))
    return str(root)


G = ("--checkpoint", "run/last.pt", "--n-examples", "20")
ROWS = [
    ev("UF01", G + ("--attack", "nosuchmodule:X"), "'nosuchmodule:X'", "MODULE:CLASS"),
    ev("UF02", G + ("--attack", "attacks.multi_targeted:NotAClass"), "NotAClass", "MODULE:CLASS"),
    ev("UF03", G + ("--attack", "torch.nn:Linear"), "'torch.nn:Linear'", "not an attack"),
    ev("UF04", G + ("--attack", "math:pi"), "'math:pi'", "not a class"),
    ev("UF05", G + ("--attack", "attacks.multi_targeted"), "'attacks.multi_targeted'", "MODULE:CLASS"),
    ev("UF06", G + ("--attack", "pgd,:X"), "':X'", "MODULE:CLASS"),
    ev("UF07", G + ("--attack", "advews.attacks.zoo:TorchAttack"), "TorchAttack", "abstract"),
    train("UF08", Q + gp("AT.attack = 'nosuchmodule:X'") + out("UF08"), "'nosuchmodule:X'", "AT.attack"),
    train("UF09", Q + gp("AT.attack = 'torch.nn:Linear'") + out("UF09"), "AT.attack", "not an attack"),
    train("UF10", Q + gp("AT.attack = 'magic'") + out("UF10"), "AT.attack", "'magic'", "pgd"),
    train("UF11", Q + gp(f"AT.attack = '{MT}'") + gp("AT.mix = 'cutmix'") + out("UF11"), "MultiTargetedPGD",
          "mix_attack_target"),
    train("UF12", Q + gp("import attacks.multi_targeted") + gp("AT.attack = @MultiTargetedPGD")
          + gp("MultiTargetedPGD.targets = 0") + out("UF12"), "targets", "0"),
]


@pytest.mark.parametrize("case", ROWS, ids=lambda c: c.id)
def test_bad_user_attack_is_one_line_and_writes_nothing(case, user_world, monkeypatch, capfd):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing attacks/ must not add __pycache__
    check_row(case, user_world, monkeypatch, capfd)
