"""advews-eval on a real (tiny) checkpoint: attack numbers, JSON output, npz data, subnet analysis."""

import json

import numpy as np
import pytest
import torch

from advews.cli.eval import main as eval_main
from advews.cli.train import main as train_main
from advews.data import load_data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    params = ["data.dataset = 'mnist5k'", "model.arch = 'small_preact_resnet'", "optimizer.name = 'adam'",
              "optimizer.lr = 2e-3", "optimizer.weight_decay = 0.0", "schedule.name = 'constant'",
              "train.defense = 'AT'", "train.epochs = 1", "train.batch_size = 64", "AT.eps = 0.3",
              "AT.step_size = 0.1", "AT.steps = 3", "train.val_steps = 3", "data.train_limit = 1536",
              "train.eps_warmup_epochs = 1",
              "data.val_size = 256"]
    args = ["--quiet", "--output", str(out)]
    for p in params:
        args += ["--gin-param", p]
    assert train_main(args) == 0
    return out / "last.pt"


def test_pgd_eval_reports_and_writes_json(checkpoint, tmp_path, capsys):
    res_path = tmp_path / "res.json"
    code = eval_main(["--checkpoint", str(checkpoint), "--attack", "pgd", "--steps", "5",
                      "--n-examples", "200", "--output", str(res_path)])
    assert code == 0
    assert "robust acc" in capsys.readouterr().out
    res = json.loads(res_path.read_text())
    assert res["attack"] == "pgd" and res["eps"] == 0.3 and res["steps"] == 5 and res["n_examples"] == 200
    assert 0.3 < res["clean_acc"] and res["robust_acc"] < res["clean_acc"]
    # the JSON is never overwritten silently
    assert eval_main(["--checkpoint", str(checkpoint), "--attack", "none", "--output", str(res_path)]) == 2
    assert json.loads(res_path.read_text()) == res


def test_eval_on_user_npz(checkpoint, tmp_path):
    test = load_data(dataset="mnist5k").test
    x = test.images[:100].permute(0, 2, 3, 1).numpy()
    y = test.labels[:100].numpy()
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    out = tmp_path / "npz.json"
    assert eval_main(["--checkpoint", str(checkpoint), "--attack", "fgsm", "--data", f"npz:{tmp_path / 'mine.npz'}",
                      "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    ref = tmp_path / "ref.json"
    assert eval_main(["--checkpoint", str(checkpoint), "--attack", "fgsm", "--n-examples", "100",
                      "--output", str(ref)]) == 0
    assert res["n_examples"] == 100 and res["clean_acc"] == json.loads(ref.read_text())["clean_acc"]


def test_bad_eval_arguments(checkpoint, tmp_path, capsys):
    for args, needle in [
        (["--attack", "pgd", "--eps", "-1"], "eps"),
        (["--attack", "pgd", "--steps", "0"], "steps"),
        (["--attack", "laser"], "laser"),
        (["--data", "csv:foo"], "csv:foo"),
        (["--data", f"npz:{tmp_path / 'nothing.npz'}"], "nothing.npz"),
        (["--analysis", "subnets", "--search", "random,magic"], "magic"),
    ]:
        assert eval_main(["--checkpoint", str(checkpoint)] + args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_subnet_analysis_json(checkpoint, tmp_path):
    out = tmp_path / "analysis.json"
    code = eval_main(["--checkpoint", str(checkpoint), "--analysis", "subnets", "--rho", "0.5",
                      "--n-subnets", "4", "--search-updates", "3", "--steps", "3", "--n-examples", "128",
                      "--output", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("full", "random", "controller", "l1"):
        for kind in ("clean", "robust"):
            stats = res[key][kind]
            assert set(stats) >= {"mean", "p10", "median", "p90"}
            assert stats["p10"] <= stats["median"] <= stats["p90"]
    assert res["bn_train"]["random"]["robust"]["n"] == 4
    # rho 0.5 subnets of a barely trained net are much weaker than the full net
    assert res["random"]["clean"]["mean"] < res["full"]["clean"]["mean"]
