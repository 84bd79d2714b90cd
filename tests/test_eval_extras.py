"""advews-eval beyond attacks: generated corruptions and their cache, models trained elsewhere, and the
subnet analysis' figures and fast scoring (whose numbers must equal a plain per-batch evaluation)."""

import json
import os

import numpy as np
import pytest
import torch

import advews.evaluation.generated_corruptions as generated
from advews.cli.eval import main as eval_main
from advews.cli.train import main as train_main
from advews.engine.checkpoint import load_checkpoint
from advews.evaluation.subnet_analysis import analyze_subnets
from advews.models import build_model
from advews.subnets import random_subnet, set_bn_mode, space_of, subnet

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    params = ["data.dataset = 'mnist5k'", "model.arch = 'small_preact_resnet'", "optimizer.name = 'adam'",
              "optimizer.lr = 2e-3", "optimizer.weight_decay = 0.0", "schedule.name = 'constant'",
              "train.defense = 'AT'", "train.epochs = 1", "train.batch_size = 64", "AT.eps = 0.3",
              "AT.step_size = 0.1", "AT.steps = 2", "train.val_steps = 2", "data.train_limit = 768",
              "train.eps_warmup_epochs = 1", "data.val_size = 128"]
    args = ["--quiet", "--output", str(out)]
    for p in params:
        args += ["--gin-param", p]
    assert train_main(args) == 0
    return out / "last.pt"


@pytest.fixture(scope="module")
def weights(checkpoint, tmp_path_factory):
    """The checkpoint's inner net as a plain state_dict, as a model trained elsewhere comes."""
    state = load_checkpoint(str(checkpoint))
    model = build_model(state["model_spec"])
    model.load_state_dict(state["model"])
    path = tmp_path_factory.mktemp("weights") / "net.pt"
    torch.save(model.model.state_dict(), path)
    return path


def run_json(args, path):
    assert eval_main(args + ["--output", str(path)]) == 0
    return json.loads(path.read_text())


def test_generated_corruptions_json_and_cache(checkpoint, tmp_path, monkeypatch, capsys):
    base = ["--checkpoint", str(checkpoint), "--corruptions", "generated:gaussian_noise,contrast", "--n-examples", "64"]
    first = run_json(base, tmp_path / "a.json")
    assert "contrast" in capsys.readouterr().out
    # --corruptions alone skips the attacks; clean accuracy is still reported
    assert first["attack"] == "none" and first["robust_acc"] is None and 0 < first["clean_acc"] <= 1
    res = first["corruptions"]
    assert res["benchmark"] == "generated" and res["n_examples"] == 2 * 5 * 64
    for name in ("gaussian_noise", "contrast"):
        errors = res["corruptions"][name]["errors"]
        assert sorted(errors) == ["1", "2", "3", "4", "5"] and all(0 <= e <= 1 for e in errors.values())
    cache_dir = checkpoint.parent / "corruption_cache"  # the default: next to the checkpoint
    (cache,) = cache_dir.iterdir()
    assert res["source"] == str(cache)
    mtime = cache.stat().st_mtime_ns

    def no_generation(*args, **kwargs):
        raise AssertionError("the second run must read the cache, not corrupt images again")

    monkeypatch.setattr(generated, "_corrupt_all", no_generation)
    second = run_json(base + ["--attack", "fgsm"], tmp_path / "b.json")
    assert cache.stat().st_mtime_ns == mtime
    assert second["corruptions"] == first["corruptions"] and second["attacks"]["fgsm"]["robust_acc"] is not None


def test_external_weights_and_module_match_the_checkpoint(checkpoint, weights, tmp_path, monkeypatch):
    common = ["--attack", "fgsm", "--n-examples", "128"]
    ref = run_json(["--checkpoint", str(checkpoint)] + common, tmp_path / "ref.json")
    ext = run_json(["--arch", "small_preact_resnet", "--weights", str(weights), "--data", "dataset:mnist5k",
                    "--eps", "0.3"] + common, tmp_path / "ext.json")
    assert ext["normalization"] == "none" and ext["num_classes"] == 10  # taken from dataset:mnist5k
    assert (ext["clean_acc"], ext["robust_acc"]) == (ref["clean_acc"], ref["robust_acc"])
    (tmp_path / "my_net.py").write_text(
        "import torch\nfrom advews.models.external import load_external\n\n\ndef build():\n"
        f"    return load_external('small_preact_resnet', {str(weights)!r}, in_channels=1, normalization='none')\n")
    monkeypatch.chdir(tmp_path)  # --model imports from the current directory
    mod = run_json(["--model", "my_net:build", "--data", "dataset:mnist5k", "--eps", "0.3"] + common,
                   tmp_path / "mod.json")
    assert mod["model"] == "my_net:build" and mod["clean_acc"] == ref["clean_acc"]


def test_model_source_errors_are_one_line(checkpoint, weights, tmp_path, capsys):
    arch = ["--arch", "small_preact_resnet", "--weights", str(weights)]
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 28, 28, 1), np.uint8), y=np.zeros(4, np.int64))
    for args, needle in [
        (arch + ["--data", "dataset:mnist5k"], "--eps"),
        (arch + ["--attack", "none"], "--data"),
        (arch + ["--data", f"npz:{tmp_path / 'x.npz'}", "--attack", "none"], "--normalization"),
        (["--checkpoint", str(checkpoint), "--model", "my_net:build"], "exactly one"),
        (["--attack", "none"], "exactly one"),
        (["--arch", "small_preact_resnet"], "--weights"),
        (["--checkpoint", str(checkpoint), "--num-classes", "10"], "--num-classes"),
        (["--checkpoint", str(checkpoint), "--corruptions", "cifar10-c"], "cifar10-c"),
        (["--checkpoint", str(checkpoint), "--analysis", "subnets", "--bn-modes", "eval,test"], "test"),
    ]:
        assert eval_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (args, err)


def test_subnet_analysis_writes_both_figures(checkpoint, tmp_path, capsys):
    out = tmp_path / "figs" / "an.json"
    res = run_json(["--checkpoint", str(checkpoint), "--analysis", "subnets", "--rho", "0.5", "--n-subnets", "3",
                    "--search", "random,l1", "--bn-modes", "eval", "--steps", "2", "--n-examples", "64"], out)
    printed = capsys.readouterr().out
    for fig in ("fig1", "fig7"):
        png = out.parent / f"an_{fig}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
        assert str(png) in printed
    state = load_checkpoint(str(checkpoint))
    model = build_model(state["model_spec"])
    blocks = res["block_vulnerability"]["blocks"]
    assert [b["name"] for b in blocks] == [b.name for b in space_of(model).blocks]
    assert all(b[kind]["n"] == 3 for b in blocks for kind in ("clean", "robust"))
    assert res["bn_modes"] == ["eval"] and "bn_train" not in res and res["random"]["robust"]["n"] == 3
    # without --output the figures go next to the checkpoint; the JSON is never overwritten without --force
    assert eval_main(["--checkpoint", str(checkpoint), "--analysis", "subnets", "--rho", "0.5", "--n-subnets", "2",
                      "--search", "l1", "--bn-modes", "eval", "--steps", "1", "--n-examples", "32"]) == 0
    assert os.path.getsize(checkpoint.parent / "subnets_fig7.png") > 10_000
    assert not (checkpoint.parent / "subnets_fig1.png").exists()  # no random subnets, no Fig. 1
    assert eval_main(["--checkpoint", str(checkpoint), "--analysis", "subnets", "--output", str(out)]) == 2


def test_fast_scoring_equals_plain_per_batch_evaluation():
    """One context per subnet, clean and adversarial inputs concatenated in eval mode and repeated
    subnets scored once give exactly the numbers of a plain loop over batches."""
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "options": {"widths": (4, 8, 8)},
                         "num_classes": 3, "in_channels": 3}).eval()
    x, y = torch.rand(90, 3, 8, 8), torch.randint(0, 3, (90,))

    def attack(model, xb, yb):  # a deterministic stand-in, so the reference can recompute its inputs
        return (xb + 0.2 * torch.sin(1000 * xb).sign()).clamp(0, 1)

    x_adv = attack(model, x, y)
    res = analyze_subnets(model, (x[:30], y[:30]), (x[30:], y[30:]), attack, 0.5, n_subnets=4,
                          strategies=("random", "l1"), batch_size=16, eval_batch_size=40, seed=3)

    @torch.no_grad()
    def plain(inputs, alpha, bn):
        set_bn_mode(model, bn)
        correct = 0
        for i in range(30, 90, 16):
            with subnet(model, alpha):
                correct += int((model(inputs[i:min(i + 16, 90)]).argmax(1) == y[i:min(i + 16, 90)]).sum())
        model.eval()
        return correct / 60

    gen = torch.Generator().manual_seed(3)  # RandomSearch(seed=3) draws from its own generator like this
    subnets = [random_subnet(space_of(model), 0.5, gen) for _ in range(4)]
    for bn, per_mode in (("eval", res), ("train", res["bn_train"])):
        for kind, inputs in (("clean", x), ("robust", x_adv)):
            assert per_mode["random"][kind]["values"] == [plain(inputs, a, bn) for a in subnets]
    assert len(set(res["l1"]["robust"]["values"])) == 1 and res["l1"]["robust"]["n"] == 4


def test_subnet_analysis_shows_progress_on_a_terminal_only(monkeypatch, capfd):
    """The analysis can run for many minutes: each stage gets a bar on a terminal, none in a log,
    and the numbers do not depend on it."""
    import io
    import sys

    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "options": {"widths": (4, 8, 8)},
                         "num_classes": 3, "in_channels": 3}).eval()
    x, y = torch.rand(40, 3, 8, 8), torch.randint(0, 3, (40,))

    def attack(model, xb, yb):
        return (xb + 0.1).clamp(0, 1)

    def analyze():
        return analyze_subnets(model, (x[:20], y[:20]), (x[20:], y[20:]), attack, 0.5, n_subnets=2,
                               strategies=("random", "controller"), search_updates=2, batch_size=8, seed=1,
                               bn_modes=("eval",), block_samples=1, show_progress=True)

    quiet = analyze()
    assert capfd.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert analyze() == quiet
    shown = terminal.getvalue()
    for stage in ("attacking the test split", "controller search", "random subnets, BN eval", "block vulnerability"):
        assert stage in shown, stage
