"""advews-eval on a real (tiny) checkpoint: attack numbers, JSON output, npz data, subnet analysis,
and results that survive an unwritable output."""

import json
import os

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


def test_unwritable_output_is_refused_before_any_work(checkpoint, tmp_path, monkeypatch, capsys):
    """An hours-long evaluation must not start when its result could not be written at the end."""
    import advews.engine.checkpoint

    def no_work(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(advews.engine.checkpoint, "load_checkpoint", no_work)
    (tmp_path / "afile").write_text("x")
    for flag, path in (("--output", "afile/r.json"), ("--hdf5", "afile/r.h5"), ("--output", str(tmp_path))):
        target = path if os.path.isabs(path) else str(tmp_path / path)
        assert eval_main(["--checkpoint", str(checkpoint), flag, target, "--force"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"cannot write {flag} {target}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_late_write_failure_saves_the_result_elsewhere(checkpoint, tmp_path, monkeypatch, capsys):
    """If --output and --hdf5 become unwritable during the run, the result goes to a fallback file
    that the one error line names, and the exit code says something went wrong."""
    import advews.api.evaluate as api

    score_attacks = api.score_attacks

    def score_then_lose_the_folder(*args, **kwargs):
        result = score_attacks(*args, **kwargs)
        os.rmdir(tmp_path / "results")
        (tmp_path / "results").write_text("now a file")
        return result

    monkeypatch.setattr(api, "score_attacks", score_then_lose_the_folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    code = eval_main(["--checkpoint", str(checkpoint), "--attack", "fgsm", "--n-examples", "32",
                      "--output", "results/r.json", "--hdf5", "results/r.h5"])
    captured = capsys.readouterr()
    assert code == 2 and "clean acc" in captured.out
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "could not write --output results/r.json" in err, err
    saved = {p.suffix: p for p in tmp_path.glob("advews-eval-*")}
    assert set(saved) == {".json", ".h5"} and all(str(p) in err for p in saved.values())
    res = json.loads(saved[".json"].read_text())
    assert res["n_examples"] == 32 and res["hdf5"] == str(saved[".h5"])
    from advews.evaluation.per_example import load_per_example

    assert len(load_per_example(str(saved[".h5"]))["labels"]) == 32


def test_progress_bars_only_on_a_terminal(checkpoint, monkeypatch, capfd):
    """A batch job's log gets no progress output; a terminal gets bars that vanish when done."""
    import io
    import sys

    from advews.data import ArrayDataset
    from advews.evaluation.robust import correct_flags

    assert eval_main(["--checkpoint", str(checkpoint), "--attack", "fgsm", "--n-examples", "64",
                      "--batch-size", "16"]) == 0
    assert capfd.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    data = ArrayDataset(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    correct_flags(model, data, batch_size=2, desc="clean")
    shown = terminal.getvalue()
    assert "clean" in shown and "/4 " in shown
    assert shown.rstrip(" ").endswith("\r")  # leave=False: the finished bar is erased
