"""Every place advews can differ from the authors' code is a switch: each position does what it says.

One test per row of the README's "Differences from the authors' code" table.
"""

import gin
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from advews.attacks import PGD, TradesKL
from advews.defenses import AT, AT_AWP, MART, TRADES, AugMix, Batch, build_defense, get_defense
from advews.engine.precision import Precision
from advews.models import build_model
from advews.models.resnet import Bottleneck
from advews.subnets import discover, random_subnet, subnet


pytestmark = pytest.mark.usefixtures("one_thread")


def small(dropout=0.0):
    torch.manual_seed(0)
    return build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                        "options": {"widths": [8, 8, 8], "dropout": dropout}})


def digits(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    x[:, :, :4] = 0.0  # saturated rows, like MNIST's background
    return x, torch.randint(0, 10, (n,), generator=g)


def bn_stats(model):
    return [b.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for b in (m.running_mean, m.num_batches_tracked)]


# (a) the training attack's model mode -------------------------------------------------------------
def test_attack_mode_defaults_follow_each_reference():
    assert AT().attack.model_mode == "train"  # robust_overfitting, AWP AT_AWP, EWS train_adv_at
    assert AT_AWP().attack.model_mode == "train"
    assert TRADES().attack.model_mode == "eval" and MART().attack.model_mode == "eval"
    assert PGD(eps=0.1).model_mode == "eval"  # evaluation attacks


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_train_mode_attack_moves_bn_running_stats_and_eval_mode_does_not(mode):
    model, (x, y) = small(), digits()
    model.train()
    before = bn_stats(model)
    d = AT(eps=0.3, step_size=0.1, steps=3, attack_mode=mode)
    d.prepare(model, x, y)
    moved = [not torch.equal(a, b) for a, b in zip(before, bn_stats(model))]
    assert all(moved) if mode == "train" else not any(moved)
    assert model.training and all(m.training for m in model.modules())  # flags restored


# (b) which bottleneck layers a subnet thins --------------------------------------------------------
@pytest.mark.parametrize("layers", ["conv2", "conv2+conv3"])
def test_bottleneck_masks(layers):
    gin.parse_config([f"bottleneck_masks.layers = '{layers}'"])
    torch.manual_seed(0)
    block = Bottleneck(16, 8)
    model = nn.Sequential(block).eval()
    space = discover(model)
    assert [l.name for l in space.blocks[0].paths[0].layers] == [f"0.{c}" for c in layers.split("+")]
    seen = {}
    block.conv3.register_forward_hook(lambda m, a, o: seen.update(conv3_in=a[0].detach(), conv3_out=o.detach()))
    x = torch.rand(4, 16, 8, 8)
    alpha = random_subnet(space, 0.5, torch.Generator().manual_seed(0))
    with subnet(model, alpha, space):
        model(x)
    with torch.no_grad():
        unmasked = F.conv2d(seen["conv3_in"], block.conv3.weight)
    if layers == "conv2":  # conv3 computes on relu(bn2(conv2(.))) untouched
        assert torch.allclose(seen["conv3_out"], unmasked, atol=1e-6)
    else:  # conv3 computes as if its dropped input channels were zero
        kept = list(alpha.channels[0][0][1])
        assert len(kept) == 4
        mask = torch.zeros(1, 8, 1, 1)
        mask[0, kept] = 1
        with torch.no_grad():
            assert torch.allclose(seen["conv3_out"], F.conv2d(seen["conv3_in"] * mask, block.conv3.weight), atol=1e-6)
        assert not torch.allclose(seen["conv3_out"], unmasked, atol=1e-3)


def test_bad_bottleneck_masks_value():
    gin.parse_config(["bottleneck_masks.layers = 'conv3'"])
    with pytest.raises(Exception, match="bottleneck_masks.layers must be one of conv2, conv2\\+conv3, got 'conv3'"):
        discover(nn.Sequential(Bottleneck(16, 8)))


# (d) MART's attack start, and the unclipped TRADES/MART start --------------------------------------
def first_attack_input(attack, model, x, y):
    inputs = []
    handle = model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    attack(model, x, y)
    handle.remove()
    return inputs[1] if isinstance(attack, TradesKL) else inputs[0]  # TRADES: p(x) comes first


@pytest.mark.parametrize("start, clamp", [("normal", False), ("normal", True), ("uniform", False)])
def test_pgd_start(start, clamp):
    model, (x, y) = small().eval(), digits()
    torch.manual_seed(0)
    x0 = first_attack_input(PGD(eps=0.3, step_size=0.05, steps=1, start=start, clamp_start=clamp), model, x, y)
    spread = (x0 - x).abs().max().item()
    if start == "normal":
        assert spread < 0.01  # 0.001 * N(0, 1)
        assert (x0.min() < 0) == (not clamp)  # unclipped start leaves the box at saturated pixels
    else:
        assert 0.25 < spread <= 0.3 + 1e-6 and x0.min() >= 0


@pytest.mark.parametrize("clamp", [False, True])
def test_trades_start_is_unclipped_unless_asked(clamp):
    model, (x, _) = small().eval(), digits()
    x0 = first_attack_input(TradesKL(eps=0.3, step_size=0.05, steps=1, clamp_start=clamp), model, x, None)
    assert (x0.min() < 0) == (not clamp) and (x0 - x).abs().max() < 0.01
    assert TRADES().attack.clamp_start is False


# (e) dropout in the subnet forward -----------------------------------------------------------------
@pytest.mark.parametrize("keep_dropout", [False, True])
def test_subnet_dropout(keep_dropout):
    model, (x, _) = small(dropout=0.5), digits()
    model.train()
    space = discover(model)
    alpha = random_subnet(space, 0.7, torch.Generator().manual_seed(0))
    with subnet(model, alpha, space, dropout=keep_dropout):
        a, b = model(x), model(x)
    assert torch.equal(a, b) != keep_dropout  # dropout off: two forwards agree
    assert all(m.training for m in model.modules())  # restored
    d = build_defense("AT_EWS")
    assert d.subnet_dropout is False  # the authors' switch_to_subnet sets p = 0


# (f) gradient clipping -----------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [None, 3.0])
def test_grad_clip(clip):
    torch.manual_seed(0)
    model = nn.Linear(20, 10)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    w0 = [p.detach().clone() for p in model.parameters()]
    (100 * model(torch.randn(8, 20)).pow(2).sum()).backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert norm > 3.0
    Precision("none", torch.device("cpu")).step(opt, clip)
    step = torch.cat([(w - p.detach()).flatten() for w, p in zip(w0, model.parameters())]).norm().item()
    assert step == pytest.approx(norm if clip is None else 3.0, rel=1e-4)


@pytest.mark.parametrize("recipe", ["standard.gin", "standard_imagenet.gin", "deepaugment_augmix_imagenet_ews.gin"])
def test_corruption_recipes_clip_like_the_authors(recipe):
    from advews.cli.common import parse_gin

    parse_gin([recipe], [])
    assert gin.query_parameter("train.grad_clip") == 3.0  # train_cifar and train_imnet: --grad_clip 3
    parse_gin(["at.gin"], [])
    with pytest.raises(ValueError):
        gin.query_parameter("train.grad_clip")  # unbound: the AT reference does not clip


# (g) the AWP proxy's loss ---------------------------------------------------------------------------
def awp_perturbation(smoothing, smooth_proxy):
    model, (x, y) = small(), digits()
    model.train()
    d = AT_AWP(eps=0.3, step_size=0.1, steps=2, label_smoothing=smoothing, smooth_proxy_labels=smooth_proxy)
    d.setup(model)
    torch.manual_seed(1)
    batch = Batch(x, y, x_adv=(x + 0.1 * torch.randn_like(x)).clamp(0, 1))
    d.begin_step(model, batch)
    v = [v.clone() for _, v in d.perturbation]
    d.end_step(model)
    assert d.label_smoothing == smoothing  # restored after the proxy step
    return v


def test_awp_proxy_uses_plain_ce_unless_asked():
    plain = awp_perturbation(0.0, False)
    assert all(torch.allclose(a, b) for a, b in zip(plain, awp_perturbation(0.3, False)))
    smoothed = awp_perturbation(0.3, True)
    assert not all(torch.allclose(a, b) for a, b in zip(plain, smoothed))


# AugMix's search view ------------------------------------------------------------------------------
@pytest.mark.parametrize("search_on, n", [("clean_of_all", 3 * 8), ("all", 3 * 8), ("clean", 8)])
def test_augmix_search_view(search_on, n):
    d = AugMix(search_on=search_on)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    batch = d.prepare(None, x, y)
    sx, sy = d.search_view(batch)
    assert sx.shape[0] == sy.shape[0] == n and torch.equal(sx[:8], x) and torch.equal(sy[:8], y)
    scored = (sy >= 0).sum()
    assert scored == (8 if search_on != "all" else 24)  # the authors reward the clean third only
    assert AugMix().search_on == "clean_of_all"  # forward all three views, score the clean third


# (i) when the controller updates: every K steps of each epoch, or of the run ---------------------------
@pytest.mark.parametrize("each_epoch, expected", [(True, [(0, 0), (0, 3), (1, 0), (1, 3)]),
                                                  (False, [(0, 0), (0, 3), (1, 1), (1, 4)])])
def test_search_interval_restarts_each_epoch_like_the_authors(each_epoch, expected):
    """Their scripts update at ``step % K == 0`` with ``step`` counted within the epoch."""
    model, (x, y) = small(), digits(8)
    model.train()
    d = get_defense("AT_EWS")(eps=0.3, step_size=0.1, steps=1, interval=3, interval_each_epoch=each_epoch, lam=0.0)
    d.setup(model)
    updates = []
    update = d.search.update
    d.search.update = lambda score: updates.append((d.epoch, step)) or update(score)
    for epoch in range(2):
        for step in range(5):  # 5 steps per epoch: not a multiple of K
            d.set_progress(epoch, 1.0)
            batch = d.prepare(model, x, y)
            d.begin_step(model, batch)
            d.training_loss(model, batch)
    assert updates == expected
    assert get_defense("AT_EWS")().interval_each_epoch is True
