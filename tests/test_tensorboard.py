"""train.tensorboard: event files that hold the run's metrics.jsonl values, and a one-line error
naming the extra when the package is missing."""

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from advews.cli.train import main as train_main

QUICK = ["data.dataset = 'mnist5k'", "model.arch = 'small_preact_resnet'", "model.options = {'widths': [8, 8, 8]}",
         "optimizer.name = 'adam'", "optimizer.lr = 2e-3", "schedule.name = 'constant'", "train.defense = 'AT_EWS'",
         "train.epochs = 2", "train.batch_size = 64", "AT.eps = 0.3", "AT.step_size = 0.1", "AT.steps = 2",
         "train.val_steps = 2", "data.train_limit = 256", "data.val_size = 64", "EWS.interval = 1"]


def args(out, *extra):
    a = ["--quiet", "--output", str(out)]
    for p in QUICK + list(extra):
        a += ["--gin-param", p]
    return a


def test_event_files_hold_the_metrics(tmp_path):
    out = tmp_path / "run"
    assert train_main(args(out, "train.tensorboard = True", "train.log_every = 2")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in ("val_clean_acc", "val_robust_acc", "train_loss", "train_ews_kl", "lr"):
        values = [(e.step, e.value) for e in events.Scalars(f"epoch/{key}")]
        assert values == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    steps = [e.step for e in events.Scalars("step/loss")]
    assert steps == list(range(2, 2 * 4 + 1, 2))  # 4 steps an epoch (256 / 64), every 2nd
    assert "step/ews_kl" in tags and "step/search_subnet_acc" in tags


def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    out = tmp_path / "run"
    assert train_main(args(out, "train.tensorboard = True")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["advews-train: error: train.tensorboard = True needs the tensorboard package: "
                   "pip install 'advews[tensorboard]'"]
    assert not out.exists()
