"""advews-export as a model repository (issue 20, section 1): the README.md model card that
huggingface_hub parses back to the numbers of the evaluation JSONs next to the checkpoint, the
training recipe, a RobustBench model_info.json only from a standard full-test-set AutoAttack run,
and a reload from a copy of the directory alone, with no pickle and no training code."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from test_bad_input import Bad, check_row

import advews
from advews.cli.eval import main as eval_main
from advews.cli.export import main as export_main
from advews.cli.train import main as train_main
from advews.engine.evaluations import RESULT, Evaluation
from advews.engine.robustbench_info import model_info, why_not_standard
from advews.errors import AdvewsError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.train_limit = 128", "data.val_size = 64", "AT.steps = 1", "train.val_steps = 1", "train.epochs = 1",
        "model.options = {'widths': [8, 8, 8]}"]
PGD = ["--attack", "pgd", "--steps", "2", "--n-examples", "32", "--corruptions", "generated:gaussian_noise"]
AA = ["--attack", "autoattack", "--version", "custom", "--aa-attacks", "apgd-ce", "--n-examples", "16"]
AUDIT = ["--audit", "--audit-indicators", "classes,noise", "--n-examples", "16"]


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny quickstart run with its PGD (+ corruption) and AutoAttack JSONs and an audit card beside last.pt."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("card")
    out = root / "run"
    argv = ["--gin", "quickstart.gin", "--quiet", "--output", str(out)]
    for param in TINY:
        argv += ["--gin-param", param]
    assert train_main(argv) == 0
    ckpt = str(out / "last.pt")
    for name, flags in (("pgd20.json", PGD), ("aa.json", AA), ("audit.json", AUDIT)):
        assert eval_main(["--checkpoint", ckpt, *flags, "--output", str(out / name)]) == 0
    assert export_main([ckpt, str(root / "export"), "--name", "tiny-at"]) == 0
    return root


def test_eval_json_records_the_command_that_wrote_it(run):
    pgd = json.loads((run / "run" / "pgd20.json").read_text())
    assert pgd["command"] == shlex.join(["advews-eval", "--checkpoint", str(run / "run" / "last.pt"), *PGD,
                                         "--output", str(run / "run" / "pgd20.json")])


def test_card_parses_back_to_the_numbers_of_the_jsons(run):
    export = run / "export"
    assert sorted(os.listdir(export)) == ["README.md", "config.gin", "config.json", "evaluations", "model.safetensors"]
    assert (export / "config.gin").read_bytes() == (run / "run" / "config.gin").read_bytes()
    card = ModelCard.load(export / "README.md")
    data = card.data
    assert data.library_name == "advews" and "adversarial-robustness" in data.tags and data.datasets == ["mnist5k"]
    assert data.threat_model == {"norm": "Linf", "eps": 0.3} and data.model_name == "tiny-at"
    weights = sha256(export / "model.safetensors")
    assert data.advews["sha256"]["model.safetensors"] == weights == json.loads(
        (export / "config.json").read_text())["sha256"]["model.safetensors"]
    seen = set()
    for result in data.eval_results:
        name = result.metric_args["evaluation"]
        assert result.metric_args["sha256"] == sha256(run / "run" / name) == sha256(export / "evaluations" / name)
        js = json.loads((run / "run" / name).read_text())
        config = result.metric_config
        want = {"clean": js["clean_acc"], "worst-case": js["robust_acc"],
                "corruptions": js.get("corruptions", {}).get("mean_error")}.get(config)
        if want is None:
            want = js["attacks"][config]["robust_acc"]
            assert result.metric_args["eps"] == js["attacks"][config]["eps"] == 0.3
        assert result.metric_value == want
        if config != "corruptions":
            assert result.metric_args["n_examples"] == js["n_examples"]
        seen.add((name, config))
    assert seen == {("pgd20.json", "clean"), ("pgd20.json", "pgd"), ("pgd20.json", "corruptions"),
                    ("aa.json", "clean"), ("aa.json", "autoattack")}
    aa = [r for r in data.eval_results if r.metric_config == "autoattack"][0]
    assert aa.metric_args["version"] == "custom" and aa.metric_args["aa_attacks"] == ["apgd-ce"]
    text = card.text
    audit = json.loads((run / "run" / "audit.json").read_text())
    for js in ("pgd20.json", "aa.json"):
        assert f"`{json.loads((run / 'run' / js).read_text())['command']}`" in text
    assert f"Audit (audit.json): {audit['verdict']}" in text and f"`{audit['command']}`" in text
    assert weights in text and data.advews["audits"][0]["sha256"] == sha256(run / "run" / "audit.json")


def test_a_copy_of_the_export_reloads_alone_with_identical_logits(run, tmp_path):
    """In a fresh process: no pickle, no trainer, no defense; then advews-eval gives the JSON's numbers."""
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(run / "export", copy)
    logits = tmp_path / "logits.safetensors"
    script = (
        "import pickle, sys, torch\n"
        "def refuse(*a, **k): raise AssertionError('unpickling')\n"
        "pickle.load = pickle.loads = torch.load = refuse\n"
        "import advews\n"
        "from safetensors.torch import save_file\n"
        f"model = advews.load_model({str(copy)!r})\n"
        "torch.manual_seed(0)\n"
        "with torch.no_grad():\n"
        f"    save_file({{'logits': model(torch.rand(16, 1, 28, 28))}}, {str(logits)!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith(('advews.engine.trainer', 'advews.defenses', "
        "'advews.subnets'))))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    from safetensors.torch import load_file

    original = advews.load_model(str(run / "run" / "last.pt"))
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(load_file(str(logits))["logits"], original(torch.rand(16, 1, 28, 28)))
    target = tmp_path / "again.json"
    assert eval_main(["--checkpoint", str(copy), *PGD[:6], "--output", str(target)]) == 0
    again, first = json.loads(target.read_text()), json.loads((run / "run" / "pgd20.json").read_text())
    assert (again["clean_acc"], again["robust_acc"]) == (first["clean_acc"], first["attacks"]["pgd"]["robust_acc"])


def test_a_flipped_byte_in_the_weights_is_refused_in_one_line(run, tmp_path, capfd):
    copy = tmp_path / "model"
    shutil.copytree(run / "export", copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-3] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(AdvewsError, match="model.safetensors does not match the SHA-256"):
        advews.load_model(str(copy))
    capfd.readouterr()
    assert eval_main(["--checkpoint", str(copy), "--attack", "none", "--n-examples", "8"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "SHA-256" in err[0]


def _standard(run) -> Evaluation:
    """The fixture's real AutoAttack JSON as a standard run on all 1000 MNIST-5k test digits would write it."""
    data = json.loads((run / "run" / "aa.json").read_text())
    entry = data["attacks"]["autoattack"]
    entry["version"] = data["version"] = "standard"
    del entry["aa_attacks"], data["aa_attacks"]
    data["n_examples"] = 1000
    data["command"] = data["command"].replace("--version custom --aa-attacks apgd-ce --n-examples 16", "")
    return Evaluation("aa.json", RESULT, data, json.dumps(data).encode())


def test_robustbench_accepts_only_a_standard_full_test_set_run(run):
    config = json.loads((run / "export" / "config.json").read_text())
    good = _standard(run)
    assert why_not_standard(good, config) is None
    info = model_info(good, config, "tiny-at", "abc")
    entry = good.data["attacks"]["autoattack"]
    assert info["clean_acc"] == f"{100 * good.data['clean_acc']:.2f}" and info["eps"] == "0.3"
    assert info["reported"] == info["autoattack_acc"] == f"{100 * entry['robust_acc']:.2f}"
    assert (info["dataset"], info["threat_model"], info["number_forward_passes"]) == ("mnist5k", "Linf", 1)
    assert info["additional_data"] is False and info["architecture"].startswith("small_preact_resnet")
    assert good.sha256 in info["footnote"] and set(info) >= {"name", "footnote"}

    def bad(change):
        data = json.loads(json.dumps(good.data))
        change(data)
        return why_not_standard(Evaluation("aa.json", RESULT, data, b""), config)

    assert "16 examples" in bad(lambda d: d.update(n_examples=16))
    assert "'fast'" in bad(lambda d: d["attacks"]["autoattack"].update(version="fast"))
    assert "eps 0.1" in bad(lambda d: d["attacks"]["autoattack"].update(eps=0.1))
    assert "norm L2" in bad(lambda d: d["attacks"]["autoattack"].update(norm="L2"))
    assert "npz:x.npz" in bad(lambda d: d.update(command=d["command"] + " --data npz:x.npz"))


def test_export_robustbench_writes_model_info_from_the_standard_json(run, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run / "run" / "last.pt", folder / "last.pt")
    good = _standard(run)
    (folder / "aa_standard.json").write_bytes(good.raw)
    assert export_main([str(folder / "last.pt"), str(tmp_path / "out"), "--robustbench"]) == 0
    info = json.loads((tmp_path / "out" / "model_info.json").read_text())
    assert info["name"] == "out" and info["clean_acc"] == f"{100 * good.data['clean_acc']:.2f}"
    assert good.sha256 in info["footnote"] and "model_info.json" in ModelCard.load(tmp_path / "out" / "README.md").text


def test_export_leaves_out_evaluations_of_other_weights(run, tmp_path, capfd):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run / "run" / "last.pt", folder / "last.pt")
    stale = json.loads((run / "run" / "pgd20.json").read_text())
    stale["epoch"] = 7
    (folder / "old.json").write_text(json.dumps(stale))
    capfd.readouterr()
    assert export_main([str(folder / "last.pt"), str(tmp_path / "out")]) == 0
    assert "old.json is left out of the model card: it evaluates epoch 7" in capfd.readouterr().err
    assert not (ModelCard.load(tmp_path / "out" / "README.md").data.eval_results or [])
    assert not os.path.exists(tmp_path / "out" / "evaluations")


ROWS = [
    Bad("RB01", "export", ("run/last.pt", "rb", "--robustbench"), ("aa.json", "version 'custom'"), ""),
    Bad("RB02", "export", ("run/last.pt", "export"), ("export", "already holds an export", "--force"), ""),
]


@pytest.mark.parametrize("case", ROWS, ids=lambda c: c.id)
def test_bad_export_input_is_one_line_and_writes_nothing(case, run, monkeypatch, capfd):
    check_row(case, str(run), monkeypatch, capfd)
