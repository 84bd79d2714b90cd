"""Mixed precision: a bf16-autocast training step of every registered defense on the CPU, attacks in eps."""

import pytest
import torch

from advews.defenses import DEFENSES
from advews.engine.precision import Precision
from advews.errors import AdvewsError
from advews.models import build_model

EPS = 8 / 255
ADVERSARIAL_KWARGS = {"eps": EPS, "step_size": 2 / 255, "steps": 2}


def kwargs_for(name):
    cls = DEFENSES[name]
    out = dict(ADVERSARIAL_KWARGS) if cls.adversarial else {}
    if "EWS" in name:
        out.update(rho=0.5, interval=1)
    if "AWP" in name:
        out.update(warmup_epochs=0)
    return out


@pytest.mark.parametrize("name", sorted(n for n in DEFENSES if "Pairing" not in n and "HalfAT" not in n
                                        and "CleanPlusAT" not in n))
def test_bf16_training_step(name):
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 3,
                         "options": {"widths": (8, 16, 16)}})
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    defense = DEFENSES[name](**kwargs_for(name))
    defense.setup(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    precision = Precision("bf16", torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    with precision.autocast():
        batch = defense.prepare(model, x, y)
        defense.begin_step(model, batch)
        out = defense.training_loss(model, batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.logits.dtype == torch.bfloat16  # the forward really ran in bf16
    if batch.x_adv is not None:
        assert (batch.x_adv - x).abs().max() <= EPS + 1e-6
        assert batch.x_adv.dtype == torch.float32 and 0 <= batch.x_adv.min() and batch.x_adv.max() <= 1
    optimizer.zero_grad()
    precision.backward(out.loss)
    precision.step(optimizer)
    defense.end_step(model)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if "EWS" in name:
        assert out.metrics["ews_kl"] > 0
        assert all(p.dtype == torch.float32 for p in defense.search.controller.parameters())


def test_precision_errors():
    with pytest.raises(AdvewsError, match="fp8"):
        Precision("fp8", torch.device("cpu"))
    with pytest.raises(AdvewsError, match="CUDA"):
        Precision("fp16", torch.device("cpu"))
