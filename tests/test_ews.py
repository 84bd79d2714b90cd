"""The EWS mixin on defenses: derived variants, the distillation term, BN safety, search cadence, resume."""

import gin
import torch
import torch.nn.functional as F

from advews.defenses import AT, DEFENSES, TRADES, Standard, build_defense, distillation_kl, register_defense
from advews.defenses.ews import EWSMixin
from advews.models import build_model


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                        "options": {"widths": (8, 8, 16)}})


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_every_defense_has_an_ews_variant():
    for name in ("Standard", "AT", "TRADES"):
        ews = DEFENSES[f"{name}_EWS"]
        assert issubclass(ews, EWSMixin) and issubclass(ews, DEFENSES[name])
    assert not any(name.endswith("_EWS_EWS") for name in DEFENSES)


def test_paper_defaults_depend_on_the_defense():
    clean, adv = DEFENSES["Standard_EWS"](), DEFENSES["AT_EWS"]()
    assert (clean.lam, clean.rho, clean.entropy_weight) == (1.0, 0.7, 0.005)
    assert (adv.lam, adv.rho, adv.entropy_weight) == (0.1, 0.9, 0.01)
    assert adv.interval == 10 and adv.search_name == "controller"


def test_gin_bindings_reach_mixin_and_defense():
    gin.parse_config(["EWS.lam = 0.5", "EWS.rho = 0.6", "TRADES.beta = 3.0"])
    d = build_defense("TRADES_EWS")
    assert (d.lam, d.rho, d.beta) == (0.5, 0.6, 3.0)


def test_distillation_kl_formula():
    t, s = torch.randn(5, 10), torch.randn(5, 10)
    p = t.softmax(1)
    expected = (p * (p.log() - s.log_softmax(1))).sum(1).mean()
    assert torch.allclose(distillation_kl(t, s), expected, atol=1e-6)
    assert distillation_kl(t, t).abs() < 1e-6


def test_ews_term_is_real_and_has_gradient():
    model = tiny_model()
    model.train()
    x, y = batch()
    d = DEFENSES["AT_EWS"](eps=0.3, step_size=0.1, steps=2, lam=1.0, rho=0.5)
    d.setup(model)
    b = d.prepare(model, x, y)
    out = d.training_loss(model, b)
    assert out.metrics["ews_kl"] > 1e-4
    model.zero_grad()
    (out.loss - AT.loss(d, model, b).loss).backward()  # the gradient of the EWS term alone
    grads = [p.grad.abs().sum() for p in model.parameters() if p.grad is not None]
    assert sum(grads) > 0


def test_subnet_forward_leaves_bn_statistics_to_the_full_net():
    x, y = batch()
    plain_model, ews_model = tiny_model(), tiny_model()
    plain_model.train(), ews_model.train()
    plain, ews = Standard(), DEFENSES["Standard_EWS"](rho=0.5, lam=1.0)
    ews.setup(ews_model)
    b = plain.prepare(plain_model, x, y)
    plain.training_loss(plain_model, b)
    ews.training_loss(ews_model, b)
    for (k, a), c in zip(bn_stats(plain_model).items(), bn_stats(ews_model).values()):
        assert torch.equal(a, c), k


def test_search_is_updated_every_k_iterations():
    model = tiny_model()
    model.train()
    d = DEFENSES["Standard_EWS"](interval=3)
    d.setup(model)
    x, y = batch()
    updates = [("search_subnet_acc" in d.training_loss(model, d.prepare(model, x, y)).metrics) for _ in range(7)]
    assert updates == [True, False, False, True, False, False, True]
    assert d.search.updates == 3


def test_user_defense_gets_ews_variant_with_no_extra_code():
    @register_defense
    class CleanPlusAT(AT):
        """Average of clean and adversarial cross-entropy."""

        def loss(self, model, batch):
            out = super().loss(model, batch)
            out.loss = 0.5 * out.loss + 0.5 * F.cross_entropy(model(batch.x), batch.y)
            return out

    variant = DEFENSES["CleanPlusAT_EWS"]
    assert issubclass(variant, CleanPlusAT) and issubclass(variant, EWSMixin)
    gin.parse_config(["CleanPlusAT.eps = 0.2", "EWS.lam = 2.0"])
    d = build_defense("CleanPlusAT_EWS")
    assert d.attack.eps == 0.2 and d.lam == 2.0 and d.adversarial
    model = tiny_model()
    model.train()
    d.setup(model)
    x, y = batch()
    out = d.training_loss(model, d.prepare(model, x, y))
    assert out.metrics["ews_kl"] > 0 and torch.isfinite(out.loss)


def test_trades_ews_distils_on_both_views():
    model = tiny_model()
    model.train()
    d = DEFENSES["TRADES_EWS"](eps=0.3, step_size=0.1, steps=2, beta=6.0, lam=1.0, rho=0.5, interval=1000)
    d.setup(model)
    x, y = batch()
    b = d.prepare(model, x, y)
    out = d.training_loss(model, b)
    base = TRADES.loss(d, model, b)
    assert len(base.views) == 2 and base.views[1].weight == 6.0
    assert torch.allclose(out.loss - base.loss, d.lam * out.metrics["ews_kl"], atol=1e-5)
