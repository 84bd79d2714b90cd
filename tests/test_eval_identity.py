"""An evaluation's identity includes its data, its state file is guarded, and its files survive a full disk.

- Probe 2026-12-05 section 2: shards of two data sets of the same size (``npz:A`` and ``npz:B``) merged
  silently; now the identity holds the content fingerprint of the evaluated examples and ``--merge``
  refuses them in one line, while ``./G.pt`` and ``G.pt`` (one model) merge (M08).
- Section 1: two evaluations writing one ``--state``: the second is refused in one line naming the
  holder's pid (FILE.lock is held for the whole evaluation and removed after it); under torchrun the
  refusal is printed once.
- Section 3: a full disk while writing ``--state`` (DF7, on a real small tmpfs and fault-injected) or
  ``--output`` / ``--hdf5`` (DF6) is one line, exit 4, naming the file and what is kept, and leaves no
  partial or 0-byte file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import small_disk

import advews.api.eval_state as eval_state
import advews.api.evaluate as evaluate_module
from advews.cli.eval import main as eval_main
from advews.errors import DISK_FULL_EXIT, AdvewsError, DiskFullError

HERE = os.path.dirname(os.path.abspath(__file__))
F = ["--attack", "pgd", "--steps", "2", "--n-examples", "40", "--batch-size", "20"]  # the probe's F, smaller
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shard_dir(world, tmp_path_factory):
    """The probe's folder: G.pt (a trained checkpoint), A.npz and B.npz (test digits 0-39 and 40-79)."""
    from advews.data.mnist5k import load_mnist5k

    root = tmp_path_factory.mktemp("identity")
    shutil.copy(os.path.join(world, "run", "last.pt"), root / "G.pt")
    _, test = load_mnist5k()
    x, y = test.images.permute(0, 2, 3, 1).numpy(), test.labels.numpy()
    np.savez(root / "A.npz", x=x[:40], y=y[:40])
    np.savez(root / "B.npz", x=x[40:80], y=y[40:80])
    return root


@pytest.fixture
def here(shard_dir, tmp_path, monkeypatch):
    """A fresh working folder holding the probe's files."""
    for name in ("G.pt", "A.npz", "B.npz"):
        os.symlink(shard_dir / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def shard(i: int, data: str, state: str, checkpoint: str = "G.pt", *extra: str) -> int:
    return eval_main(["--checkpoint", checkpoint, *F, "--data", f"npz:{data}", "--shards", "2", "--shard", str(i),
                      "--state", state, *extra])


def test_merge_of_shards_on_other_data_is_refused(here, capsys):
    """The probe's commands: shard 0 on A.npz, shard 1 on B.npz (same size), then --merge."""
    assert shard(0, "A.npz", "dA.json") == 0
    assert shard(1, "B.npz", "dB.json") == 0
    capsys.readouterr()
    assert eval_main(["--merge", "dA.shard0of2.json", "dB.shard1of2.json", "--output", "m.json"]) == 2
    line = one_line(capsys)
    assert "dB.shard1of2.json" in line and "the evaluated data differs" in line
    assert not os.path.exists("m.json")
    # M08: the same data and weights, the checkpoint spelled ./G.pt: one evaluation
    assert shard(1, "A.npz", "dA.json", "./G.pt") == 0
    assert eval_main(["--merge", "dA.shard0of2.json", "dA.shard1of2.json", "--output", "m.json"]) == 0
    merged = json.loads(open("m.json").read())
    assert merged["n_examples"] == 40 and merged["checkpoint"] == "G.pt"  # shard 0 names the model
    assert sorted(os.listdir(".")) == sorted(["G.pt", "A.npz", "B.npz", "m.json", "dA.shard0of2.json",
                                              "dA.shard1of2.json", "dB.shard1of2.json"])  # no .lock, no .tmp


def test_edited_flags_are_refused_on_merge_and_on_resume(here, capsys):
    """M14: flags edited to all-robust (same length) keep the file valid JSON of the right shape."""
    for i in (0, 1):
        assert shard(i, "A.npz", "s.json") == 0
    state = json.loads(open("s.shard1of2.json").read())
    state["attacks"]["pgd"]["robust"] = "1" * 20
    open("s.shard1of2.json", "w").write(json.dumps(state))
    before = open("s.shard1of2.json").read()
    capsys.readouterr()
    assert eval_main(["--merge", "s.shard0of2.json", "s.shard1of2.json"]) == 2
    assert "edited or damaged" in one_line(capsys)
    assert shard(1, "A.npz", "s.json") == 2  # the resume refuses it too, before any work
    assert "edited or damaged" in one_line(capsys)
    assert open("s.shard1of2.json").read() == before


def test_second_evaluation_of_one_state_is_refused(here, capsys):
    """Another process holds s.json's lock (as a running advews-eval does): refused, one line, its pid."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from advews.locks import Lock; "
                               "Lock('s.json.lock', 'x', 'y').acquire(); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert eval_main(["--checkpoint", "G.pt", *F, "--data", "npz:A.npz", "--state", "s.json"]) == 2
        line = one_line(capsys)
        assert f"--state s.json is in use by another advews process (pid {holder.pid})" in line
        assert not os.path.exists("s.json")
    finally:
        holder.stdin.close()
        holder.wait()
    assert eval_main(["--checkpoint", "G.pt", *F, "--data", "npz:A.npz", "--state", "s.json"]) == 0  # released
    assert not os.path.exists("s.json.lock")


def test_torchrun_refusal_is_printed_once(tmp_path):
    """2 ranks, the state of rank 1 held by another process: both ranks stop, rank 0 says why, once."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), y=np.arange(8) % 10)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from advews.locks import Lock; "
                               "Lock('s.shard1of2.json.lock', 'x', 'y').acquire(); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "advews.cli.eval", "--model", "test_sharded_eval:model", "--data", "npz:d.npz",
                               "--eps", "0.1", "--attack", "fgsm", "--batch-size", "4", "--state", "s.json"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    finally:
        holder.stdin.close()
        holder.wait()
    assert proc.returncode != 0
    assert proc.stderr.count("is in use by another advews process") == 1, proc.stderr[-3000:]
    assert f"pid {holder.pid}" in proc.stderr  # (torchrun itself adds its ChildFailedError summary)


def failing_write(monkeypatch, fail_at: int):
    """Make the ``fail_at``-th state write (1-based) hit a full disk halfway through its bytes."""
    calls = {"n": 0}
    real = eval_state._write_text

    def write(path: str, text: str) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:
            open(path, "w").write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(eval_state, "_write_text", write)
    return real


def test_state_on_a_full_disk_is_one_line_and_keeps_the_last_state(here, monkeypatch, capsys):
    """DF7 by fault injection: the 3rd write (pgd's second batch) fails; the 2nd write's file stays whole."""
    real = failing_write(monkeypatch, 3)
    assert eval_main(["--checkpoint", "G.pt", *F, "--data", "npz:A.npz", "--state", "s.json"]) == DISK_FULL_EXIT
    line = one_line(capsys)
    assert "cannot write s.json: the disk is full" in line and "the previous s.json is kept" in line
    assert sorted(os.listdir(".")) == ["A.npz", "B.npz", "G.pt", "s.json"]  # no tmp, no lock
    kept = eval_state.read_state("s.json")
    assert kept["progress"]["pgd"] and "pgd" not in kept["attacks"]
    monkeypatch.setattr(eval_state, "_write_text", real)
    assert eval_main(["--checkpoint", "G.pt", *F, "--data", "npz:A.npz", "--state", "s.json"]) == 0


def test_output_and_hdf5_on_a_full_disk(here, monkeypatch, capsys):
    """DF6: --output's write fails for lack of space: no 0-byte file blocks the rerun; the result went
    to a fallback file the line names; exit 4. The same for --hdf5."""
    real = json.dump

    def dump(obj, f, **kwargs):
        if os.path.basename(f.name).startswith("out.json"):
            f.write("{")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f, **kwargs)

    monkeypatch.setattr(evaluate_module, "json", type("J", (), {"dump": staticmethod(dump)}))
    assert eval_main(["--checkpoint", "G.pt", *F, "--data", "npz:A.npz", "--output", "out.json"]) == DISK_FULL_EXIT
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "cannot write out.json: the disk is full" in line and "saved to" in line
    fallback = line.split("saved to ")[1].split(" instead")[0]
    assert json.loads(open(fallback).read())["n_examples"] == 40
    os.remove(fallback)
    assert sorted(os.listdir(".")) == ["A.npz", "B.npz", "G.pt"]
    monkeypatch.setattr(evaluate_module, "json", json)
    assert eval_main(["--checkpoint", "G.pt", *F, "--data", "npz:A.npz", "--output", "out.json"]) == 0  # not blocked

    import advews.evaluation.per_example as per_example

    def full(path, **kwargs):
        open(path + ".tmp", "wb").write(b"\x89HDF")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(per_example, "save_per_example", full)
    assert eval_main(["--checkpoint", "G.pt", *F, "--data", "npz:A.npz", "--hdf5", "f.h5"]) == DISK_FULL_EXIT
    line = one_line(capsys)
    assert "cannot write f.h5: the disk is full" in line and "only in the report above" in line
    assert sorted(os.listdir(".")) == ["A.npz", "B.npz", "G.pt", "out.json"]


@pytest.mark.skipif(not small_disk.available(), reason="cannot mount a tmpfs here")
def test_state_on_a_real_full_disk(here, tmp_path_factory):
    """DF7 end to end on a small tmpfs: room for the lock and one state file, not for its rewrite."""
    work = tmp_path_factory.mktemp("df7")
    argv = [sys.executable, "-m", "advews.cli.eval", "--checkpoint", str(here / "G.pt"), *F,
            "--data", f"npz:{here / 'A.npz'}", "--state", "s.json"]
    proc, after = small_disk.run_on_small_disk(str(work), argv, size="1M", free=8192)
    assert proc.returncode == DISK_FULL_EXIT, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write s.json: the disk is full" in lines[0], proc.stderr
    assert sorted(os.listdir(after)) == ["s.json"]  # no temporary file, no lock file
    kept = eval_state.read_state(os.path.join(after, "s.json"))  # whole: the clean pass survives
    assert len(kept["clean"]) == 40
    shutil.copy(os.path.join(after, "s.json"), "s.json")
    assert eval_main(argv[3:]) == 0  # resumes once there is space


def test_autoattack_state_file_is_guarded(tmp_path, monkeypatch):
    """run_autoattack's own state file: per-process temporary name, hash-checked, one line on a full disk."""
    from advews.attacks.autoattack import FileState

    store = FileState(str(tmp_path / "aa.json"))
    store.save({"format": "advews-autoattack-state/1", "stages": []})
    assert store.load()["stages"] == [] and os.listdir(tmp_path) == ["aa.json"]
    state = json.loads((tmp_path / "aa.json").read_text())
    state["stages"] = [{"attack": "apgd-ce", "robust": "1111"}]
    (tmp_path / "aa.json").write_text(json.dumps(state))
    with pytest.raises(AdvewsError, match="edited or damaged"):
        store.load()
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(DiskFullError, match="the disk is full.*previous .*aa.json is kept"):
        store.save({"format": "advews-autoattack-state/1", "stages": []})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["aa.json"]


def test_help_documents_exit_codes():
    from advews.cli.eval import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "4 the disk (or quota) is full" in text and "2 bad input" in text
