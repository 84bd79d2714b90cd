"""The audit catches the classic ways an evaluation is fooled, each by the indicator meant for it, and
raises nothing on an honestly adversarially trained model.

The honest model is a small CNN trained here with PGD AT on 2000 embedded MNIST digits (eps 0.2);
each fooling model wraps it: input quantization (shattered gradients), a softmax head, logits scaled
by 1e4 (saturated cross-entropy), a randomized input transform, and an honest model audited with a
1-step attack (unconverged)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advews.api.audit import bpda_surrogate, card_markdown, merge_audits, run_audit, write_card
from advews.data.mnist5k import load_mnist5k
from advews.errors import AdvewsError
from advews.evaluation.audit import INDICATORS, AuditSettings, incomplete, paired

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 0.2
FAST = dict(square_queries=300, eot=4, best_of=4)


def honest_cnn() -> nn.Module:
    torch.manual_seed(0)
    train, _ = load_mnist5k()
    x, y = train.images[:2000].float() / 255, train.labels[:2000]
    model = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 5, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        for i in range(0, len(y), 100):
            xb, yb = x[i:i + 100], y[i:i + 100]
            delta = torch.empty_like(xb).uniform_(-EPS, EPS)
            for _ in range(5):
                delta.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(model((xb + delta).clamp(0, 1)), yb), delta)
                delta = (delta + EPS / 3 * g.sign()).clamp(-EPS, EPS).detach()
            loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class Quantized(nn.Module):
    """Rounds pixels to 4 levels first: the gradient through ``round`` is zero (shattered gradients)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.quantize, self.inner = Round(), inner

    def forward(self, x):
        return self.inner(self.quantize(x))


class Round(nn.Module):
    def forward(self, x):
        return torch.round(x * 3) / 3


class Wrapped(nn.Module):
    def __init__(self, inner: nn.Module, how):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x):
        return self.how(self.inner, x)


@pytest.fixture(scope="module")
def honest():
    _, test = load_mnist5k()
    return honest_cnn(), test.images[:100].float() / 255, test.labels[:100]


def audit(model, x, y, surrogate=None, **settings):
    card = run_audit(model, x, y, AuditSettings(eps=EPS, **{**FAST, **settings}), batch_size=50,
                     surrogate=surrogate, surrogate_name="given" if surrogate is not None else None)
    return card, {r["indicator"] for r in card["indicators"] if r["flagged"]}


def test_honest_model_raises_no_indicator(honest):
    card, flags = audit(*honest)
    assert flags == set(), card["indicators"]
    assert card["verdict"] == "no indicator of attack failure"
    unbounded = next(r for r in card["indicators"] if r["indicator"] == "unbounded")
    assert unbounded["figures"]["robust_acc"] <= 0.01
    assert 0.2 < card["robust_acc"] < card["clean_acc"]


@pytest.mark.parametrize("name, wrap, expected", [
    ("quantized input", Quantized, {"gradients", "unbounded", "black_box"}),
    ("softmax head", lambda m: Wrapped(m, lambda inner, x: F.softmax(inner(x), 1)), {"gradients"}),
    ("logits x 1e4", lambda m: Wrapped(m, lambda inner, x: 1e4 * inner(x)), {"gradients", "unbounded", "black_box"}),
])
def test_each_fooling_model_is_caught_by_its_indicator(honest, name, wrap, expected):
    model, x, y = honest
    card, flags = audit(wrap(model), x, y)
    assert expected <= flags, (name, card["indicators"])
    assert card["verdict"].startswith("flagged: ")


def test_randomized_model_switches_to_eot_and_best_of_k(honest):
    model, x, y = honest
    noisy = Wrapped(model, lambda inner, x: inner((x + 0.3 * torch.randn_like(x)).clamp(0, 1)))
    card, flags = audit(noisy, x[:40], y[:40], indicators=("stochasticity", "gradients", "unbounded"))
    assert "stochasticity" in flags and card["randomized"]
    row = next(r for r in card["indicators"] if r["indicator"] == "stochasticity")
    assert row["figures"]["best_of"] == 4 and row["figures"]["eot"] == 4
    single, _ = audit(model, x[:40], y[:40], indicators=("stochasticity",))
    assert not single["randomized"]


def test_one_step_attack_fires_convergence(honest):
    card, flags = audit(*honest, steps=1, indicators=("convergence",))
    assert flags == {"convergence"}, card["indicators"]


def test_bpda_transfer_breaks_the_quantized_model(honest):
    model, x, y = honest
    fooled = Quantized(model)
    card, flags = audit(fooled, x, y, surrogate=bpda_surrogate(fooled, ["quantize"]), indicators=("transfer",))
    assert flags == {"transfer"}
    row = card["indicators"][0]
    assert row["figures"]["broken_after_white_box"] > 0.3
    _, honest_flags = audit(model, x, y, surrogate=model, indicators=("transfer",))
    assert honest_flags == set()


def test_incomplete_optimisation_is_a_loss_still_rising_at_the_end():
    """Pintor et al.'s indicator: rescaled best-so-far loss rising > 0.05 within the last 10 steps."""
    steps = torch.arange(50, dtype=torch.float64)
    rising = steps.clone()                       # linear to the end
    settled = 1 - torch.exp(-steps / 3)          # flat long before the end
    noisy = settled + 0.01 * torch.sin(steps)    # wiggles that never beat the best so far by much
    assert incomplete(torch.stack([rising, settled, noisy])).tolist() == [True, False, False]


def test_paired_rule_is_noise_aware():
    assert not paired(3, 1) and paired(12, 1) and not paired(1, 0) and not paired(20, 14)


def test_resume_and_shards_give_the_card_of_one_run(honest, tmp_path):
    model, x, y = honest
    x, y = x[:60], y[:60]
    settings = AuditSettings(eps=EPS, square_queries=100, indicators=("gradients", "unbounded", "noise"))
    whole = run_audit(model, x, y, settings, batch_size=20)
    state = str(tmp_path / "a.json")
    run_audit(model, x, y, settings, batch_size=20, state_path=state, shard=(0, 3))
    saved = json.load(open(state))
    assert list(saved["batches"]) == ["0"]
    resumed = run_audit(model, x, y, settings, batch_size=20, state_path=state)  # skips batch 0
    assert resumed["indicators"] == whole["indicators"]
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"s{i}.json"))
        run_audit(model, x, y, settings, batch_size=20, state_path=paths[-1], shard=(i, 2))
    assert merge_audits(paths)["indicators"] == whole["indicators"]
    with pytest.raises(AdvewsError, match="lack batches"):
        merge_audits(paths[:1])
    edited = json.load(open(paths[0]))
    edited["batches"]["0"]["base_robust"] = 20
    json.dump(edited, open(paths[0], "w"))
    with pytest.raises(AdvewsError, match="changed after it was written"):
        merge_audits(paths)
    from advews.api.eval_state import StateLock

    with StateLock(state + ".lock", "--state", "wait"):  # a second process on the same state file
        with pytest.raises(AdvewsError, match=r"in use by another advews process \(pid \d+\)"):
            run_audit(model, x, y, settings, batch_size=20, state_path=state)
    with pytest.raises(AdvewsError, match="another audit"):
        run_audit(model, x, y, AuditSettings(eps=0.1, indicators=("noise",)), batch_size=20, state_path=state)


def test_card_is_json_and_markdown(honest, tmp_path):
    model, x, y = honest
    card = run_audit(model, x[:20], y[:20], AuditSettings(eps=EPS, indicators=("gradients", "noise")), batch_size=20)
    written = write_card(card, str(tmp_path / "audit.json"))
    assert [p.rsplit(".", 1)[1] for p in written] == ["json", "md"]
    assert json.load(open(written[0]))["verdict"] == card["verdict"]
    text = open(written[1]).read()
    assert text == card_markdown(card) and "| gradients | pass |" in text


@pytest.mark.parametrize("settings, needle", [
    (dict(indicators=("magic",)), "'magic'"),
    (dict(sweep=(0.0, 1.0, 0.5)), "0, 1, 0.5"),
    (dict(best_of=0), "best_of"),
    (dict(eot=0), "eot"),
    (dict(eps=float("nan")), "nan"),
])
def test_bad_settings_are_one_line(settings, needle):
    with pytest.raises(AdvewsError) as e:
        AuditSettings(**{"eps": EPS, **settings})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_indicator_is_documented():
    from advews.evaluation.audit import MEANING

    assert set(MEANING) == set(INDICATORS)
