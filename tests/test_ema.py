"""EMA of the weights: the update against a hand computation (warm-up, dynamic decay, BN buffers
copied), validation of both models, selection on the EMA (or live), a kill -9 / resume from a
mid-epoch checkpoint that ends bit-exactly, and advews-eval / load_model / advews-export taking the
EMA weights by default."""

import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from advews import load_model
from advews.api.evaluate import evaluate
from advews.engine.checkpoint import load_checkpoint
from advews.engine.ema import EMA, select_weights
from advews.engine.export import export_model
from advews.engine.trainer import Trainer
from advews.errors import AdvewsError

import test_reliability as rel
from test_reliability import one_thread  # noqa: F401  (autouse: one thread, like the compared subprocesses)

EMA_ON = ["train.ema_decay = 0.9", "train.ema_warmup_steps = 2"]


def test_update_matches_a_hand_computation():
    live = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    ema = EMA(live, decay=0.9, warmup_steps=2)
    expected = float(live[0].weight.detach())
    for step in range(1, 40):
        with torch.no_grad():
            live[0].weight.fill_(float(step))
        live(torch.randn(4, 1))  # moves the live BN statistics
        # DM-Improves-AT: decay 0 before warmup_steps, then min(decay, (1 + d) / (10 + d)), d = step - warmup
        decay = 0.0 if step < 2 else min(0.9, (1 + step - 2) / (10 + step - 2))
        expected = decay * expected + (1 - decay) * step
        ema.update(live, step)
        assert ema.decay_at(step) == decay
        assert float(ema.model[0].weight) == pytest.approx(expected, rel=1e-6)
        for name, buffer in live[1].named_buffers():  # BN buffers are copied, not averaged
            assert torch.equal(getattr(ema.model[1], name), buffer), name
    assert ema.decay_at(2) == 0.1 and ema.decay_at(3) == 2 / 11 and ema.decay_at(1000) == 0.9
    assert EMA(live, decay=0.9, dynamic_decay=False).decay_at(1) == 0.9
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())


@pytest.mark.parametrize("binding, needle", [
    ("train.ema_decay = 1.0", "train.ema_decay must be a number in (0, 1)"),
    ("train.ema_warmup_steps = -1", "train.ema_warmup_steps must be >= 0"),
    ("train.select_on = 'best'", "train.select_on must be one of ema, live, got 'best'"),
])
def test_bad_ema_settings_are_one_line(tmp_path, capsys, binding, needle):
    assert rel.train(tmp_path / "run", *rel.TINY, binding) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """An uninterrupted AT_EWS run with EMA (EWS distils from the live model, the EMA stays out)."""
    run = tmp_path_factory.mktemp("ema") / "run"
    assert rel.train(run, *rel.TINY, *rel.EWS, *EMA_ON) == 0
    return run


def test_validation_reports_both_and_selection_uses_the_ema(ema_run):
    rows = rel.metrics(ema_run)
    assert {"val_clean_acc", "val_robust_acc", "val_ema_clean_acc", "val_ema_robust_acc"} <= rows[0].keys()
    last, best = load_checkpoint(ema_run / "last.pt"), load_checkpoint(ema_run / "best.pt")
    assert last["weights"] == best["weights"] == "ema"
    chosen = rows[best["epoch"] - 1]
    assert last["best"] == {"epoch": best["epoch"], "score": chosen["val_ema_robust_acc"]}
    assert best["ema"].keys() == best["model"].keys()
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])


@pytest.mark.parametrize("weights, adversarial, key", [
    ("ema", True, "val_ema_robust_acc"), ("ema", False, "val_ema_clean_acc"), ("live", True, "val_robust_acc")])
def test_selection_metric(weights, adversarial, key):
    row = {"val_clean_acc": 0.1, "val_robust_acc": 0.2, "val_ema_clean_acc": 0.3, "val_ema_robust_acc": 0.4}
    trainer = SimpleNamespace(weights=weights, defense=SimpleNamespace(adversarial=adversarial))
    assert Trainer._selection_metric(trainer, row) == row[key]


def test_select_on_live_and_warmup_longer_than_the_run(tmp_path):
    run = tmp_path / "run"
    assert rel.train(run, *rel.TINY, "train.ema_decay = 0.9", "train.ema_warmup_steps = 100",
                     "train.select_on = 'live'") == 0
    state = load_checkpoint(run / "last.pt")
    assert state["weights"] == "live"
    chosen = rel.metrics(run)[state["best"]["epoch"] - 1]
    assert state["best"]["score"] == chosen["val_robust_acc"]
    for k in state["model"]:  # decay 0 throughout the warm-up: the EMA is the live model, bit for bit
        assert torch.equal(state["ema"][k], state["model"][k]), k


def test_kill9_mid_epoch_then_resume_restores_the_ema_bit_exactly(tmp_path, ema_run):
    """checkpoint_every_steps = 1 saves after every step; the kill lands in the fourth save (the end
    of epoch 1), so the resume starts from the mid-epoch checkpoint after step 3."""
    run = tmp_path / "run"
    params = [*rel.TINY, *rel.EWS, *EMA_ON, "train.checkpoint_every_steps = 1"]
    proc = rel.train_subprocess(run, *params, kill_at="before-rename:last.pt:4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = load_checkpoint(run / "last.pt")
    assert (saved["epoch"], saved["step"]) == (0, 3)
    assert any(not torch.equal(saved["ema"][k], saved["model"][k]) for k in saved["model"])
    assert rel.train(run, *params, resume=True) == 0
    resumed, reference = load_checkpoint(run / "last.pt"), load_checkpoint(ema_run / "last.pt")
    for key in (*rel.COMPARED, "ema", "weights"):
        rel.assert_same(resumed.get(key), reference.get(key), key)
    assert rel.metrics(run) == rel.metrics(ema_run)


def test_eval_load_model_and_export_take_the_ema_by_default(tmp_path, ema_run):
    path = str(ema_run / "last.pt")
    state = load_checkpoint(path)
    model = load_model(path)
    assert model.source["weights"] == "ema"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["ema"][k]), k
    live = load_model(path, weights_from="live")
    assert live.source["weights"] == "live"
    for k, v in live.state_dict().items():
        assert torch.equal(v, state["model"][k]), k

    assert evaluate(path, attacks="none", n_examples=16, device="cpu")["weights"] == "ema"
    assert evaluate(path, attacks="none", n_examples=16, device="cpu", weights_from="live")["weights"] == "live"

    out = tmp_path / "export"
    config = export_model(path, str(out))
    assert config["weights"] == "ema"
    assert json.loads((out / "config.json").read_text())["weights"] == "ema"
    exported = load_model(str(out))
    assert exported.source["weights"] == "ema"
    for k, v in exported.state_dict().items():
        assert torch.equal(v, state["ema"][k]), k
    with pytest.raises(AdvewsError, match="holds no live weights, only ema"):
        load_model(str(out), weights_from="live")


def test_eval_cli_flag_and_checkpoints_without_ema(tmp_path, ema_run, capsys):
    from advews.cli.eval import main as eval_main

    output = tmp_path / "live.json"
    assert eval_main(["--checkpoint", str(ema_run / "last.pt"), "--attack", "none", "--n-examples", "16",
                      "--device", "cpu", "--weights-from", "live", "--output", str(output)]) == 0
    assert "live weights" in capsys.readouterr().out
    plain = {"model": {"w": torch.zeros(1)}, "model_spec": {}}
    assert select_weights(plain, None, "x.pt")[1] == "live"
    with pytest.raises(AdvewsError, match=r"x.pt holds no ema weights \(trained without train.ema_decay\)"):
        select_weights(plain, "ema", "x.pt")
    assert eval_main(["--arch", "preact_resnet18", "--weights", "w.pt", "--weights-from", "ema"]) == 2
    assert "--weights-from picks a checkpoint's EMA or live weights" in capsys.readouterr().err
    assert os.path.isfile(output)
