"""The Python API (advews.train, advews.load_model, advews.evaluate, advews.analyze_subnets) on a
tiny real checkpoint: training returns its last metrics row and equals advews-train bit for bit; each returns what advews-eval --output writes for the same arguments, raises the CLI's
one-line errors as AdvewsError, and ``import advews`` stays torch-free."""

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import advews
from advews.api.options import EvalOptions
from advews.cli.eval import build_parser
from advews.cli.eval import main as eval_main
from advews.cli.export import main as export_main
from advews.cli.train import main as train_main
from advews.engine.checkpoint import load_checkpoint
from advews.models import build_model


PARAMS = ["data.dataset = 'mnist5k'", "model.arch = 'small_preact_resnet'", "optimizer.name = 'adam'",
          "optimizer.lr = 2e-3", "optimizer.weight_decay = 0.0", "schedule.name = 'constant'",
          "train.defense = 'AT'", "train.epochs = 1", "train.batch_size = 64", "AT.eps = 0.3",
          "AT.step_size = 0.1", "AT.steps = 2", "train.val_steps = 2", "data.train_limit = 768",
          "train.eps_warmup_epochs = 1", "data.val_size = 128"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    row = advews.train(bindings=PARAMS, output_dir=str(out), quiet=True)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row == {**logged, "run_dir": str(out)} and row["epoch"] == 1
    return out / "last.pt"


def test_train_equals_the_cli(checkpoint, tmp_path):
    args = ["--quiet", "--output", str(tmp_path / "cli")]
    for p in PARAMS:
        args += ["--gin-param", p]
    assert train_main(args) == 0
    api, cli = load_checkpoint(str(checkpoint)), load_checkpoint(str(tmp_path / "cli" / "last.pt"))
    assert api["model"].keys() == cli["model"].keys()
    assert all(torch.equal(api["model"][k], cli["model"][k]) for k in api["model"])
    with pytest.raises(advews.AdvewsError, match="^--resume needs --output DIR"):
        advews.train(["quickstart.gin"], resume=True)


def untimed(result):
    """A result without its timings and the command line advews-eval records in --output, the only
    entries two identical runs may differ in."""
    if isinstance(result, dict):
        return {k: untimed(v) for k, v in result.items() if k not in ("seconds", "command")}
    if isinstance(result, list):
        return [untimed(v) for v in result]
    return result


def cli_json(args, path):
    assert eval_main(args + ["--output", str(path)]) == 0
    return json.loads(path.read_text())


def test_import_advews_does_not_import_torch():
    code = "import advews, sys; assert 'torch' not in sys.modules; assert 'evaluate' in dir(advews)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluate_returns_the_cli_json(checkpoint, tmp_path):
    cli = cli_json(["--checkpoint", str(checkpoint), "--attack", "pgd,fgsm", "--steps", "2", "--n-examples", "64",
                    "--batch-size", "32"], tmp_path / "cli.json")
    out = tmp_path / "api.json"
    res = advews.evaluate(str(checkpoint), attacks=["pgd", "fgsm"], steps=2, n_examples=64, batch_size=32,
                          output=str(out), device="cpu")
    assert set(res) >= {"checkpoint", "epoch", "attack", "eps", "norm", "clean_acc", "robust_acc", "attacks"}
    assert untimed(res) == untimed(cli) == untimed(json.loads(out.read_text()))
    model = advews.load_model(str(checkpoint))  # a loaded model carries the checkpoint's defaults
    assert untimed(advews.evaluate(model, attacks="pgd,fgsm", steps=2, n_examples=64, batch_size=32)) == untimed(cli)


def test_evaluate_a_zoo_model_like_the_cli(checkpoint, tmp_path):
    state = load_checkpoint(str(checkpoint))
    net = build_model(state["model_spec"])
    net.load_state_dict(state["model"])
    weights = tmp_path / "net.pt"
    torch.save(net.model.state_dict(), weights)
    common = ["--attack", "fgsm", "--eps", "0.3", "--n-examples", "64"]
    cli = cli_json(["--arch", "small_preact_resnet", "--weights", str(weights), "--data", "dataset:mnist5k"] + common,
                   tmp_path / "cli.json")
    model = advews.load_model(arch="small_preact_resnet", weights=str(weights), data="dataset:mnist5k")
    assert model.source == {"arch": "small_preact_resnet", "weights": str(weights), "normalization": "none",
                            "num_classes": 10}
    assert untimed(advews.evaluate(model, "dataset:mnist5k", "fgsm", 0.3, n_examples=64)) == untimed(cli)


def test_checkpoint_and_export_load_to_the_same_model(checkpoint, tmp_path):
    export = tmp_path / "export"
    assert export_main([str(checkpoint), str(export)]) == 0
    from_checkpoint, from_export = advews.load_model(str(checkpoint)), advews.load_model(export)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(from_checkpoint(x), from_export(x))
    for model in (from_checkpoint, from_export):
        assert not model.training
        assert model.threat_model["eps"] == 0.3 and model.threat_model["norm"] == "Linf"
        assert model.data_spec["dataset"] == "mnist5k" and model.image_shape == (1, 28, 28)
    assert from_export.source["checkpoint"] == str(export)


def test_analyze_subnets_returns_the_cli_json(checkpoint, tmp_path):
    flags = ["--rho", "0.5", "--n-subnets", "2", "--search", "random,l1", "--search-updates", "2",
             "--bn-modes", "eval", "--steps", "1", "--n-examples", "32"]
    cli = cli_json(["--checkpoint", str(checkpoint), "--analysis", "subnets"] + flags, tmp_path / "cli.json")
    res = advews.analyze_subnets(str(checkpoint), rho=0.5, n_subnets=2, search=["random", "l1"], search_updates=2,
                                 bn_modes=["eval"], steps=1, n_examples=32, figures=str(tmp_path / "api"))
    assert untimed(res) == untimed(cli) and res["random"]["robust"]["n"] == 2
    assert (tmp_path / "api_fig1.png").is_file() and (tmp_path / "api_fig7.png").is_file()


def test_errors_are_the_cli_lines(checkpoint, tmp_path, capsys):
    model = advews.load_model(str(checkpoint))
    for call, flags in [
        (lambda: advews.evaluate(str(checkpoint), n_examples=0), ["--n-examples", "0"]),
        (lambda: advews.evaluate(model, attacks="laser"), ["--attack", "laser"]),
        (lambda: advews.evaluate(model, aa_attacks="apgd-ce"), ["--aa-attacks", "apgd-ce"]),
        (lambda: advews.evaluate(model, data="csv:foo"), ["--data", "csv:foo"]),
        (lambda: advews.evaluate(str(tmp_path / "nosuch.pt")), None),
        (lambda: advews.analyze_subnets(model, search="random,magic"), ["--analysis", "subnets", "--search",
                                                                         "random,magic"]),
        (lambda: advews.load_model(str(tmp_path / "nosuch.pt")), None),
    ]:
        with pytest.raises(advews.AdvewsError) as caught:
            call()
        message = str(caught.value)
        assert len(message.splitlines()) == 1, message
        argv = ["--checkpoint", str(tmp_path / "nosuch.pt") if flags is None else str(checkpoint)] + (flags or [])
        assert eval_main(argv) == 2
        assert capsys.readouterr().err.strip() == f"advews-eval: error: {message}"
    for call, needle in [
        (lambda: advews.evaluate(model, norm="L3"), "--norm"),
        (lambda: advews.load_model(arch="small_preact_resnet", weights="w.pt"), "--data"),
        (lambda: advews.load_model(str(checkpoint), arch="small_preact_resnet", weights="w.pt"), "exactly one"),
    ]:
        with pytest.raises(advews.AdvewsError, match=needle):
            call()


def test_options_mirror_the_cli_flags():
    """EvalOptions is what the parser fills (same names, same defaults), and its torch-free name
    tables agree with the modules that own them."""
    from advews.api import options
    from advews.attacks.autoattack import AA_ATTACKS, VERSIONS
    from advews.evaluation.corruption_scoring import SPEC_FORMS
    from advews.models.external import NORMALIZATIONS

    parsed = build_parser().parse_args([])
    assert vars(parsed) == dataclasses.asdict(EvalOptions())
    flags = {a.dest for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)}
    assert flags == {f.name for f in dataclasses.fields(EvalOptions)}
    assert (options.AA_ATTACKS, options.VERSIONS) == (AA_ATTACKS, VERSIONS)
    assert options.NORMALIZATION_NAMES == tuple(NORMALIZATIONS) and options.CORRUPTION_SPECS == SPEC_FORMS


def test_help_is_fast_and_does_not_import_torch():
    code = ("import sys\nfrom advews.cli.eval import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--batch-size N" in proc.stdout and "--device" in proc.stdout
