"""Bad input about the run directory itself, in the bad-input table's format (exit 2, one line naming
the bad thing, no traceback, nothing changed): a --resume whose last.pt is gone (RS11, RS12), a run
directory another process holds (LK01, LK02), and a --resume on training data that changed since
the checkpoint (SD24: streamed extra data; SD25: an in-memory .npz)."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
from bad_input_world import snapshot
from test_bad_input import Bad, check_outcome, gp, run_case, train

from advews.cli.train import main as train_main
from advews.engine.checkpoint import load_checkpoint, save_checkpoint
from advews.locks import Lock

Q = ("--gin", "quickstart.gin", "--gin-param", "train.epochs = 1", "--gin-param", "data.train_limit = 128",
     "--gin-param", "data.val_size = 64", "--gin-param", "AT.steps = 1", "--gin-param", "train.val_steps = 1",
     "--gin-param", "model.options = {'widths': (8, 16, 16)}")
NO_LAST = "but no last.pt to resume"

CASES = [
    train("RS11", ("--gin", "quickstart.gin", "--output", "rs11", "--resume"),
          f"rs11 has best.pt, metrics.jsonl {NO_LAST}", forbid="pass --resume"),
    train("RS12", ("--output", "rs12", "--resume"), f"rs12 has metrics.jsonl {NO_LAST}", forbid="pass --resume"),
    train("LK01", Q + ("--output", "lk_early"), "run directory lk_early is in use", f"pid {os.getpid()}"),
    train("LK02", ("--output", "lk_run", "--resume") + gp("train.epochs = 2"), "run directory lk_run is in use",
          f"pid {os.getpid()}"),
    train("LK03", Q + ("--output", "lk_run"), "run directory lk_run is in use", f"pid {os.getpid()}"),
    train("SD24", ("--output", "sd24", "--resume") + gp("train.epochs = 2"), "sd24/last.pt",
          "training data changed", "the extra data's images.npy"),
    train("SD25", ("--output", "sd25", "--resume") + gp("train.epochs = 2"), "sd25/last.pt",
          "training data changed", "the extra data (data.extra_data)"),
]


def _extra(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), np.arange(n) % 10


@pytest.fixture(scope="module")
def runs_world(world):
    """The shared world plus this table's run directories; the lock rows' directories are held (as a
    first advews-train would hold them) while the module runs."""
    cwd = os.getcwd()
    os.chdir(world)
    try:
        for name, drop in (("rs11", ("last.pt",)), ("rs12", ("last.pt", "best.pt"))):
            shutil.copytree("run", name)
            shutil.copy("run/last.pt", f"{name}/best.pt")
            for f in drop:
                os.remove(os.path.join(name, f))
        os.makedirs("lk_early")
        open("lk_early/config.gin", "w").write("train.epochs = 3\n")  # a first run still in its first epoch
        shutil.copytree("run", "lk_run")
        os.makedirs("sd24_stream")
        images, labels = _extra()
        np.save("sd24_stream/images.npy", images)
        np.save("sd24_stream/labels.npy", labels)
        np.savez("sd25_extra.npz", image=images, label=labels)
        sys_path = list(sys.path)
        for run, extra in (("sd24", "sd24_stream"), ("sd25", "sd25_extra.npz")):
            argv = list(Q) + ["--quiet", "--output", run, "--gin-param", f"data.extra_data = '{extra}'"]
            assert train_main(argv) == 0
        sys.path[:] = sys_path
        images[0, 0, 0, 0] ^= 0xFF  # one changed pixel, in the first row of the file
        np.save("sd24_stream/images.npy", images)
        np.savez("sd25_extra.npz", image=images, label=labels)
    finally:
        os.chdir(cwd)
    locks = [Lock(os.path.join(world, d, ".lock"), d, "wait").acquire() for d in ("lk_early", "lk_run")]
    yield world
    for lock in locks:
        lock.release()


class _KeepOut:
    """capfd for ``run_case`` that also keeps what went to stdout."""

    def __init__(self, capfd) -> None:
        self.capfd, self.out = capfd, ""

    def readouterr(self):
        result = self.capfd.readouterr()
        self.out += result.out
        return result


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_run_directory_bad_input_is_one_line_and_changes_nothing(case: Bad, runs_world, monkeypatch, capfd):
    monkeypatch.chdir(runs_world)
    monkeypatch.setattr(sys, "path", list(sys.path))
    capfd.readouterr()
    before = snapshot(runs_world)
    keep = _KeepOut(capfd)
    result, err = run_case(case, keep)
    assert snapshot(runs_world) == before, case.id
    check_outcome(case, result, err)
    assert "starting the run from scratch" not in keep.out  # no contradicting line first (RS11, RS12)


def test_a_checkpoint_without_a_data_fingerprint_still_resumes(runs_world, tmp_path, capfd):
    """Checkpoints written before fingerprints existed resume as before, without a word."""
    run = tmp_path / "old"
    shutil.copytree(os.path.join(runs_world, "run"), run)
    state = load_checkpoint(run / "last.pt")
    assert state.pop("data_fingerprint") and state.pop("content_hash")
    save_checkpoint(state, str(run / "last.pt"))
    capfd.readouterr()
    assert train_main(["--quiet", "--output", str(run), "--resume", "--gin-param", "train.epochs = 2"]) == 0
    assert capfd.readouterr().err == ""
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


def test_fingerprints_are_by_content_and_name_what_changed():
    import torch

    from advews.data import ArrayDataset, DataBundle
    from advews.engine.data_identity import check_same_data, data_fingerprint
    from advews.errors import AdvewsError

    def bundle(train_pixel: int = 0, val_label: int = 0) -> DataBundle:
        train = ArrayDataset(torch.full((4, 1, 2, 2), train_pixel, dtype=torch.uint8),
                             torch.zeros(4, dtype=torch.int64))
        val = ArrayDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.full((2,), val_label, dtype=torch.int64))
        return DataBundle("toy", train, val, val, 10, 1, 2, (0.0,), (1.0,), None)

    saved = data_fingerprint(bundle())
    assert data_fingerprint(bundle()) == saved  # the same content, another object
    check_same_data(saved, data_fingerprint(bundle()), "toy", "r/last.pt")
    check_same_data(None, saved, "toy", "r/last.pt")  # an old checkpoint: not checked
    with pytest.raises(AdvewsError, match="the training split of toy differs"):
        check_same_data(saved, data_fingerprint(bundle(train_pixel=1)), "toy", "r/last.pt")
    with pytest.raises(AdvewsError, match="the validation split of toy differs"):
        check_same_data(saved, data_fingerprint(bundle(val_label=3)), "toy", "r/last.pt")
