"""torchattacks attacks by name, and advews-eval over several attacks: per-point worst case, HDF5,
AutoAttack through the CLI."""

import json

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from advews.attacks.zoo import CW, ZOO, build_zoo_attack
from advews.cli.eval import main as eval_main
from advews.data import load_data
from advews.engine.checkpoint import save_checkpoint
from advews.errors import AdvewsError
from advews.evaluation.per_example import load_per_example
from advews.models import ARCHITECTURES, build_model

SPEC = {"arch": "tiny_mlp", "options": {}, "num_classes": 10, "in_channels": 1}


def tiny_mlp(num_classes: int, in_channels: int) -> nn.Module:
    """An MNIST MLP: 100-step APGD on 64 digits takes well under a second on one CPU thread."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, 64), nn.ReLU(), nn.Linear(64, num_classes))


@pytest.fixture(autouse=True)
def _tiny_arch(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "tiny_mlp", tiny_mlp)


@pytest.fixture(scope="module")
def trained():
    """One epoch of plain training on MNIST-5k: about 89% clean, far from robust at eps 0.1."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ARCHITECTURES, "tiny_mlp", tiny_mlp)
        torch.manual_seed(0)
        model = build_model(SPEC)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for x, y in load_data(dataset="mnist5k").train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint({"model_spec": SPEC, "model": trained.state_dict(), "epoch": 1,
                     "threat_model": {"eps": 0.1, "norm": "Linf"}, "data_spec": {"dataset": "mnist5k"}}, str(path))
    return path


@pytest.fixture(scope="module")
def digits():
    return next(load_data(dataset="mnist5k").test.batches(64))


@pytest.mark.parametrize("make, norm, eps", [
    (lambda: build_zoo_attack("mifgsm", eps=0.1, norm="Linf"), "Linf", 0.1),
    (lambda: build_zoo_attack("apgd-dlr", eps=1.5, norm="L2", steps=10), "L2", 1.5),
    (lambda: CW(eps=1.5, norm="L2", c=10.0), "L2", 1.5),  # torchattacks' default c=1 is weak here
], ids=["mifgsm", "apgd-dlr", "cw"])
def test_zoo_attack_lowers_accuracy_inside_the_ball(trained, digits, make, norm, eps):
    x, y = digits
    trained.train()
    attack = make()
    x_adv = attack(trained, x, y)
    assert trained.training  # the model's mode is restored
    trained.eval()
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    with torch.no_grad():
        clean, adv = (trained(x).argmax(1) == y).float().mean(), (trained(x_adv).argmax(1) == y).float().mean()
    assert adv < clean - 0.1


def test_unknown_or_unsupported_attacks_are_one_line_errors(checkpoint, capsys):
    with pytest.raises(AdvewsError, match="deepfool"):
        build_zoo_attack("deepfool", eps=0.1)
    with pytest.raises(AdvewsError, match="Linf only"):
        build_zoo_attack("mifgsm", eps=1.0, norm="L2")
    for args, needles in [
        (["--attack", "pgd,laser"], ["laser", "autoattack", "mifgsm"]),
        (["--attack", "pgd,pgd"], ["twice"]),
        (["--attack", "none,pgd"], ["none"]),
        (["--attack", "autoattack", "--version", "custom"], ["--aa-attacks"]),
        (["--attack", "autoattack", "--aa-attacks", "apgd-ce"], ["--version custom"]),
        (["--attack", "autoattack", "--version", "custom", "--aa-attacks", "apgd-ce,zap"], ["zap"]),
        (["--attack", "pgd", "--version", "fast"], ["autoattack"]),
    ]:
        assert eval_main(["--checkpoint", str(checkpoint)] + args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert set(ZOO) >= {"cw", "apgd-ce", "apgd-dlr", "square", "fab", "mifgsm"}


def test_worst_case_over_attacks_with_hdf5(checkpoint, tmp_path, capsys):
    out, h5 = tmp_path / "res.json", tmp_path / "flags.h5"
    assert eval_main(["--checkpoint", str(checkpoint), "--attack", "pgd,fgsm,apgd-ce", "--steps", "10",
                      "--n-examples", "64", "--output", str(out), "--hdf5", str(h5)]) == 0
    table = capsys.readouterr().out
    assert "worst case" in table and "apgd-ce" in table
    res = json.loads(out.read_text())
    per_attack = {name: entry["robust_acc"] for name, entry in res["attacks"].items()}
    assert list(per_attack) == ["pgd", "fgsm", "apgd-ce"] and res["eps"] == 0.1
    assert all(res["robust_acc"] <= acc <= res["clean_acc"] for acc in per_attack.values())
    assert res["robust_acc"] < res["clean_acc"]
    assert res["attacks"]["pgd"]["steps"] == 10 and res["attacks"]["apgd-ce"]["loss"] == "ce"

    flags = load_per_example(str(h5))
    assert len(flags["labels"]) == len(flags["clean"]) == 64
    assert flags["clean"].float().mean().item() == res["clean_acc"]
    both = flags["robust"]["pgd"] & flags["robust"]["fgsm"] & flags["robust"]["apgd-ce"]
    assert torch.equal(both, flags["worst_case"])
    assert both.sum().item() / 64 == res["robust_acc"]
    for name, acc in per_attack.items():
        assert flags["robust"][name].sum().item() / 64 == acc
        assert not (flags["robust"][name] & ~flags["clean"]).any()
    assert flags["params"]["pgd"]["steps"] == 10

    # every attack starts from --seed: pgd alone gives the same number as pgd in the list
    alone = tmp_path / "alone.json"
    assert eval_main(["--checkpoint", str(checkpoint), "--attack", "pgd", "--steps", "10", "--n-examples", "64",
                      "--output", str(alone)]) == 0
    assert json.loads(alone.read_text())["robust_acc"] == per_attack["pgd"]


def test_cli_autoattack_matches_pyautoattack(checkpoint, trained, digits, tmp_path):
    out, h5, state = tmp_path / "aa.json", tmp_path / "aa.h5", tmp_path / "aa_state.json"
    args = ["--checkpoint", str(checkpoint), "--attack", "autoattack,fgsm", "--version", "custom",
            "--aa-attacks", "apgd-ce", "--n-examples", "64", "--batch-size", "32", "--state", str(state)]
    assert eval_main(args + ["--output", str(out), "--hdf5", str(h5)]) == 0
    res = json.loads(out.read_text())
    entry = res["attacks"]["autoattack"]

    x, y = digits
    aa = AutoAttack(trained.eval(), norm="Linf", eps=0.1, version="custom", attacks=["apgd-ce"], seed=0, device="cpu")
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=32)
    assert entry["robust_acc"] == (y_adv == y).sum().item() / 64
    assert [s["attack"] for s in entry["stages"]] == ["apgd-ce"] and entry["version"] == "custom"
    assert res["robust_acc"] <= min(entry["robust_acc"], res["attacks"]["fgsm"]["robust_acc"])
    flags = load_per_example(str(h5))
    assert torch.equal(flags["stages"]["autoattack"]["apgd-ce"], flags["robust"]["autoattack"])
    assert torch.equal(flags["robust"]["autoattack"], y_adv == y)

    # the finished state makes a rerun skip the cascade (AutoAttack is never called) and report the same numbers
    again = tmp_path / "again.json"
    import advews.attacks.autoattack as aa_module

    def never(*args, **kwargs):
        raise AssertionError("AutoAttack ran again although --state holds its finished result")

    original, aa_module.run_autoattack = aa_module.run_autoattack, never
    try:
        assert eval_main(args + ["--output", str(again)]) == 0
    finally:
        aa_module.run_autoattack = original
    rerun = json.loads(again.read_text())["attacks"]["autoattack"]
    assert rerun["robust_acc"] == entry["robust_acc"] and rerun["stages"] == entry["stages"]
