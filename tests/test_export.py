"""advews-export: safetensors + config.json, loaded with no pickle, bit-identical logits."""

import json
import os
import pickle

import pytest
import torch

from advews.cli.eval import main as eval_main
from advews.cli.export import main as export_main
from advews.engine.checkpoint import save_checkpoint
from advews.engine.export import load_export
from advews.models import build_model


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    spec = {"arch": "small_preact_resnet", "options": {"widths": [8, 8, 8]}, "num_classes": 10, "in_channels": 1,
            "mean": [0.1307], "std": [0.3081]}
    model = build_model(spec)
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "best.pt"
    save_checkpoint({"format": 1, "epoch": 3, "model": model.state_dict(), "model_spec": spec,
                     "data_spec": {"dataset": "mnist5k"}, "defense": "AT_EWS",
                     "threat_model": {"eps": 0.3, "norm": "Linf"}, "config": "train.defense = 'AT_EWS'"}, str(path))
    return path, model.eval()


def test_round_trip_is_bit_identical_and_needs_no_pickle(checkpoint, tmp_path, monkeypatch, capsys):
    path, model = checkpoint
    out = tmp_path / "export"
    assert export_main([str(path), str(out)]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.gin", "config.json", "model.safetensors"]
    assert (out / "config.gin").read_text() == "train.defense = 'AT_EWS'"  # the recipe stored in the checkpoint
    config = json.loads((out / "config.json").read_text())
    assert config["model_spec"]["arch"] == "small_preact_resnet" and config["defense"] == "AT_EWS"
    assert config["threat_model"] == {"eps": 0.3, "norm": "Linf"} and config["data_spec"]["dataset"] == "mnist5k"
    assert config["model_spec"]["mean"] == [0.1307] and config["advews_version"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("an export must load without unpickling")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    state = load_export(str(out))
    loaded = build_model(state["model_spec"])
    loaded.load_state_dict(state["model"])
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_eval_reads_an_export_like_its_checkpoint(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "export"
    assert export_main([str(path), str(out)]) == 0
    results = []
    for source in (path, out):
        target = tmp_path / f"{source.name}.json"
        assert eval_main(["--checkpoint", str(source), "--attack", "pgd", "--steps", "2", "--n-examples", "32",
                          "--output", str(target)]) == 0
        results.append(json.loads(target.read_text()))
    for key in ("clean_acc", "robust_acc", "eps", "norm", "n_examples"):
        assert results[0][key] == results[1][key]


def test_export_refuses_to_overwrite_and_bad_sources(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "export"
    assert export_main([str(path), str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert export_main([str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds an export" in err[0] and "--force" in err[0]
    assert (out / "model.safetensors").read_bytes() == before
    (out / "model_info.json").write_text("{}")  # an earlier export's: --force leaves nothing of it behind
    assert export_main([str(path), str(out), "--force"]) == 0
    assert not (out / "model_info.json").exists()
    assert export_main([str(tmp_path / "nope.pt"), str(tmp_path / "x")]) == 2
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    assert eval_main(["--checkpoint", str(out), "--n-examples", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("advews-eval: error: cannot read") and "model.safetensors" in err[-1]
