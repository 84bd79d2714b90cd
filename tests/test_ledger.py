"""The compute ledger (engine.ledger): FLOPs of one training iteration against a hand count, EWS's
FLOP ratio over vanilla against its analytic floor, a measurement that changes nothing, the ledger
in metrics.jsonl and across --resume, the attacks' passes and FLOPs in advews-eval's JSON, and
advews-report's cost columns and cost to reach a val robust accuracy."""

from __future__ import annotations

import csv
import io
import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from advews import load_model
from advews.api.eval_state import read_state, write_state
from advews.api.evaluate import evaluate
from advews.cli.eval import main as eval_main
from advews.cli.report import main as report_main
from advews.cli.train import main as train_main
from advews.defenses import DEFENSES
from advews.engine.ledger import AttackCost, FlopCounter, Ledger, measure_iteration, untouched_rng
from advews.engine.precision import Precision
from advews.models import build_model

B, I, H, O = 8, 12, 5, 3  # batch, inputs (3x2x2), hidden, classes
CPU = Precision("none", torch.device("cpu"))


def two_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(I, H), nn.ReLU(), nn.Linear(H, O))


def batch(shape=(3, 2, 2), n=B, classes=O):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def at(steps: int, ews: bool = False, **extra):
    name = "AT_EWS" if ews else "AT"
    return DEFENSES[name](eps=0.1, step_size=0.05, steps=steps, final_forward=False, **extra)


def test_standard_and_at_iterations_match_a_hand_count():
    x, y = batch()
    fwd = 2 * B * (I * H + H * O)  # one forward: 2 FLOPs per multiply-add of each Linear
    # training backward: both weight gradients, and the input gradient of the second Linear only
    train = fwd + 2 * B * I * H + 2 * B * H * O * 2
    # an attack step's backward: input gradients of both Linears (towards x), no weight gradients
    attack_step = fwd + 2 * B * (I * H + H * O)
    std = measure_iteration(two_linear(), DEFENSES["Standard"](), CPU, x, y)
    assert (std.flops, std.forward, std.backward) == (train, 1, 1)
    for k in (1, 3):
        cost = measure_iteration(two_linear(), at(k), CPU, x, y)
        assert (cost.flops, cost.forward, cost.backward) == (k * attack_step + train, k + 1, k + 1)


def test_ews_flop_ratio_over_vanilla_sits_on_its_analytic_floor():
    """EWS zeroes subnet channels, so its subnet step costs one full forward and backward (the floor
    1 + F_train / F_AT); it samples a subnet from the controller each step, and every K steps the
    controller scores num_samples subnets (forwards only) and takes its own update."""
    spec = {"arch": "small_preact_resnet", "options": {"widths": (4, 8, 8)}, "num_classes": 10, "in_channels": 1}
    x, y = batch((1, 12, 12), classes=10)
    k, interval, samples = 2, 2, 3

    def cost(defense):
        torch.manual_seed(0)
        model = build_model(spec).train()
        defense.setup(model)
        return measure_iteration(model, defense, CPU, x, y)

    vanilla, std = cost(at(k)), cost(DEFENSES["Standard"]())
    ews = at(k, ews=True, interval=interval, num_samples=samples)
    ews.setup(build_model(spec))
    with FlopCounter() as sample:
        ews.search.sample()
    with FlopCounter() as update:
        ews.search.update(lambda subnets: torch.rand(len(subnets)))
    measured = cost(ews)
    forward = AttackCost(build_model(spec), x).forward_flops * B
    floor = 1 + std.flops / vanilla.flops
    extra = sample.get_total_flops() + (samples * forward + update.get_total_flops()) / interval
    assert measured.forward == vanilla.forward + 1 + samples / interval
    assert measured.backward == vanilla.backward + 1
    assert floor < measured.flops / vanilla.flops == pytest.approx(floor + extra / vanilla.flops, rel=1e-9)


def test_measuring_changes_no_weight_state_or_random_stream():
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "options": {"widths": (4, 8, 8)}, "num_classes": 10,
                         "in_channels": 1}).train()
    defense = at(1, ews=True, interval=3)
    defense.setup(model)
    x, y = batch((1, 12, 12), classes=10)
    before = ({k: v.clone() for k, v in model.state_dict().items()}, repr(defense.state_dict()))
    streams = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with untouched_rng(x.device):
        measure_iteration(model, defense, CPU, x, y)
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())
    assert repr(defense.state_dict()) == before[1] and defense.iteration == 0
    assert torch.equal(torch.get_rng_state(), streams[0]) and random.getstate() == streams[1]
    assert (np.random.get_state()[1] == streams[2]).all()


def test_unfinished_epoch_seconds_carry_over_a_saved_state(monkeypatch):
    clock = iter([100.0, 130.0])
    monkeypatch.setattr("advews.engine.ledger.time.time", lambda: next(clock))
    ledger = Ledger(world=2)
    ledger.begin_epoch()
    saved = ledger.state_dict()  # a mid-epoch checkpoint 30 s in
    assert saved == {"pflops": 0.0, "device_seconds": 0.0, "examples": 0, "epoch_seconds": 30.0}
    resumed = Ledger(world=2)
    resumed.load_state_dict(saved)
    resumed.cost = measure_iteration(two_linear(), DEFENSES["Standard"](), CPU, *batch())
    row = resumed.end_epoch(steps=4, batch_size=B, train_seconds=10.0)
    assert row["device_seconds"] == row["device_seconds_total"] == 80.0  # (30 + 10) s x 2 ranks
    assert row["examples_total"] == 4 * B and row["pflops"] == 4 * resumed.cost.flops * 2 / 1e15


TINY = ["data.train_limit = 128", "data.val_size = 64", "AT.steps = 1", "train.val_steps = 1",
        "model.options = {'widths': (8, 16, 16)}"]


def train(out, epochs, resume=False):
    argv = ["--gin", "quickstart.gin", "--quiet", "--output", str(out)]
    for p in TINY + [f"train.epochs = {epochs}"]:
        argv += ["--gin-param", p]
    assert train_main(argv + (["--resume"] if resume else [])) == 0
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger") / "run"
    return str(out), train(out, 1)


def test_metrics_rows_carry_the_ledger_and_its_totals_continue_across_resume(run):
    out, (first,) = run
    assert (first["forward_passes"], first["backward_passes"]) == (2, 2)  # PGD-1 + the training step
    assert first["examples"] == first["examples_total"] == 128
    assert first["pflops"] == first["pflops_total"] > 0
    assert first["device_seconds"] == pytest.approx(first["train_time"])
    rows = train(out, 2, resume=True)
    assert rows[0] == first
    assert rows[1]["examples_total"] == 256 and rows[1]["pflops"] == first["pflops"]
    assert rows[1]["pflops_total"] == pytest.approx(2 * first["pflops"], rel=1e-12)
    assert rows[1]["device_seconds_total"] == pytest.approx(first["device_seconds"] + rows[1]["device_seconds"])


def test_eval_json_records_each_attacks_passes_and_flops(run):
    out, _ = run
    n, steps = 8, 3
    result = evaluate(os.path.join(out, "last.pt"), attacks="pgd,fgsm", steps=steps, n_examples=n, device="cpu")
    pgd, fgsm = result["attacks"]["pgd"], result["attacks"]["fgsm"]
    # per example: the clean prediction, each step's forward and backward, the adversarial prediction
    assert (pgd["forward_passes"], pgd["backward_passes"]) == (steps + 2, steps)
    assert (fgsm["forward_passes"], fgsm["backward_passes"]) == (3, 1)
    cost = AttackCost(load_model(os.path.join(out, "last.pt")), torch.rand(1, 1, 28, 28))
    assert cost.forward_flops > 0 and cost.backward_flops > 0
    assert pgd["flops"] == n * ((steps + 2) * cost.forward_flops + steps * cost.backward_flops)


def write_ledger_run(root, name, seed, robust, pflops):
    """A run directory whose metrics.jsonl carries a ledger with known numbers."""
    from test_report import make_run

    d = make_run(root, name, seed)
    rows = [{"epoch": e + 1, "val_clean_acc": 0.9, "val_robust_acc": r, "pflops_total": p,
             "device_seconds_total": 3600.0 * (e + 1), "forward_passes": 11, "backward_passes": 11}
            for e, (r, p) in enumerate(zip(robust, pflops))]
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return d


def test_report_cost_columns_and_cost_to_reach(tmp_path, capsys):
    runs = [write_ledger_run(tmp_path, "a0", 0, (0.2, 0.5, 0.6), (1.0, 2.0, 3.0)),
            write_ledger_run(tmp_path, "a1", 1, (0.3, 0.4, 0.55), (1.5, 3.0, 4.5))]
    assert report_main([*runs, "--cost-to", "50", "--format", "csv"]) == 0
    header, row = list(csv.reader(io.StringIO(capsys.readouterr().out)))[:2]
    cells = dict(zip(header, row))
    assert (cells["PFLOPs"], cells["device_hours"], cells["passes/example"]) == ("3.75 ± 1.1", "3 ± 0", "22 ± 0")
    assert cells["epoch_to_50%"] == "2.5 ± 0.71" and cells["PFLOPs_to_50%"] == "3.25 ± 1.8"
    assert report_main([*runs, "--cost-to", "60"]) == 0
    out = capsys.readouterr().out
    assert "| 3 (n=1); 1 not reached | 3 (n=1); 1 not reached |" in out and "PFLOPs_to_60%" in out
    assert report_main([*runs, "--cost-to", "99"]) == 0
    assert "| not reached | not reached |" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["abc", "0", "150", "nan"])
def test_bad_cost_to_is_one_line(value, tmp_path, capfd):
    run_dir = write_ledger_run(tmp_path, "r", 0, (0.5,), (1.0,))
    assert report_main([run_dir, "--cost-to", value]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--cost-to {value!r}" in err[0] and "(0, 100]" in err[0]


def test_sharded_evaluation_merges_passes_and_flops_and_a_resumed_attack_has_none(run, tmp_path):
    """Shards count their own passes; the merge weighs them by shard size and sums the FLOPs, so a
    sharded evaluation records what an unsharded one does. An attack resumed mid-way (its first part
    ran in another process) records no count rather than a partial one."""
    out, _ = run
    common = ["--checkpoint", os.path.join(out, "last.pt"), "--attack", "pgd", "--steps", "2", "--n-examples", "12",
              "--batch-size", "4", "--device", "cpu"]
    whole = tmp_path / "whole.json"
    assert eval_main(common + ["--output", str(whole)]) == 0
    for shard in (0, 1):
        assert eval_main(common + ["--shards", "2", "--shard", str(shard), "--state", str(tmp_path / "s.json")]) == 0
    merged = tmp_path / "merged.json"
    assert eval_main(["--merge", str(tmp_path / "s.shard0of2.json"), str(tmp_path / "s.shard1of2.json"),
                      "--output", str(merged)]) == 0
    a, b = (json.loads(p.read_text())["attacks"]["pgd"] for p in (whole, merged))
    assert (b["forward_passes"], b["backward_passes"]) == (a["forward_passes"], a["backward_passes"]) == (4, 2)
    assert b["flops"] == pytest.approx(a["flops"], rel=1e-12)
    state = read_state(str(tmp_path / "s.shard1of2.json"))
    for key in ("forward_passes", "backward_passes", "flops"):  # what a shard resumed mid-attack records
        del state["attacks"]["pgd"]["entry"][key]
    write_state(str(tmp_path / "s.shard1of2.json"), state)
    assert eval_main(["--merge", str(tmp_path / "s.shard0of2.json"), str(tmp_path / "s.shard1of2.json"),
                      "--output", str(merged), "--force"]) == 0
    assert "forward_passes" not in json.loads(merged.read_text())["attacks"]["pgd"]  # no partial count
