"""A full disk while training is one line naming the file, that the disk is full and which checkpoint
is kept, exit DISK_FULL_EXIT (4), the partial temporary file removed and nothing earlier lost; a
preemption save that fails for a full disk still exits 143 and says what survives. A real size-limited
tmpfs where this machine can mount one (tests/small_disk.py), and fault-injected writes (an OSError
ENOSPC raised inside torch.save's zip writer, as a full disk does) that always run."""

import errno
import os
import shutil
import signal
import sys

import pytest
import torch
import small_disk
from bad_input_world import snapshot
from test_reliability import args_for, assert_same_run

from advews.cli.train import main as train_main
from advews.engine import checkpoint as ckpt
from advews.engine.checkpoint import load_checkpoint
from advews.engine.preemption import PREEMPTED_EXIT
from advews.engine.trainer import Trainer
from advews.errors import DISK_FULL_EXIT

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["data.train_limit = 128", "data.val_size = 64", "AT.steps = 1", "train.val_steps = 1",
        "model.options = {'widths': (8, 16, 16)}"]  # 2 steps per epoch, a 170 KB last.pt
PAGE = 4096

# SIGTERM to itself after the first training step, in a real process on the small disk.
SIGTERMED = r'''
import os, signal, sys
from advews.engine.trainer import Trainer
original = Trainer._train_step
def step(self, e, i, *rest):
    out = original(self, e, i, *rest)
    if (e, i) == (0, 0):
        os.kill(os.getpid(), signal.SIGTERM)
    return out
Trainer._train_step = step
from advews.cli.train import main
sys.exit(main(sys.argv[1:]))
'''


def argv(out, *params, resume=False):
    return args_for(out, *TINY, *params, resume=resume)


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def no_tmp_files(run):
    return [n for n in os.listdir(run) if n.endswith(".tmp")] == []


def fail_writes(monkeypatch, name, first=1):
    """From the ``first``-th file named ``name`` written on, every write raises ENOSPC."""
    real, count = ckpt._RecordingFile.write, {"n": 0}

    def write(self, data):
        if os.path.basename(self.path).startswith(name + "."):
            if not hasattr(self, "_nth"):
                count["n"] += 1
                self._nth = count["n"]
            if self._nth >= first:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(ckpt._RecordingFile, "write", write)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One thread, as the subprocesses on the small disk (OMP_NUM_THREADS=1): a module fixture is
    built before the function-scoped ``one_thread``, and other thread counts round differently."""
    run = tmp_path_factory.mktemp("disk_full") / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(argv(run, "train.epochs = 2")) == 0
    finally:
        torch.set_num_threads(threads)
    return run


# ----------------------------------------------------------------- a real full disk
@pytest.mark.skipif(not small_disk.available(), reason="cannot mount a tmpfs here")
def test_real_full_disk_at_the_end_of_an_epoch_then_resume_equals_uninterrupted(tmp_path, reference):
    """Room for epoch 1's files and half a checkpoint more: the end-of-epoch-2 save fails."""
    sizes = {n: os.path.getsize(reference / n) for n in os.listdir(reference)}
    free = sum(-(-s // PAGE) * PAGE for s in sizes.values()) + 4 * PAGE + sizes["last.pt"] // 2
    proc, after = small_disk.run_on_small_disk(
        str(tmp_path), [sys.executable, "-m", "advews.cli.train", *argv("run", "train.epochs = 2")],
        size="4M", free=free)
    assert proc.returncode == DISK_FULL_EXIT, proc.stderr
    line = one_line(proc.stderr)
    assert "cannot write run/last.pt: the disk is full" in line and "last.pt (the end of epoch 1) is kept" in line
    assert "Traceback" not in proc.stderr and "inline_container" not in line
    run = os.path.join(after, "run")
    assert no_tmp_files(run)
    assert load_checkpoint(os.path.join(run, "last.pt"))["epoch"] == 1
    resumed = tmp_path / "resumed"  # the same files once space is freed
    shutil.copytree(run, resumed)
    assert train_main(argv(resumed, "train.epochs = 2", resume=True)) == 0
    assert_same_run(resumed, reference)


@pytest.mark.skipif(not small_disk.available(), reason="cannot mount a tmpfs here")
def test_real_full_disk_sigterm_exits_143_and_says_the_save_failed(tmp_path):
    proc, after = small_disk.run_on_small_disk(
        str(tmp_path), [sys.executable, "-c", SIGTERMED, *argv("run", "train.epochs = 1")], size="1M", free=8 * PAGE)
    assert proc.returncode == PREEMPTED_EXIT, proc.stderr
    line = one_line(proc.stderr)
    assert "preempted by SIGTERM at epoch 1, step 1, but the save failed" in line
    assert "run/last.pt: the disk is full" in line and "no checkpoint was written yet" in line
    assert no_tmp_files(os.path.join(after, "run")) and not os.path.exists(os.path.join(after, "run", "last.pt"))


# ----------------------------------------------------------------- fault-injected writes
def test_fresh_run_on_a_full_disk(tmp_path, monkeypatch, capsys):
    fail_writes(monkeypatch, "config.gin")
    run = tmp_path / "run"
    assert train_main(argv(run, "train.epochs = 1")) == DISK_FULL_EXIT
    line = one_line(capsys.readouterr().err)
    assert f"cannot write {run}/config.gin: the disk is full" in line and "no checkpoint was written yet" in line
    assert no_tmp_files(run) and not (run / "config.gin").exists()


def test_full_disk_in_a_mid_epoch_checkpoint_keeps_the_previous_last_pt(tmp_path, monkeypatch, capsys):
    """Saves: epoch 1 step 1, end of epoch 1, epoch 2 step 1 (fails)."""
    fail_writes(monkeypatch, "last.pt", first=3)
    run = tmp_path / "run"
    assert train_main(argv(run, "train.epochs = 2", "train.checkpoint_every_steps = 1")) == DISK_FULL_EXIT
    line = one_line(capsys.readouterr().err)
    assert f"cannot write {run}/last.pt: the disk is full" in line and "last.pt (the end of epoch 1) is kept" in line
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0) and no_tmp_files(run)


def test_full_disk_for_metrics_then_resume_on_a_still_full_disk_then_with_space(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        fail_writes(m, "metrics.jsonl")
        assert train_main(argv(run, "train.epochs = 1")) == DISK_FULL_EXIT
        line = one_line(capsys.readouterr().err)
        assert f"{run}/metrics.jsonl: the disk is full" in line and "last.pt (the end of epoch 1) is kept" in line
        assert no_tmp_files(run) and load_checkpoint(run / "last.pt")["epoch"] == 1
    with monkeypatch.context() as m:  # --resume while the disk is still full: nothing changes
        for name in ("metrics.jsonl", "last.pt", "config.gin"):
            fail_writes(m, name)
        before = snapshot(str(run))
        assert train_main(argv(run, "train.epochs = 2", resume=True)) == DISK_FULL_EXIT
        line = one_line(capsys.readouterr().err)
        assert "the disk is full" in line and "last.pt (the end of epoch 1) is kept" in line
        assert snapshot(str(run)) == before
    assert train_main(argv(run, "train.epochs = 2", resume=True)) == 0
    assert [r.split(",")[0] for r in (run / "metrics.jsonl").read_text().splitlines()] == ['{"epoch": 1', '{"epoch": 2']


def test_sigterm_whose_save_fails_for_a_full_disk_is_still_a_preemption(tmp_path, monkeypatch, capsys):
    original = Trainer._train_step

    def step(self, epoch, i, *rest):
        out = original(self, epoch, i, *rest)
        if (epoch, i) == (1, 0):
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "_train_step", step)
    fail_writes(monkeypatch, "last.pt", first=2)
    run = tmp_path / "run"
    assert train_main(argv(run, "train.epochs = 2")) == PREEMPTED_EXIT
    line = one_line(capsys.readouterr().err)
    assert "preempted by SIGTERM at epoch 2, step 1, but the save failed" in line
    assert "the disk is full" in line and "last.pt (the end of epoch 1) is kept" in line
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and no_tmp_files(run)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_torch_save_hides_enospc_behind_unexpected_pos_and_we_still_say_disk_full(tmp_path, monkeypatch):
    import torch

    fail_writes(monkeypatch, "c.pt")
    path = str(tmp_path / "c.pt")
    with pytest.raises(Exception) as caught:
        ckpt.save_checkpoint({"w": torch.zeros(100_000)}, path)
    assert caught.value.exit_code == DISK_FULL_EXIT and "the disk is full" in str(caught.value)
    assert "no c.pt was written" in str(caught.value) and os.listdir(tmp_path) == []


def test_cli_documents_exit_code_4():
    from advews.cli import train as cli

    assert "4 the disk" in " ".join(cli.__doc__.split())
    assert "4 disk full" in " ".join(cli.build_parser().format_help().split())
