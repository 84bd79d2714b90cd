"""The README's 'write your own defense' example runs exactly as documented, vanilla and with EWS."""

import json
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY = ["train.epochs = 1", "data.train_limit = 256", "data.val_size = 64", "AT.steps = 2", "train.val_steps = 2"]


@pytest.mark.parametrize("recipe, defense", [("logit_pairing.gin", "LogitPairingAT"),
                                             ("logit_pairing_ews.gin", "LogitPairingAT_EWS")])
def test_own_defense_example(tmp_path, recipe, defense):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "advews.cli.train", "--gin", recipe, "--output", str(out), "--quiet"]
    for p in TINY:
        cmd += ["--gin-param", p]
    proc = subprocess.run(cmd, cwd=EXAMPLES, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"train.defense = '{defense}'" in (out / "config.gin").read_text()
    assert "LogitPairingAT.pairing = 0.5" in (out / "config.gin").read_text()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["epoch"] == 1
    if defense.endswith("_EWS"):
        assert row["train_ews_kl"] > 0
