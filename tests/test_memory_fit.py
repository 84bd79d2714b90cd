"""EWS backpropagates the defense's loss before its subnet forward (one graph held at a time): the
accumulated gradients equal those of the summed loss, AMP scaling and the divergence guard still
work, and a defense implementing only ``loss`` is untouched."""

import copy

import pytest
import torch

import advews.defenses.ews as ews
from advews.defenses import DEFENSES
from advews.engine.backward import StepBackward
from advews.engine.checkpoint import load_checkpoint
from advews.engine.precision import Precision
from advews.models import build_model

import test_reliability as rel

CPU = torch.device("cpu")


def setup(name, **options):
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                         "options": {"widths": (8, 16, 16)}}).train()
    defense = DEFENSES[name](eps=0.3, step_size=0.1, steps=2, **options)
    defense.setup(model)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return model, defense, defense.prepare(model, x, y)


def gradients(model, defense, batch, backward=None):
    """One step's gradients (begin_step, training_loss, backward, end_step), from a fixed RNG."""
    torch.manual_seed(1)
    defense.begin_step(model, batch)
    out = defense.training_loss(model, batch, backward)
    if not out.backpropagated:
        out.loss.backward()
    defense.end_step(model)
    return out, [p.grad.clone() for p in model.parameters()]


class Recording(StepBackward):
    """The loop's backward, noting how many model forwards with gradients had run at each call."""

    def __init__(self, model):
        super().__init__(Precision("none", CPU))
        self.forwards, self.at_calls = 0, []
        model.register_forward_hook(lambda *_: setattr(self, "forwards", self.forwards + torch.is_grad_enabled()))

    def __call__(self, loss):
        self.at_calls.append(self.forwards)
        super().__call__(loss)


@pytest.mark.parametrize("name, defense_forwards", [("AT_EWS", 1), ("TRADES_EWS", 2), ("AT_AWP_EWS", 1),
                                                     ("TRADES_AWP_EWS", 2)])
def test_staged_gradients_equal_the_summed_loss(name, defense_forwards):
    options = {"gamma": 0.01, "warmup_epochs": 0} if "AWP" in name else {}
    model, defense, batch = setup(name, interval=1, **options)
    staged_model, staged_defense = copy.deepcopy((model, defense))
    summed, expected = gradients(model, defense, batch)
    backward = Recording(staged_model)
    staged, got = gradients(staged_model, staged_defense, batch, backward)
    assert staged.backpropagated and not staged.loss.requires_grad
    assert torch.equal(staged.loss, summed.loss.detach())
    # the defense's loss is backpropagated before the subnet forwards, each view's KL after its own
    assert backward.at_calls == list(range(defense_forwards, 2 * defense_forwards + 1))
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    for p, q in zip(staged_model.parameters(), model.parameters()):  # AWP restored the same weights
        assert torch.equal(p, q)


@pytest.mark.parametrize("name, options", [("AT", {}), ("AT_EWS", {"lam": 0.0})])
def test_plain_defense_and_lam_zero_leave_the_backward_to_the_loop(name, options):
    model, defense, batch = setup(name, **options)
    backward = Recording(model)
    out = defense.training_loss(model, batch, backward)
    assert not out.backpropagated and out.loss.requires_grad and backward.at_calls == []


def test_amp_scaling_applies_to_every_part():
    model, defense, batch = setup("TRADES_EWS", interval=1)
    scaled_model, scaled_defense = copy.deepcopy((model, defense))
    _, plain = gradients(model, defense, batch, StepBackward(Precision("none", CPU)))
    precision = Precision("none", CPU)
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # fp16's scaler, on the CPU
    _, scaled = gradients(scaled_model, scaled_defense, batch, StepBackward(precision))
    for a, b in zip(scaled, plain):
        assert torch.allclose(a, 1024.0 * b, rtol=1e-5, atol=1e-6)


def test_divergence_guard_sees_a_nonfinite_kl(tmp_path, monkeypatch):
    """A NaN in the separately backpropagated KL still reaches the guard (loss and gradient norm)."""
    original, calls = ews.distillation_kl, []

    def kl(teacher, student):
        calls.append(1)
        value = original(teacher, student)
        return value * float("nan") if len(calls) == 2 else value

    monkeypatch.setattr(ews, "distillation_kl", kl)
    run = tmp_path / "run"
    assert rel.train(run, *rel.TINY, *rel.EWS, "train.epochs = 1", "train.nonfinite = 'skip'") == 0
    state = load_checkpoint(run / "last.pt")
    assert state["guard"]["skipped"] == 1 and rel.all_finite(state)
