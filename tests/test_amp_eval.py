"""--amp bf16 on the CPU: attacks run under autocast, every adversarial example is re-checked in fp32,
the JSON and report give both counts, and a model whose bf16 logits differ from its fp32 ones
triggers the warning while its fp32-verified robust accuracy stays the fp32 truth."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import advews
from advews.api.precision_check import precision_summary
from advews.cli.eval import main as eval_main


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class Knife(nn.Module):
    """Class 1 wins by 0.001 in fp32; bf16 (8 bits of mantissa) rounds it to a tie that class 0 wins."""

    def forward(self, x):
        logits = -torch.arange(10.0).repeat(len(x), 1)
        logits[:, 0] = 1.0
        logits[:, 1] = 1.001 + 0 * x.flatten(1).sum(1)
        return nn.functional.linear(logits, torch.eye(10))  # autocast runs this in bf16


@pytest.fixture
def npz(tmp_path):
    x = torch.randint(0, 256, (16, 8, 8, 1), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        y = mlp()(x.permute(0, 3, 1, 2).float() / 255).argmax(1)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    return tmp_path / "d.npz"


def test_bf16_fast_autoattack_reports_both_counts(npz, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    assert eval_main(["--model", "test_amp_eval:mlp", "--data", f"npz:{npz}", "--eps", "0.1", "--attack",
                      "pgd,autoattack", "--version", "fast", "--steps", "3",
                      "--amp", "bf16", "--output", str(out)]) == 0
    report = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["amp"] == "bf16"
    aa = result["attacks"]["autoattack"]  # --version fast: APGD-CE + APGD-T, flagged as not the standard AA
    assert [s["attack"] for s in aa["stages"]] == ["apgd-ce", "apgd-t"] and aa["version"] == "fast"
    assert any("not the standard AutoAttack" in w for w in aa["warnings"]) and "not the standard AutoAttack" in report
    for name, entry in result["attacks"].items():
        assert entry["amp"] == "bf16" and f"{name} in bf16:" in report
        assert entry["confirmed_fp32"] <= entry["broken_low_precision"]
        n_clean = round(result["clean_acc"] * 16)
        assert round(entry["robust_acc"] * 16) == n_clean - entry["broken_fp32"]  # the fp32 count is reported
        assert 0 < entry["broken_fp32"]


def test_bf16_breaks_that_fp32_does_not_confirm_warn(tmp_path):
    x = np.full((8, 4, 4, 1), 100, np.uint8)
    np.savez(tmp_path / "k.npz", x=x, y=np.ones(8, np.int64))  # class 1: correct in fp32
    result = advews.evaluate(Knife(), data=f"npz:{tmp_path / 'k.npz'}", attacks="fgsm", eps=0.01, amp="bf16",
                             device="cpu")
    entry = result["attacks"]["fgsm"]
    assert result["clean_acc"] == 1.0 and entry["robust_acc"] == 1.0  # fp32 holds every point
    assert entry["broken_low_precision"] == 8 and entry["confirmed_fp32"] == 0
    assert entry["robust_acc_low_precision"] == 0.0
    assert "8 of the 8 points broken in bf16" in entry["precision_warning"]


def test_precision_summary_by_hand():
    clean = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    low = torch.tensor([0, 0, 1, 1, 0], dtype=torch.bool)  # bf16 breaks points 0 and 1
    robust = torch.tensor([0, 1, 1, 0, 0], dtype=torch.bool)  # fp32 confirms 0, and breaks 3 on its own
    out = precision_summary(clean, robust, low, "bf16")
    assert (out["broken_low_precision"], out["confirmed_fp32"], out["broken_fp32"]) == (2, 1, 2)
    assert "precision_warning" in out  # 1 of 5 = 20 points apart
    assert "precision_warning" not in precision_summary(clean, robust, robust, "bf16")  # they agree
