"""One run directory, one training process: a second advews-train on the same --output (a fresh
start or a requeued --resume) is refused in one line naming the holder's pid, exit 2, and changes
nothing; temporary files are per process and only leftovers are cleaned up, under the lock; under
torchrun only rank 0 prints a refusal."""

import os
import shutil
import subprocess
import sys
import time

import pytest
from bad_input_world import snapshot
from test_reliability import args_for

from advews.cli.report import main as report_main
from advews.cli.train import main as train_main
from advews.engine import checkpoint as ckpt
from advews.engine.checkpoint import load_checkpoint, save_checkpoint
from advews.locks import Lock

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.train_limit = 128", "data.val_size = 64", "AT.steps = 1", "train.val_steps = 1",
        "model.options = {'widths': (8, 16, 16)}"]  # 2 steps per epoch

# Trains in a real process, pausing at (epoch, step) until the test creates GO: reliably mid-run.
PAUSING = r'''
import os, sys, time
from advews.engine.trainer import Trainer
ready, go, epoch, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
original = Trainer._train_step
def paused(self, e, i, *rest):
    if (e, i) == (epoch, step):
        open(ready, "w").close()
        deadline = time.time() + 300
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.05)
    return original(self, e, i, *rest)
Trainer._train_step = paused
from advews.cli.train import main
sys.exit(main(sys.argv[5:]))
'''


def argv(out, *params, resume=False):
    return args_for(out, *TINY, *params, resume=resume)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run to copy."""
    run = tmp_path_factory.mktemp("lock") / "run"
    assert train_main(argv(run, "train.epochs = 1")) == 0
    return run


def refused_by(pid, capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "is in use by another advews process" in err[0] and f"pid {pid}" in err[0], err[0]
    return err[0]


def test_a_locked_run_directory_refuses_a_fresh_start_and_a_resume_changing_nothing(tmp_path, trained, capsys):
    """The probe's N3/N2 case: the first run is in its first epoch (only config.gin and .lock on disk),
    then after its first checkpoint; both a fresh start and a --resume are refused."""
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.gin").write_text("train.epochs = 3\n")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for directory in (early, run):
        with Lock(str(directory / ".lock"), "run", "wait"):  # what the first advews-train holds
            before = snapshot(str(directory))
            assert train_main(argv(directory, "train.epochs = 2", "train.seed = 1")) == 2
            refused_by(os.getpid(), capsys)
            assert train_main(argv(directory, "train.epochs = 2", resume=True)) == 2
            refused_by(os.getpid(), capsys)
            assert snapshot(str(directory)) == before
    assert train_main(argv(run, "train.epochs = 1", resume=True)) == 0  # released: the run is usable


def test_two_real_processes_on_one_output(tmp_path, trained, capsys):
    """A requeued job's --resume while the old one still trains (a real process, paused mid-epoch 2):
    a second --resume and a fresh start are refused naming its pid; it then finishes undisturbed."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", PAUSING, str(ready), str(go), "1", "1",
                              *argv(run, "train.epochs = 2", resume=True)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ready.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        before = snapshot(str(run))
        for args in (argv(run, "train.epochs = 2", resume=True), argv(run, "train.epochs = 2", "train.seed = 1")):
            assert train_main(args) == 2
            refused_by(first.pid, capsys)
        assert snapshot(str(run)) == before
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_start_up_removes_only_leftover_temporary_files_and_lock_is_not_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    leftovers = ["last.pt.tmp", "last.pt.123.tmp", "config.gin.99.tmp", "metrics.jsonl.tmp"]
    kept = ["notes.tmp", "last.pt.old.tmp", "best.pt.bak"]
    for name in leftovers + kept:
        (run / name).write_text("x")
    (run / ".lock").write_text("12345\n")  # a crashed holder's lock file: not a run, not held
    assert train_main(argv(run, "train.epochs = 1")) == 0
    names = set(os.listdir(run))
    assert not names & set(leftovers) and set(kept) <= names
    assert (run / ".lock").read_text().strip() == str(os.getpid())
    assert report_main([str(run)]) == 0  # readers do not care about the lock file
    capsys.readouterr()


def test_writes_use_per_process_temporary_names(tmp_path, monkeypatch):
    renamed = []
    real = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (renamed.append((a, b)), real(a, b)))
    path = str(tmp_path / "last.pt")
    save_checkpoint({"x": 1}, path)
    ckpt.write_text_atomic(str(tmp_path / "config.gin"), "x = 1\n")
    assert renamed == [(f"{path}.{os.getpid()}.tmp", path),
                       (f"{tmp_path / 'config.gin'}.{os.getpid()}.tmp", str(tmp_path / "config.gin"))]


def test_under_torchrun_only_rank_0_prints_a_refusal(tmp_path, trained, monkeypatch, capfd):
    """Every rank refuses (here: a run directory in use); rank 0 prints the line, the others exit 2 silently."""
    from advews.engine.distributed import main_process

    assert main_process()
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with Lock(str(run / ".lock"), "run", "wait"):
        for rank, lines in (("1", 0), ("3", 0), ("0", 1)):
            monkeypatch.setenv("RANK", rank)
            assert main_process() == (rank == "0")
            capfd.readouterr()
            assert train_main(argv(run, "train.epochs = 2", resume=True)) == 2
            assert len(capfd.readouterr().err.strip().splitlines()) == lines, rank
    monkeypatch.setenv("RANK", "garbage")
    assert main_process()
