"""--amp bf16|fp16 on the CPU: attacks run under autocast, every adversarial example is re-checked in
fp32 and the points still robust are attacked again in fp32; the JSON and report give the counts. A
model whose bf16 logits differ from its fp32 ones triggers the warning while its fp32-verified robust
accuracy stays the fp32 truth; a model whose gradient underflows in fp16 (so the fp16 attack breaks
nothing) gets the fp32 attack's robust accuracy back from the re-attack, with --state resume,
--fixed-batches and --shards too."""

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
    assert [s["attack"] for s in aa["stages"]] == ["apgd-ce", "apgd-t", "apgd-ce-fp32", "apgd-t-fp32"]
    assert aa["version"] == "fast"  # then the same cascade in fp32 on the survivors
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
    assert out["missed_low_precision"] == 1  # point 3: bf16 missed it
    assert "1 of the 2 points broken in bf16" in out["precision_warning"]  # 1 of 5 = 20 points apart
    assert "1 points the bf16 attack did not break" in out["precision_warning"]
    assert "precision_warning" not in precision_summary(clean, robust, robust, "bf16")  # they agree


class Underflow(nn.Module):
    """Class 0 leads the others by 24 logits at pixels 0.5 and by ~126 at 0.9; an Linf step of 0.1
    down every pixel flips the first (not the second). The cross-entropy's gradient there (~1e-10)
    underflows to 0 in fp16, so an attack run in fp16 cannot move, while in fp32 (and bf16) it can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():
            self.fc.weight.fill_(-4.0)
            self.fc.weight[0] = 0.0
            self.fc.bias.fill_(128.0 - 24.0)
            self.fc.bias[0] = 0.0

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture
def halves(tmp_path):
    """16 examples of class 0: the even ones breakable (pixels 128/255), the odd ones not (230/255)."""
    pixels = np.where(np.arange(16) % 2 == 0, 128, 230).astype(np.uint8)
    x = np.ones((16, 8, 8, 1), np.uint8) * pixels[:, None, None, None]
    np.savez(tmp_path / "h.npz", x=x, y=np.zeros(16, np.int64))
    return f"npz:{tmp_path / 'h.npz'}"


def underflow_eval(data, amp, **kwargs):
    return advews.evaluate(Underflow(), data=data, eps=0.1, steps=3, amp=amp, device="cpu", batch_size=8, **kwargs)


def test_fp32_reattack_restores_the_fp32_number_when_fp16_is_weaker(halves):
    fp32 = underflow_eval(halves, None, attacks="fgsm,pgd")
    fp16 = underflow_eval(halves, "fp16", attacks="fgsm,pgd")
    assert fp32["robust_acc"] == 0.5 and fp32["clean_acc"] == 1.0
    for name in ("fgsm", "pgd"):
        entry = fp16["attacks"][name]
        assert entry["robust_acc"] == fp32["attacks"][name]["robust_acc"] == 0.5  # not 1.0
        assert entry["robust_acc_low_precision"] == 1.0 and entry["broken_low_precision"] == 0
        assert (entry["missed_low_precision"], entry["broken_fp32"], entry["confirmed_fp32"]) == (8, 8, 0)
        # the stages: 16 points survive fp16 (checked in fp32), the fp32 re-attack of them breaks 8
        stages = [(s["attack"], s["robust_acc"]) for s in entry["stages"]]
        assert stages == [(f"{name}-fp16", 1.0), (f"{name}-fp32", 0.5)]
        assert "8 points the fp16 attack did not break" in entry["precision_warning"]
    assert fp16["robust_acc"] == fp32["robust_acc"]


def test_no_difference_leaves_the_numbers_unchanged(halves):
    fp32 = underflow_eval(halves, None, attacks="fgsm,pgd")
    bf16 = underflow_eval(halves, "bf16", attacks="fgsm,pgd")  # bf16 keeps fp32's exponent: no underflow
    for name in ("fgsm", "pgd"):
        entry = bf16["attacks"][name]
        assert entry["robust_acc"] == entry["robust_acc_low_precision"] == fp32["attacks"][name]["robust_acc"] == 0.5
        assert (entry["broken_low_precision"], entry["confirmed_fp32"], entry["missed_low_precision"]) == (8, 8, 0)
        assert [s["robust_acc"] for s in entry["stages"]] == [0.5, 0.5]  # the re-attack broke nothing
        assert "precision_warning" not in entry


def test_fp16_autoattack_survivors_attacked_again_in_fp32(halves):
    kwargs = dict(attacks="autoattack", version="custom", aa_attacks="apgd-ce")
    fp32 = underflow_eval(halves, None, **kwargs)
    fp16 = underflow_eval(halves, "fp16", **kwargs)
    entry = fp16["attacks"]["autoattack"]
    assert fp32["robust_acc"] == entry["robust_acc"] == 0.5
    assert [(s["attack"], s["robust_acc"]) for s in entry["stages"]] == [("apgd-ce", 1.0), ("apgd-ce-fp32", 0.5)]
    assert (entry["broken_low_precision"], entry["missed_low_precision"]) == (0, 8)


def test_reattack_resumes_and_shards(halves, tmp_path, monkeypatch, capsys):
    from advews.api import precision_check

    whole = underflow_eval(halves, "fp16", attacks="pgd", fixed_batches=True)
    calls = []
    reattack = precision_check._reattack

    def dies_in_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return reattack(*args)

    monkeypatch.setattr(precision_check, "_reattack", dies_in_second_batch)
    state = tmp_path / "s.json"
    with pytest.raises(KeyboardInterrupt):
        underflow_eval(halves, "fp16", attacks="pgd", fixed_batches=True, state=str(state))
    assert json.loads(state.read_text())["progress"]["pgd"]["batches"] == 1
    resumed = underflow_eval(halves, "fp16", attacks="pgd", fixed_batches=True, state=str(state))
    assert len(calls) == 3  # the second batch only, again
    entry = resumed["attacks"]["pgd"]
    assert entry["stages"][0]["resumed"] and entry["robust_acc"] == whole["robust_acc"] == 0.5
    assert [s["robust_acc"] for s in entry["stages"]] == [s["robust_acc"] for s in whole["attacks"]["pgd"]["stages"]]
    cost = ("forward_passes", "backward_passes", "flops")  # counted only for an attack run whole
    assert not set(cost) & set(entry) and set(cost) <= set(whole["attacks"]["pgd"])
    assert {k: v for k, v in entry.items() if k not in ("seconds", "stages")} == \
        {k: v for k, v in whole["attacks"]["pgd"].items() if k not in ("seconds", "stages", *cost)}
    monkeypatch.chdir(tmp_path)  # two array jobs and --merge: the same flags
    base = ["--model", "test_amp_eval:Underflow", "--data", halves, "--eps", "0.1", "--steps", "3", "--attack", "pgd",
            "--amp", "fp16", "--batch-size", "8", "--fixed-batches", "--shards", "2", "--state", "p.json"]
    assert all(eval_main(base + ["--shard", str(i)]) == 0 for i in range(2))
    assert eval_main(["--merge", "p.shard0of2.json", "p.shard1of2.json", "--output", "m.json"]) == 0
    report = capsys.readouterr().out
    merged = json.loads((tmp_path / "m.json").read_text())["attacks"]["pgd"]
    assert merged["robust_acc"] == 0.5 and merged["missed_low_precision"] == 8
    assert [s["robust_acc"] for s in merged["stages"]] == [1.0, 0.5]
    assert "8 points the fp16 attack did not break" in report
