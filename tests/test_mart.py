"""MART: the loss against its formula written out independently, the attack's ball, the EWS variant."""

import torch
import torch.nn.functional as F

from advews.defenses import DEFENSES, MART
from advews.defenses.ews import EWSMixin
from advews.models import build_model


def tiny_model():
    torch.manual_seed(0)
    return build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                        "options": {"widths": (4, 8, 8)}})


def data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def mart_formula(logits_clean, logits_adv, y, beta):
    """Per-example loops over MART's definition (Wang et al. 2020, eq. 6 with the code's 1.0001)."""
    p, q = logits_clean.softmax(1), logits_adv.softmax(1)
    total = 0.0
    for i in range(len(y)):
        top2 = q[i].argsort()[-2:]  # the runner-up if the top class is the label
        wrong = top2[0] if top2[1] == y[i] else top2[1]
        bce = -q[i, y[i]].log() - (1.0001 - q[i, wrong]).log()
        kl = sum(p[i, c] * (p[i, c].log() - q[i, c].log()) for c in range(p.shape[1]))
        total = total + bce + beta * kl * (1 - p[i, y[i]])
    return total / len(y)


def test_defaults_follow_the_mart_code():
    d = MART()
    assert d.adversarial and d.beta == 6.0
    assert (d.attack.eps, d.attack.step_size, d.attack.steps) == (0.031, 0.007, 10)
    assert (d.attack.start, d.attack.clamp_start, d.attack.model_mode) == ("normal", False, "eval")


def test_mart_loss_matches_formula():
    model, (x, y) = tiny_model(), data()
    model.train()
    d = MART(beta=5.0, eps=0.3, step_size=0.1, steps=3)
    batch = d.prepare(model, x, y)
    out = d.loss(model, batch)
    lc, la = model(x), model(batch.x_adv)
    assert torch.allclose(out.loss, mart_formula(lc, la, y, 5.0), rtol=1e-5, atol=1e-6)
    assert [v.weight for v in out.views] == [1.0, 5.0]
    assert out.views[0].x is batch.x and out.views[1].x is batch.x_adv and out.search_x is batch.x_adv
    assert out.metrics["robust_kl"] > 0
    smooth = MART(beta=5.0, label_smoothing=0.1).loss(model, batch).loss  # smoothing touches the CE only
    ce_shift = F.cross_entropy(la, y, label_smoothing=0.1) - F.cross_entropy(la, y)
    assert torch.allclose(smooth - out.loss, ce_shift, atol=1e-5)


def test_attack_stays_in_the_ball_and_raises_the_loss():
    model, (x, y) = tiny_model(), data()
    d = MART(eps=0.1, step_size=0.05, steps=5)
    x_adv = d.prepare(model, x, y).x_adv
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_mart_ews_adds_a_positive_distillation_term():
    cls = DEFENSES["MART_EWS"]
    assert issubclass(cls, EWSMixin) and issubclass(cls, MART)
    model, (x, y) = tiny_model(), data()
    model.train()
    d = cls(eps=0.3, step_size=0.1, steps=2, lam=1.0, rho=0.5)
    d.setup(model)
    batch = d.prepare(model, x, y)
    out = d.training_loss(model, batch)
    assert out.metrics["ews_kl"] > 1e-4
    assert torch.allclose(out.loss, MART.loss(d, model, batch).loss + out.metrics["ews_kl"], rtol=1e-5)
