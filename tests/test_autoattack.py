"""The reference AutoAttack through run_autoattack: same numbers as pyautoattack, stages, checks, resume."""

import json
import logging
import re

import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

from advews.attacks.autoattack import run_autoattack
from advews.data import load_data
from advews.errors import AdvewsError

EPS = 0.1
CASCADE = ["apgd-ce", "apgd-t"]


@pytest.fixture(scope="module")
def setup():
    """A quickly trained MNIST MLP (fast enough for 100-step APGD on CPU) and 64 test digits."""
    data = load_data(dataset="mnist5k")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for x, y in data.train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = next(data.test.batches(64))
    return model, x, y


@pytest.fixture(scope="module")
def reference(setup):
    """pyautoattack called directly on the 2-attack custom cascade, with its logged accuracies."""
    model, x, y = setup
    lines = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("auto-attack")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        aa = AutoAttack(model, norm="Linf", eps=EPS, version="custom", attacks=CASCADE, seed=0, device="cpu")
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=32)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    after = {m.group(1).lower(): float(m.group(2)) for line in lines
             if (m := re.match(r"robust accuracy after (\S+): ([\d.]+)%", line))}
    return {"robust": y_adv == y, "after": after}


@pytest.fixture(scope="module")
def ours(setup):
    model, x, y = setup
    lines = []
    res = run_autoattack(model, x, y, eps=EPS, norm="Linf", version="custom", attacks=CASCADE, seed=0,
                         batch_size=32, log=lines.append)
    return res, lines


def test_same_numbers_as_pyautoattack(ours, reference, setup):
    res, lines = ours
    model, x, y = setup
    assert torch.equal(res["robust"], reference["robust"])
    assert res["robust_acc"] == reference["robust"].sum().item() / len(y)
    assert [s["attack"] for s in res["stages"]] == CASCADE
    for stage in res["stages"]:  # the library logs each stage's accuracy with two decimals
        assert round(100 * stage["robust_acc"], 2) == reference["after"][stage["attack"]]
    accs = [res["clean_acc"]] + [s["robust_acc"] for s in res["stages"]]
    assert accs == sorted(accs, reverse=True) and res["robust_acc"] < res["clean_acc"]
    assert torch.equal(res["stage_robust"]["apgd-t"], res["robust"])
    assert not (res["stage_robust"]["apgd-ce"] & ~res["clean"]).any()
    # the library's per-batch progress reaches the log callable; its subset-relative lines do not
    assert any(line.startswith("apgd-ce - 1/") for line in lines)
    assert not any(line.startswith("initial accuracy") for line in lines)
    assert res["warnings"] == [] and logging.getLogger("auto-attack").level == logging.NOTSET


def test_resume_skips_done_stages(ours, setup, tmp_path, monkeypatch):
    model, x, y = setup
    state = tmp_path / "aa.json"
    calls = []
    original = AutoAttack.run_standard_evaluation

    def interrupted(self, *args, **kwargs):
        calls.append(list(self.attacks_to_run))
        if self.attacks_to_run == ["apgd-t"]:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", interrupted)
    kwargs = dict(eps=EPS, norm="Linf", version="custom", attacks=CASCADE, seed=0, batch_size=32,
                  state_path=str(state))
    with pytest.raises(KeyboardInterrupt):
        run_autoattack(model, x, y, **kwargs)
    assert [s["attack"] for s in json.loads(state.read_text())["stages"]] == ["apgd-ce"]

    calls.clear()
    monkeypatch.setattr(AutoAttack, "run_standard_evaluation",
                        lambda self, *a, **k: calls.append(list(self.attacks_to_run)) or original(self, *a, **k))
    res = run_autoattack(model, x, y, **kwargs)
    assert calls == [["apgd-t"]]  # apgd-ce was not rerun
    assert [s["resumed"] for s in res["stages"]] == [True, False]
    full = ours[0]
    assert torch.equal(res["robust"], full["robust"])
    assert [s["robust_acc"] for s in res["stages"]] == [s["robust_acc"] for s in full["stages"]]

    # a state file is never applied to another evaluation
    for change, needle in [({"eps": 0.2}, "eps"), ({"seed": 1}, "seed")]:
        with pytest.raises(AdvewsError, match=needle) as err:
            run_autoattack(model, x, y, **{**kwargs, **change})
        assert "\n" not in str(err.value)
    with pytest.raises(AdvewsError, match="other inputs"):
        run_autoattack(model, x.flip(0), y.flip(0), **kwargs)


def test_sanity_check_warnings_are_reported(setup):
    model, x, y = setup
    probabilities = nn.Sequential(model, nn.Softmax(dim=1))
    res = run_autoattack(probabilities, x[:8], y[:8], eps=EPS, norm="Linf", version="custom",
                         attacks=["apgd-ce"], batch_size=8)
    assert any("probability distribution" in w for w in res["warnings"])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(version="custom"), "apgd-ce"),
    (dict(version="custom", attacks=["apgd-ce", "laser"]), "laser"),
    (dict(version="standard", attacks=["apgd-ce"]), "custom"),
    (dict(version="quick"), "quick"),
    (dict(eps=0.0), "eps"),
])
def test_bad_options_are_one_line_errors(setup, kwargs, needle):
    model, x, y = setup
    with pytest.raises(AdvewsError, match=needle) as err:
        run_autoattack(model, x, y, **{"eps": EPS, "norm": "Linf", **kwargs})
    assert "\n" not in str(err.value)


def _linear(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, classes)).eval()


def test_targeted_attacks_use_at_most_classes_minus_one_targets():
    """fra31/auto-attack#110: pyautoattack's 9 targets fail below 10 classes; advews uses min(9, C - 1)."""
    from advews.attacks.autoattack import run_autoattack

    model = _linear(5)
    x = torch.rand(6, 1, 4, 4)
    y = model(x).argmax(1)
    res = run_autoattack(model, x, y, eps=0.05, norm="Linf", version="custom", attacks=["apgd-t", "fab-t"],
                         batch_size=6)
    assert [s["attack"] for s in res["stages"]] == ["apgd-t", "fab-t"] and res["clean_acc"] == 1.0


@pytest.mark.parametrize("classes, cascade, needle", [(3, None, "apgd-t need at least 4 classes"),
                                                      (2, ["apgd-dlr"], "apgd-dlr need at least 3 classes")])
def test_dlr_below_its_class_count_is_refused(classes, cascade, needle):
    from advews.attacks.autoattack import run_autoattack

    model = _linear(classes)
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(AdvewsError, match=needle):
        run_autoattack(model, x, model(x).argmax(1), eps=0.05, norm="Linf",
                       version="custom" if cascade else "standard", attacks=cascade, batch_size=4)


def test_randomized_model_needs_the_rand_version():
    from advews.attacks.autoattack import run_autoattack

    inner = _linear(10)
    noisy = torch.nn.Sequential(_Noise(), inner).eval()
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(AdvewsError, match="randomized.*--version rand"):
        run_autoattack(noisy, x, inner(x).argmax(1), eps=0.05, norm="Linf", batch_size=4)


class _Noise(torch.nn.Module):
    def forward(self, x):
        return (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
