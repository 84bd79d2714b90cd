"""What a loader reads is checked before use (issue 17, probe sections 4, 5 and 11).

The export carries the SHA-256 of its weights and every loader checks it; what has no hash (an
export or checkpoint of an older advews, or one whose hash was removed) still loads but says once
that it is unverified; a data_spec key this advews does not know is named and ignored; a disk
that fills up under advews-export is exit 4 and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import pytest
import small_disk
import torch
from test_bad_input_loaders import flip_200, flip_bit

import advews
from advews.cli.eval import main as eval_main
from advews.cli.export import main as export_main
from advews.engine import export as export_mod
from advews.engine.checkpoint import HASH_KEY, load_checkpoint, rng_state, save_checkpoint
from advews.engine.export import load_export
from advews.engine.model_check import check_rng_states
from advews.errors import DISK_FULL_EXIT, AdvewsError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def good(world: str, tmp_path_factory) -> str:
    """A folder holding G.pt (the world's trained run) and its export ex."""
    root = tmp_path_factory.mktemp("checks")
    shutil.copy(os.path.join(world, "run", "last.pt"), root / "G.pt")
    assert export_main([str(root / "G.pt"), str(root / "ex")]) == 0
    return str(root)


def test_export_records_the_sha256_of_its_weights_and_a_load_checks_it(good, tmp_path, capfd):
    config = json.load(open(os.path.join(good, "ex", "config.json")))
    weights = open(os.path.join(good, "ex", "model.safetensors"), "rb").read()
    assert config["sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    for damage in (flip_200, flip_bit):  # the probe's 200 bytes, and a single bit (EX26)
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        shutil.copytree(os.path.join(good, "ex"), tmp_path / "d")
        damage(str(tmp_path / "d" / "model.safetensors"))
        with pytest.raises(AdvewsError, match="does not match the SHA-256 in .*config.json"):
            load_export(str(tmp_path / "d"))
        with pytest.raises(AdvewsError, match="bytes changed on disk"):
            advews.load_model(str(tmp_path / "d"))
        capfd.readouterr()
        assert eval_main(["--checkpoint", str(tmp_path / "d"), "--attack", "none", "--n-examples", "8"]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model.safetensors does not match the SHA-256" in err[0]


def test_an_export_without_a_hash_loads_but_says_once_it_is_unverified(good, tmp_path, capfd):
    old = tmp_path / "old"
    shutil.copytree(os.path.join(good, "ex"), old)
    config = json.load(open(old / "config.json"))
    del config["sha256"]  # as advews wrote exports before this change
    (old / "config.json").write_text(json.dumps(config))
    capfd.readouterr()
    first = advews.load_model(str(old))
    second = advews.load_model(str(old))
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "unverified" in err[0], err
    assert str(old / "model.safetensors") in err[0]
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_a_checkpoint_without_its_hash_loads_but_says_once_it_is_unverified(good, tmp_path, capfd):
    """TC04: the content_hash key removed (and a weight changed); an old checkpoint that predates
    hashes (no format 2) loads with the same warning, naming why."""
    state = {k: v for k, v in load_checkpoint(os.path.join(good, "G.pt")).items() if k != HASH_KEY}
    state["model"] = {**state["model"], "model.linear.bias": state["model"]["model.linear.bias"] + 1}
    torch.save(state, tmp_path / "nohash.pt")
    old = {k: v for k, v in state.items() if k != "format"}
    torch.save(old, tmp_path / "old.pt")
    capfd.readouterr()
    for _ in range(2):
        advews.load_model(str(tmp_path / "nohash.pt"))
    advews.load_model(str(tmp_path / "old.pt"))
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert "nohash.pt has no content hash (its content_hash entry was removed)" in err[0] and "unverified" in err[0]
    assert "old.pt has no content hash (it was written before" in err[1]


def test_an_unknown_data_spec_key_is_named_once_and_ignored(good, tmp_path, capfd):
    """EX13 / TC15: {"dataset": "mnist5k", "bogus": 1}, as a newer advews's data setting would be."""
    state = {k: v for k, v in load_checkpoint(os.path.join(good, "G.pt")).items() if k != HASH_KEY}
    state["data_spec"] = {**state["data_spec"], "bogus": 1}
    save_checkpoint(state, str(tmp_path / "newer.pt"))
    capfd.readouterr()
    model = advews.load_model(str(tmp_path / "newer.pt"))
    assert "bogus" not in model.data_spec and model.data_spec["dataset"] == "mnist5k"
    assert eval_main(["--checkpoint", str(tmp_path / "newer.pt"), "--attack", "none", "--n-examples", "8"]) == 0
    assert export_main([str(tmp_path / "newer.pt"), str(tmp_path / "ex")]) == 0
    assert eval_main(["--checkpoint", str(tmp_path / "ex"), "--attack", "none", "--n-examples", "8"]) == 0
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 2 and all("'bogus'" in line and "ignored" in line for line in err), err


def test_resume_rng_entries_are_checked(tmp_path):
    """TC24: a garbage rng entry under a recomputed hash is one line, and the process's RNG is untouched."""
    check_rng_states("last.pt", [rng_state()])
    before = torch.get_rng_state()
    for garbage in ([{"torch": "abc"}], "abc", [], [rng_state(), {"python": [1, 2]}]):
        with pytest.raises(AdvewsError, match="cannot resume last.pt: its rng entry"):
            check_rng_states("last.pt", garbage)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("existing", [False, True])
def test_export_on_a_full_disk_is_exit_4_and_leaves_nothing(good, tmp_path, monkeypatch, capfd, existing):
    """DF8, fault-injected: one line naming the file and the full disk; no partial file, and no
    directory when the export created it (an existing one is left as it was)."""
    out = tmp_path / "out" / "ex"
    if existing:
        out.mkdir(parents=True)
    monkeypatch.setattr(export_mod, "open", small_disk.failing_open(open), raising=False)
    capfd.readouterr()
    assert export_main([os.path.join(good, "G.pt"), str(out)]) == DISK_FULL_EXIT
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and str(out / "model.safetensors") in err[0], err
    assert (os.listdir(out) == []) if existing else not (tmp_path / "out").exists()


@pytest.mark.skipif(not small_disk.available(), reason="cannot mount a tmpfs here")
def test_export_on_a_real_full_disk(good, tmp_path):
    """DF8 on a 2 MB tmpfs with 100 kB free: the weights (300 kB) do not fit."""
    proc, after = small_disk.run_on_small_disk(
        str(tmp_path), [sys.executable, "-m", "advews.cli.export", os.path.join(good, "G.pt"), "ex"],
        size="2M", free=100_000)
    assert proc.returncode == DISK_FULL_EXIT, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and "ex/model.safetensors" in err[0], proc.stderr
    assert os.listdir(after) == []  # no export directory, no temporary file
