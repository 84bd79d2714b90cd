"""Sharded advews-eval: 2 gloo ranks under torchrun give, per example, the flags of each shard run
alone; --state resumes a killed shard without redoing finished work and with the same flags;
--merge of array-job state files gives the torchrun result; bad shard flags are one line."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from pyautoattack import AutoAttack
from torch import nn

import advews.attacks.pgd as pgd_module
from advews.cli.eval import main as eval_main

HERE = os.path.dirname(os.path.abspath(__file__))
N = 24
ATTACKS = ["--eps", "0.1", "--attack", "pgd,autoattack", "--steps", "3", "--version", "custom",
           "--aa-attacks", "apgd-ce,apgd-t", "--batch-size", "8", "--seed", "3"]


def model() -> nn.Module:
    """A fixed random MLP on 8 x 8 grey images: fast enough for 100-step APGD on the CPU."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """npz files of N images labelled by the model (all correct clean), and of each shard alone."""
    root = tmp_path_factory.mktemp("shards")
    x = torch.randint(0, 256, (N, 8, 8, 1), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        y = model()(x.permute(0, 3, 1, 2).float() / 255).argmax(1)
    for name, part in (("all", slice(0, N)), ("first", slice(0, N // 2)), ("second", slice(N // 2, N))):
        np.savez(root / f"{name}.npz", x=x[part].numpy(), y=y[part].numpy())
    return root


def flags(path) -> dict:
    with h5py.File(path) as f:
        return {"clean": f["clean"][()], **{f"robust/{k}": v[()] for k, v in f["robust"].items()},
                **{f"stages/apgd/{k}": v[()] for k, v in f["stages/autoattack"].items()}}


def cli(data, *args) -> int:
    return eval_main(["--model", "test_sharded_eval:model", "--data", f"npz:{data / args[0]}", *ATTACKS, *args[1:]])


@pytest.fixture(scope="module")
def torchrun(data):
    """2 ranks on the CPU (gloo), one shard each, with --state per shard."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "advews.cli.eval", "--model", "test_sharded_eval:model", "--data", f"npz:{data / 'all.npz'}", *ATTACKS,
           "--state", str(data / "run.json"), "--output", str(data / "ranks.json"), "--hdf5", str(data / "ranks.h5")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((data / "ranks.json").read_text())


def test_two_ranks_equal_each_shard_alone(data, torchrun, monkeypatch):
    monkeypatch.chdir(data)
    out, result = torchrun
    assert out.count("worst case") == 1  # rank 0 reports, once
    for name in ("first", "second"):
        assert cli(data, f"{name}.npz", "--hdf5", str(data / f"{name}.h5")) == 0
    ranks, first, second = flags(data / "ranks.h5"), flags(data / "first.h5"), flags(data / "second.h5")
    for key in ranks:
        assert np.array_equal(ranks[key], np.concatenate([first[key], second[key]])), key
    assert 0 < ranks["robust/autoattack"].sum() < ranks["clean"].sum() == N  # the attacks did something
    assert result["shards"] == {"count": 2, "layout": "contiguous", "ranges": [[0, 12], [12, 24]],
                                "seconds": result["shards"]["seconds"]}
    assert result["robust_acc"] == ranks["robust/autoattack"].__and__(ranks["robust/pgd"]).sum() / N
    assert [s["attack"] for s in result["attacks"]["autoattack"]["stages"]] == ["apgd-ce", "apgd-t"]


def test_merge_of_the_shard_states_gives_the_torchrun_result(data, torchrun, capsys):
    _, result = torchrun
    states = [str(data / f"run.shard{i}of2.json") for i in (1, 0)]  # any order
    assert eval_main(["--merge", *states, "--output", str(data / "merged.json")]) == 0
    merged = json.loads((data / "merged.json").read_text())
    for key in ("clean_acc", "robust_acc", "n_examples", "shards"):
        assert merged[key] == result[key], key
    assert {k: v["robust_acc"] for k, v in merged["attacks"].items()} == \
        {k: v["robust_acc"] for k, v in result["attacks"].items()}
    assert eval_main(["--merge", states[0]]) == 2  # shard 0 missing
    assert "needs each of the 2 shards" in capsys.readouterr().err


def test_killed_shard_resumes_without_redoing_work(data, monkeypatch, tmp_path):
    """Array-job mode: shard 1 of 2 (12 examples, batches of 8) is killed in PGD's second batch, then during AutoAttack's second
    stage; each rerun skips what was saved and the final state equals an uninterrupted run's."""
    monkeypatch.chdir(data)
    shard = ["--shards", "2", "--shard", "1"]
    assert cli(data, "all.npz", *shard, "--state", str(tmp_path / "straight.json")) == 0
    calls = {"pgd": 0, "aa": []}
    perturb, evaluate = pgd_module.PGD.perturb, AutoAttack.run_standard_evaluation

    def pgd_killed_once(self, *a, **k):
        calls["pgd"] += 1
        if calls["pgd"] == 2 and not calls.get("pgd_killed"):
            calls["pgd_killed"] = True
            raise KeyboardInterrupt
        return perturb(self, *a, **k)

    def aa_killed_once(self, *a, **k):
        calls["aa"].append(list(self.attacks_to_run))
        if self.attacks_to_run == ["apgd-t"] and not calls.get("aa_killed"):
            calls["aa_killed"] = True
            raise KeyboardInterrupt
        return evaluate(self, *a, **k)

    monkeypatch.setattr(pgd_module.PGD, "perturb", pgd_killed_once)
    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", aa_killed_once)
    state = str(tmp_path / "killed.json")
    assert cli(data, "all.npz", *shard, "--state", state) == 130  # killed in PGD's batch 2
    assert calls == {"pgd": 2, "aa": [], "pgd_killed": True}
    assert cli(data, "all.npz", *shard, "--state", state) == 130  # killed in apgd-t
    assert calls["pgd"] == 2 + 1 and calls["aa"] == [["apgd-ce"], ["apgd-t"]]  # batch 1 of 2 was not redone
    assert cli(data, "all.npz", *shard, "--state", state) == 0
    assert calls["pgd"] == 3 and calls["aa"] == [["apgd-ce"], ["apgd-t"], ["apgd-t"]]  # apgd-ce not redone
    straight, resumed = (json.loads((tmp_path / f"{f}.shard1of2.json").read_text()) for f in ("straight", "killed"))
    for key in ("clean", "labels", "start", "stop"):
        assert resumed[key] == straight[key], key
    for name in ("pgd", "autoattack"):
        assert resumed["attacks"][name]["robust"] == straight["attacks"][name]["robust"], name
        assert resumed["attacks"][name].get("stages") == straight["attacks"][name].get("stages"), name
    assert resumed["progress"] == {} and (resumed["start"], resumed["stop"]) == (12, 24)


def test_fixed_batches_give_the_same_flags_for_any_number_of_shards(data, tmp_path, monkeypatch):
    """--fixed-batches: 2 array-job shards of whole batches, merged, give exactly the flags of one process
    on all the examples (PGD's random starts reseeded per batch, AutoAttack's cascade kept per batch)."""
    monkeypatch.chdir(tmp_path)
    # 4 batches, shards [0, 12) and [12, 24); with 5 steps of 0.02 in the 0.1 ball, which points PGD
    # breaks depends on the random starts
    fixed = ["--fixed-batches", "--batch-size", "6", "--steps", "5", "--step-size", "0.02"]
    assert cli(data, "all.npz", *fixed, "--hdf5", str(tmp_path / "one.h5"), "--output", str(tmp_path / "one.json")) == 0
    for i in (0, 1):
        shard = ["--shards", "2", "--shard", str(i), "--state", str(tmp_path / "s.json")]
        assert cli(data, "all.npz", *fixed, *shard) == 0
    states = [str(tmp_path / f"s.shard{i}of2.json") for i in (0, 1)]
    merged = ["--hdf5", str(tmp_path / "two.h5"), "--output", str(tmp_path / "two.json")]
    assert eval_main(["--merge", *states, *merged]) == 0
    one, two = flags(tmp_path / "one.h5"), flags(tmp_path / "two.h5")
    assert one.keys() == two.keys()
    for key in one:
        assert np.array_equal(one[key], two[key]), key
    assert 0 < one["robust/autoattack"].sum() < N
    results = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two")]
    assert results[0]["robust_acc"] == results[1]["robust_acc"]
    assert results[1]["shards"]["ranges"] == [[0, 12], [12, 24]]
    assert "whole batches" in results[1]["shards"]["layout"]


def test_fixed_batches_autoattack_attacks_each_batch_alone(monkeypatch):
    """With fixed_batches every pyautoattack call gets the still-robust points of one original batch, in order."""
    from advews.attacks.autoattack import run_autoattack

    calls = []
    evaluate = AutoAttack.run_standard_evaluation

    def record(self, x, y, batch_size=250, **k):
        calls.append((self.attacks_to_run[0], x.clone()))
        return evaluate(self, x, y, batch_size=batch_size, **k)

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", record)
    torch.manual_seed(0)
    x = torch.rand(20, 1, 8, 8)
    with torch.no_grad():
        y = model()(x).argmax(1)
    res = run_autoattack(model(), x, y, eps=0.1, norm="Linf", version="custom", attacks=["apgd-ce", "apgd-t"],
                         batch_size=8, fixed_batches=True)
    batch_of = {bytes(x[i].numpy()): i // 8 for i in range(20)}
    stages = [name for name, _ in calls]
    assert stages == sorted(stages, key=["apgd-ce", "apgd-t"].index) and stages.count("apgd-ce") == 3
    for _, part in calls:  # one batch per call
        assert len({batch_of[bytes(p.numpy())] for p in part}) == 1
    assert 0 < res["robust"].sum() < 20


@pytest.mark.parametrize("flags_, message", [
    (["--shards", "2", "--shard", "2", "--state", "s.json"], "--shard must be in 0..1"),
    (["--shards", "2", "--shard", "0"], "--shards needs --state"),
    (["--shards", "2"], "--shards N and --shard I go together"),
    (["--shards", "2", "--shard", "0", "--state", "s.json", "--output", "o.json"], "--output is written by"),
    (["--shards", "25", "--shard", "0", "--state", "s.json"], "25 shards for 24 examples"),
    (["--shards", "4", "--shard", "0", "--state", "s.json", "--fixed-batches"], "4 shards for 3 batches of 8"),
])
def test_bad_shard_flags_are_one_line(data, tmp_path, monkeypatch, capsys, flags_, message):
    monkeypatch.chdir(tmp_path)
    assert cli(data, "all.npz", *flags_) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_merge_refuses_model_flags_and_foreign_files(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    assert eval_main(["--merge", str(tmp_path / "x.json"), "--eps", "0.1"]) == 2
    assert "--merge takes only --output, --hdf5 and --force" in capsys.readouterr().err
    assert eval_main(["--merge", str(tmp_path / "x.json")]) == 2
    assert "not an advews-eval state file" in capsys.readouterr().err
