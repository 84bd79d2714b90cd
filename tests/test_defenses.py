"""The defense contract, the registry, and the TRADES loss against its formula."""

import torch
import torch.nn.functional as F

from advews.defenses import AT, DEFENSES, TRADES, Batch, Standard, register_defense
from advews.models import build_model


def tiny_model():
    torch.manual_seed(0)
    return build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                        "options": {"widths": (4, 8, 8)}})


def test_trades_loss_matches_formula():
    model = tiny_model()
    x = torch.rand(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    d = TRADES(beta=6.0, eps=0.1, step_size=0.02, steps=3)
    model.train()
    batch = d.prepare(model, x, y)
    assert (batch.x_adv - x).abs().max() <= 0.1 + 1e-6
    out = d.loss(model, batch)
    # independent computation: CE(f(x), y) + beta * sum_{i,c} p_c(x_i) (log p_c(x_i) - log p_c(x'_i)) / N
    lc, la = model(x), model(batch.x_adv)
    p = lc.softmax(1)
    kl = (p * (p.log() - la.log_softmax(1))).sum() / x.shape[0]
    expected = F.cross_entropy(lc, y) + 6.0 * kl
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert [v.weight for v in out.views] == [1.0, 6.0]
    assert out.search_x is batch.x_adv


def test_label_smoothing_changes_the_loss():
    model = tiny_model()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    plain = Standard().loss(model, Batch(x, y)).loss
    smooth = Standard(label_smoothing=0.1).loss(model, Batch(x, y)).loss
    assert not torch.allclose(plain, smooth)
    assert torch.allclose(smooth, F.cross_entropy(model(x), y, label_smoothing=0.1), atol=1e-6)


def test_at_trains_on_adversarial_view():
    model = tiny_model()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    d = AT(eps=0.3, step_size=0.1, steps=2)
    batch = d.prepare(model, x, y)
    out = d.loss(model, batch)
    assert out.views[0].x is batch.x_adv and out.search_x is batch.x_adv
    assert AT.adversarial and TRADES.adversarial and not Standard.adversarial


def test_eps_scale_shrinks_the_attack():
    model = tiny_model()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    d = AT(eps=0.3, step_size=0.1, steps=2)
    d.set_progress(0, 0.25)
    assert (d.prepare(model, x, y).x_adv - x).abs().max() <= 0.075 + 1e-6


def test_user_defense_is_registered():
    @register_defense
    class HalfAT(AT):
        """A user objective: average of clean and adversarial CE."""

        def loss(self, model, batch):
            out = super().loss(model, batch)
            out.loss = 0.5 * out.loss + 0.5 * self.cross_entropy(model(batch.x), batch.y)
            return out

    assert DEFENSES["HalfAT"] is HalfAT
    model = tiny_model()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    d = HalfAT(eps=0.1, steps=1, step_size=0.1)
    assert torch.isfinite(d.loss(model, d.prepare(model, x, y)).loss)
