"""End-to-end training on the embedded MNIST-5k: AT beats Standard under attack; resume is bit-exact."""

import json
import os

import torch

from advews.attacks import PGD
from advews.cli.train import main as train_main
from advews.data import load_data
from advews.engine.checkpoint import load_checkpoint
from advews.evaluation.robust import robust_accuracy
from advews.models import build_model

QUICK = [
    "data.dataset = 'mnist5k'",
    "model.arch = 'small_preact_resnet'",
    "optimizer.name = 'adam'",
    "optimizer.lr = 2e-3",
    "optimizer.weight_decay = 0.0",
    "schedule.name = 'constant'",
    "train.batch_size = 64",
    "AT.eps = 0.3",
    "AT.step_size = 0.05",
]


def run(out, *params, resume=False):
    args = ["--quiet", "--output", str(out)]
    for p in QUICK + list(params):
        args += ["--gin-param", p]
    if resume:
        args.append("--resume")
    assert train_main(args) == 0


def load_model(path):
    state = load_checkpoint(path)
    model = build_model(state["model_spec"])
    model.load_state_dict(state["model"])
    return model, state


def test_at_beats_standard_under_attack(tmp_path):
    budget = ["train.epochs = 2", "train.eps_warmup_epochs = 1", "AT.steps = 5", "train.val_steps = 5"]
    run(tmp_path / "at", "train.defense = 'AT'", *budget)
    run(tmp_path / "std", "train.defense = 'Standard'", *budget)
    test = load_data(dataset="mnist5k").test.subset(torch.arange(500))
    attack = PGD(eps=0.3, steps=10, step_size=0.05)
    accs = {}
    for name in ("at", "std"):
        model, _ = load_model(tmp_path / name / "last.pt")
        torch.manual_seed(0)
        accs[name] = robust_accuracy(model, test, attack)
    assert accs["std"]["clean_acc"] > 0.8
    assert accs["at"]["robust_acc"] > accs["std"]["robust_acc"] + 0.2, accs
    rows = [json.loads(line) for line in open(tmp_path / "at" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "val_robust_acc" in rows[-1] and "val_clean_acc" in rows[-1]
    assert os.path.isfile(tmp_path / "at" / "best.pt")
    assert "train.defense = 'AT'" in open(tmp_path / "at" / "config.gin").read()


def test_resume_continues_bit_exactly(tmp_path):
    small = ["train.defense = 'AT'", "AT.steps = 2", "train.val_steps = 2", "data.train_limit = 384",
             "data.val_size = 128", "train.eps_warmup_epochs = 1"]
    run(tmp_path / "straight", "train.epochs = 2", *small)
    run(tmp_path / "split", "train.epochs = 1", *small)
    run(tmp_path / "split", "train.epochs = 2", *small, resume=True)
    a, sa = load_model(tmp_path / "straight" / "last.pt")
    b, sb = load_model(tmp_path / "split" / "last.pt")
    assert sa["epoch"] == sb["epoch"] == 2
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)
    rows = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    straight = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert rows[1]["train_loss"] == straight[1]["train_loss"]


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_ews_resume_restores_controller_exactly(tmp_path):
    small = ["train.defense = 'AT_EWS'", "AT.steps = 2", "train.val_steps = 2", "data.train_limit = 384",
             "data.val_size = 128", "EWS.interval = 2", "EWS.rho = 0.7", "EWS.num_samples = 2"]
    run(tmp_path / "straight", "train.epochs = 2", *small)
    run(tmp_path / "split", "train.epochs = 1", *small)
    first = load_checkpoint(tmp_path / "split" / "last.pt")["defense_state"]
    assert first["search"]["updates"] == 3  # 6 steps per epoch, K = 2
    run(tmp_path / "split", "train.epochs = 2", *small, resume=True)
    sa = load_checkpoint(tmp_path / "straight" / "last.pt")
    sb = load_checkpoint(tmp_path / "split" / "last.pt")
    _assert_same(sa["defense_state"], sb["defense_state"], "defense_state")
    _assert_same(sa["model"], sb["model"], "model")
    search = sa["defense_state"]["search"]
    assert search["updates"] == 6 and search["baseline_ready"]
    rows = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert "train_ews_kl" in rows[-1] and "train_search_baseline" in rows[-1]
