"""AWP: the perturbation against the paper's formula, exact restore, warm-up, composition with EWS."""

import copy
import json

import gin
import pytest
import torch
import torch.nn.functional as F

from advews.cli.train import main as train_main
from advews.defenses import AT, AT_AWP, DEFENSES, TRADES, TRADES_AWP, AWPMixin, Batch, build_defense
from advews.defenses.ews import EWSMixin
from advews.models import build_model


def tiny_model():
    torch.manual_seed(0)
    return build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                        "options": {"widths": (4, 8, 8)}})


def fixed_batch(n=16):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return Batch(x, torch.randint(0, 10, (n,), generator=g), x_adv=x_adv)


def params(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def hand_perturbation(model, batch, gamma, lr=0.01):
    """The paper's recipe, written out: proxy = copy, one SGD step on -CE(x_adv), v = gamma |w| / |d| d."""
    proxy = copy.deepcopy(model)
    proxy.train()
    (-F.cross_entropy(proxy(batch.x_adv), batch.y)).backward()
    v = {}
    with torch.no_grad():
        for (name, w), p in zip(model.named_parameters(), proxy.parameters()):
            if w.dim() > 1:
                d = (p - lr * p.grad) - w
                v[name] = gamma * w.norm() / d.norm() * d
    return v


@pytest.mark.parametrize("name", ["AT_AWP", "AT_AWP_EWS"])
def test_perturbation_matches_the_formula_and_spares_bn_and_biases(name):
    model, b = tiny_model(), fixed_batch()
    model.train()
    expected = hand_perturbation(model, b, gamma=0.01)
    buffers = {k: t.clone() for k, t in model.named_buffers()}
    before = params(model)
    d = DEFENSES[name](lam=1.0) if name.endswith("_EWS") else DEFENSES[name]()
    d.setup(model)
    d.begin_step(model, b)
    after = params(model)
    assert set(expected) == {k for k, w in before.items() if w.dim() > 1} and len(expected) >= 4
    for k, w in before.items():
        if k in expected:  # with EWS too: the ascent is on the defense's loss alone, no EWS term
            delta = after[k] - w
            assert torch.allclose(delta, expected[k], rtol=1e-4, atol=1e-7), k
            assert torch.allclose(delta.norm(), 0.01 * w.norm(), rtol=1e-4), k
        else:  # BN weights/biases and linear biases
            assert torch.equal(after[k], w), k
    for k, t in model.named_buffers():  # the proxy's forward must not move the model's BN statistics
        assert torch.equal(t, buffers[k]), k
    assert getattr(d, "iteration", 0) == 0


def test_end_step_restores_the_weights():
    model, b = tiny_model(), fixed_batch()
    before = params(model)
    d = AT_AWP(gamma=0.05)
    d.setup(model)
    d.begin_step(model, b)
    assert any(not torch.equal(p, before[k]) for k, p in params(model).items())
    d.end_step(model)
    for k, p in params(model).items():
        assert torch.allclose(p, before[k], rtol=1e-6, atol=1e-7), k
    assert d.perturbation == []


def test_update_is_taken_at_the_perturbed_weights_and_applied_to_the_originals():
    model, b = tiny_model(), fixed_batch()
    model.train()
    d = AT_AWP(gamma=0.05)
    d.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.zero_grad()
    d.loss(model, b).loss.backward()
    grad_unperturbed = {k: p.grad.clone() for k, p in model.named_parameters()}
    before = params(model)
    d.begin_step(model, b)
    opt.zero_grad()
    d.training_loss(model, b).loss.backward()
    grad = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    d.end_step(model)
    for k, p in params(model).items():
        assert torch.allclose(p, before[k] - 0.1 * grad[k], rtol=1e-5, atol=1e-6), k
    assert any(not torch.allclose(grad[k], grad_unperturbed[k], atol=1e-6) for k in grad)


def test_warmup_neither_perturbs_nor_restores():
    model, b = tiny_model(), fixed_batch()
    d = TRADES_AWP(eps=0.1, steps=1)
    assert (d.gamma, d.warmup_epochs) == (0.005, 10)
    assert (AT_AWP().gamma, AT_AWP().warmup_epochs) == (0.01, 0)
    d.setup(model)
    before = params(model)
    d.set_progress(epoch=0, eps_scale=1.0)
    d.begin_step(model, b)
    assert all(torch.equal(p, before[k]) for k, p in params(model).items())
    with torch.no_grad():  # an optimizer step during warm-up must survive end_step untouched
        for p in model.parameters():
            p.add_(0.01)
    stepped = params(model)
    d.end_step(model)
    assert all(torch.equal(p, stepped[k]) for k, p in params(model).items())
    d.set_progress(epoch=10, eps_scale=1.0)
    d.begin_step(model, b)
    assert any(not torch.equal(p, stepped[k]) for k, p in params(model).items())
    d.end_step(model)


def test_gin_bindings_resolve_most_specific_first():
    gin.parse_config(["AWP.gamma = 0.02", "AT.eps = 0.1", "AT.steps = 3", "AT_AWP.eps = 0.2",
                      "TRADES_AWP.warmup_epochs = 0", "EWS.lam = 0.5"])
    at_awp, ews = build_defense("AT_AWP"), build_defense("AT_AWP_EWS")
    assert (at_awp.gamma, at_awp.attack.eps, at_awp.attack.steps) == (0.02, 0.2, 3)
    assert (ews.gamma, ews.attack.eps, ews.lam) == (0.02, 0.2, 0.5)
    assert build_defense("AT").attack.eps == 0.1
    trades = build_defense("TRADES_AWP_EWS")
    assert (trades.gamma, trades.warmup_epochs) == (0.02, 0)


@pytest.mark.parametrize("at_awp_weights", [False, True])
def test_awp_composes_with_ews_and_the_subnet_runs_at_perturbed_weights(at_awp_weights):
    """The distillation always runs at w + v; the search scores subnets at w before AWP perturbs
    (the authors' order, default) or at w + v with ``search_at_awp_weights``."""
    for name, base in (("AT_AWP_EWS", AT), ("TRADES_AWP_EWS", TRADES)):
        cls = DEFENSES[name]
        assert cls.__mro__[1:3] == (EWSMixin, DEFENSES[name[:-4]]) and issubclass(cls, (AWPMixin, base))
        model, b = tiny_model(), fixed_batch()
        model.train()
        d = cls(gamma=0.05, warmup_epochs=0, eps=0.1, steps=1, lam=1.0, rho=0.5,
                search_at_awp_weights=at_awp_weights)
        d.setup(model)
        before = params(model)
        conv_name, conv = next((k, m) for k, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
        scored_at = []
        score = d.score_subnets
        d.score_subnets = lambda *a: (scored_at.append(conv.weight.detach().clone()), score(*a))[1]
        batch = d.prepare(model, b.x, b.y)
        d.begin_step(model, batch)
        perturbed = conv.weight.detach().clone()
        assert not torch.equal(perturbed, before[f"{conv_name}.weight"])
        assert len(scored_at) == 1
        assert torch.equal(scored_at[0], perturbed if at_awp_weights else before[f"{conv_name}.weight"])
        seen = []
        hook = conv.register_forward_hook(lambda m, i, o: seen.append(m.weight.detach().clone()))
        out = d.training_loss(model, batch)
        hook.remove()
        assert len(scored_at) == 1  # the search ran once per step, in begin_step
        assert out.metrics["ews_kl"] > 0 and "search_subnet_acc" in out.metrics
        # full-net forward(s) and the subnet forward(s): all at w + v
        assert len(seen) >= 2 * len(out.views)
        assert all(torch.equal(w, perturbed) for w in seen)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        d.end_step(model)
        after = params(model)
        assert all(torch.isfinite(p).all() for p in after.values())
        assert any(not torch.equal(after[k], before[k]) for k in before)
        state = d.state_dict()
        assert state["base"] == {}
        fresh = cls(rho=0.5)
        fresh.setup(tiny_model())
        fresh.load_state_dict(state)
        assert fresh.iteration == d.iteration == 1


def test_one_epoch_of_trades_awp_ews_through_the_cli(tmp_path):
    bindings = [
        "data.dataset = 'mnist5k'", "data.train_limit = 256", "data.val_size = 64",
        "model.arch = 'small_preact_resnet'", "optimizer.name = 'adam'", "optimizer.lr = 2e-3",
        "schedule.name = 'constant'", "train.batch_size = 64", "train.epochs = 1", "train.val_steps = 1",
        "train.defense = 'TRADES_AWP_EWS'", "TRADES.steps = 1", "TRADES.eps = 0.3", "TRADES.step_size = 0.3",
        "AWP.warmup_epochs = 0", "EWS.interval = 2",
    ]
    args = ["--quiet", "--output", str(tmp_path / "run")]
    for p in bindings:
        args += ["--gin-param", p]
    assert train_main(args) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["train_ews_kl"] > 0 and "val_robust_acc" in rows[0]
