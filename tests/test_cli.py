"""User errors: one line on stderr, a non-zero exit, nothing on disk overwritten."""

import subprocess
import sys

import pytest

from advews.cli.eval import main as eval_main
from advews.cli.train import main as train_main

BASE = ["--gin-param", "data.dataset = 'mnist5k'", "--gin-param", "model.arch = 'small_preact_resnet'"]


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gin", "no_such_recipe.gin"], "no_such_recipe.gin"),
        (["--gin-param", "train.epochs = "], "bad --gin-param 'train.epochs = '"),
        (["--gin-param", "nosuchthing.x = 1"], "nosuchthing"),
        (BASE + ["--gin-param", "model.arch = 'resnet9000'"], "resnet9000"),
        (BASE + ["--gin-param", "train.defense = 'Magic'"], "Magic"),
        (BASE + ["--gin-param", "AT.eps = -0.1"], "-0.1"),
        (BASE + ["--gin-param", "AT.steps = 0"], "steps"),
        (BASE + ["--gin-param", "data.dataset = 'cifar10'", "--gin-param", "data.root = '/nonexistent'"],
         "/nonexistent"),
    ],
)
def test_train_errors_are_one_line(tmp_path, capsys, args, needle):
    code = train_main(args + ["--output", str(tmp_path / "run"), "--quiet"])
    assert needle in one_line_error(capsys, code)


def test_used_output_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    code = train_main(BASE + ["--output", str(run), "--quiet"])
    assert "--resume" in one_line_error(capsys, code)
    assert (run / "metrics.jsonl").read_text() == "precious\n"


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = train_main(BASE + ["--output", str(blocker / "run"), "--quiet"])
    assert "not writable" in one_line_error(capsys, code)


def test_resume_without_output(capsys):
    code = train_main(BASE + ["--resume", "--quiet"])
    assert "--output" in one_line_error(capsys, code)


def test_eval_errors_are_one_line(tmp_path, capsys):
    code = eval_main(["--checkpoint", str(tmp_path / "missing.pt")])
    assert "missing.pt" in one_line_error(capsys, code)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "bad.pt" in one_line_error(capsys, eval_main(["--checkpoint", str(bad)]))


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "advews.cli.train", "--gin", "nope.gin",
                           "--output", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("advews-train: error:")
    assert len(proc.stderr.strip().splitlines()) == 1
