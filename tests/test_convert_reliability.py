"""advews-data convert under failure (issue 17, probe sections 3 and 8): a full disk is exit 4 and
one line that blames the disk, not the input (DF9); a failed convert leaves no directory it created
and no partial file; a convert killed between its two renames does not block its own rerun (CV36,
CV37). Unusable output paths (CV24, CV25, CV31) are rows of tests/test_bad_input_loaders.py.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import small_disk

from advews.cli.data import main as data_main
from advews.data import convert as convert_mod
from advews.errors import DISK_FULL_EXIT


@pytest.fixture
def source(tmp_path):
    """A 20 x 64 x 64 x 3 npz (245 kB of images) and its arrays."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 64, 64, 3), dtype=np.uint8), np.arange(20) % 10
    np.savez(tmp_path / "src.npz", image=images, label=labels)
    return str(tmp_path / "src.npz"), images, labels


@pytest.mark.parametrize("existing", [False, True])
def test_convert_on_a_full_disk_is_exit_4_and_leaves_nothing(source, tmp_path, monkeypatch, capfd, existing):
    """DF9, fault-injected: the line names the output file and the full disk, not the input."""
    out = tmp_path / "new" / "out"
    if existing:
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine\n")
    monkeypatch.setattr(convert_mod, "open", small_disk.failing_open(open, OSError(errno.ENOSPC, "No space left on device")),
                        raising=False)
    capfd.readouterr()
    assert data_main(["convert", source[0], str(out)]) == DISK_FULL_EXIT
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and str(out / "images.npy") in err[0], err
    assert "corrupt" not in err[0]
    assert (os.listdir(out) == ["notes.txt"]) if existing else not (tmp_path / "new").exists()


def test_another_write_error_blames_the_output_not_the_input(source, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(convert_mod, "open", small_disk.failing_open(open, OSError(errno.EIO, "Input/output error")),
                        raising=False)
    capfd.readouterr()
    assert data_main(["convert", source[0], str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0] and "Input/output error" in err[0] and "corrupt" not in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not small_disk.available(), reason="cannot mount a tmpfs here")
def test_convert_on_a_real_full_disk(source, tmp_path):
    """DF9 on a 1 MB tmpfs with 50 kB free."""
    proc, after = small_disk.run_on_small_disk(
        str(tmp_path / "disk_run"), [sys.executable, "-m", "advews.cli.data", "convert", source[0], "out"],
        size="1M", free=50_000)
    assert proc.returncode == DISK_FULL_EXIT, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and "out/images.npy" in err[0], proc.stderr
    assert os.listdir(after) == []


def test_a_failed_convert_leaves_no_directory_it_created(tmp_path, capfd):
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert data_main(["convert", str(tmp_path / "cut.npz"), str(tmp_path / "a" / "b")]) == 2
    assert not (tmp_path / "a").exists()


def test_a_convert_killed_between_its_renames_does_not_block_its_rerun(source, tmp_path, capfd):
    """CV36 / CV37: killed after images.npy was renamed, before labels.npy was: the directory holds
    an incomplete pair, which the rerun replaces; the result equals the input."""
    path, images, labels = source
    out = tmp_path / "kc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVEWS_TEST_KILL_AT": "before-rename:labels.npy"}
    proc = subprocess.run([sys.executable, "-m", "advews.cli.data", "convert", path, str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    left = sorted(os.listdir(out))
    assert left[0] == "images.npy" and len(left) == 2 and left[1].startswith("labels.npy."), left
    assert data_main(["convert", path, str(out)]) == 0
    assert sorted(os.listdir(out)) == ["images.npy", "labels.npy"]  # the dead process's temporary file is gone
    assert np.array_equal(np.load(out / "images.npy"), images) and np.array_equal(np.load(out / "labels.npy"), labels)


def test_the_leftovers_of_an_older_advews_do_not_block_a_rerun(source, tmp_path):
    """The probe's exact state: images.npy and labels.npy.partial."""
    path, images, labels = source
    out = tmp_path / "kc"
    out.mkdir()
    np.save(out / "images.npy", images[:3])
    (out / "labels.npy.partial").write_bytes(b"half")
    assert data_main(["convert", path, str(out)]) == 0
    assert sorted(os.listdir(out)) == ["images.npy", "labels.npy"]
    assert np.array_equal(np.load(out / "images.npy"), images)


def test_a_complete_conversion_is_never_overwritten(source, tmp_path, capfd):
    path = source[0]
    assert data_main(["convert", path, str(tmp_path / "out")]) == 0
    before = {n: (tmp_path / "out" / n).read_bytes() for n in ("images.npy", "labels.npy")}
    capfd.readouterr()
    assert data_main(["convert", path, str(tmp_path / "out")]) == 2
    assert "already" in capfd.readouterr().err
    assert before == {n: (tmp_path / "out" / n).read_bytes() for n in ("images.npy", "labels.npy")}
