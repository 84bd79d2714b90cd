"""Golden steps against DM-Improves-AT (wzekai99/DM-Improves-AT, Wang et al. 2023).

advews's TRADES configured by the shipped ``trades_dm.gin`` (only the model size is overridden) runs
one training iteration; ``dm_trades_iteration`` below is this test's own transcription of what
DM-Improves-AT's ``train-wa.py`` does in one iteration (gowal21uncovering/utils/trades.py
``trades_loss``, watrain.py ``group_weight`` and its optimizer, core/utils/train.py's 'cosinew'
OneCycleLR, stepped once per epoch). Both start from the same float64 weights, batch and attack
noise (advews draws the uniform start from torch's global RNG; the transcription draws the same
numbers with the same seed), and must agree on the loss, every parameter's gradient, the updated
weights and the BN running statistics to 1e-5. Their step-0 BN momentum of 1.0 (``set_bn_momentum``)
is not reproduced by advews (trades_dm.gin says so); the transcription leaves it out, which changes
only step 0's running statistics. Flipping any one reference switch must break the agreement.
"""

import math

import gin
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advews.api.config import parse_gin
from advews.attacks import PGD
from advews.defenses import build_defense
from advews.engine.ema import EMA, ema_warmup
from advews.engine.optim import make_optimizer, make_scheduler, param_groups
from advews.engine.trainer import Trainer
from advews.engine.validation import check_val_loss
from advews.errors import AdvewsError
from advews.models import build_model

TINY = ["model.arch = 'dm_wide_resnet'", "model.options = {'depth': 10, 'width': 1}"]
EPOCHS, STEPS_PER_EPOCH = 400, 98  # the recipe's epochs; 98 = floor(50000 / 512) + 1, their update_steps
SEED = 7


pytestmark = pytest.mark.usefixtures("one_thread")


def initial_state():
    """A tiny DM WRN (depth 10, width 1) in float64, with BN scales and shifts moved off (1, 0) so
    that their weight decay shows in one step."""
    torch.manual_seed(0)
    model = build_model({"arch": "dm_wide_resnet", "options": {"depth": 10, "width": 1}, "num_classes": 10,
                         "in_channels": 3, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(2.0, 4.0)
                m.bias.uniform_(-0.5, 0.5)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)


def snapshot(model, loss):
    return {
        "loss": float(loss.detach()),
        "grad": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "param": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffer": {n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()},
    }


def advews_iteration(bindings=()):
    """One iteration of advews's loop (``Trainer._train_step``) with the recipe's defense, optimizer
    and schedule; returns the snapshot and the prepared batch."""
    parse_gin(["trades_dm.gin"], TINY + list(bindings))
    defense = build_defense(gin.query_parameter("train.defense"))
    model = initial_state().train()
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, STEPS_PER_EPOCH, EPOCHS)
    x, y = batch()
    torch.manual_seed(SEED)
    defense.set_progress(0, 1.0)
    prepared = defense.prepare(model, x, y)
    defense.begin_step(model, prepared)
    optimizer.zero_grad(set_to_none=True)
    out = defense.training_loss(model, prepared, None)
    out.loss.backward()
    grads = snapshot(model, out.loss)["grad"]
    optimizer.step()
    scheduler.step()
    snap = snapshot(model, out.loss)
    snap["grad"] = grads
    return snap, prepared


# ------------------------------------------------------------------ the transcription of theirs
def dm_cutmix(x, y, lam, perm, cy, cx, num_classes=10):
    """Their cutmix with the box centre, Beta draw and permutation given: window mask, adjusted lam,
    soft label lam * onehot(y) + (1 - lam) * onehot(y[perm])."""
    h, w = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    top, left = min(max(cy - cut_h // 2, 0), h), min(max(cx - cut_w // 2, 0), w)
    box_h = min(max(cy + cut_h // 2, 0), h) - top
    box_w = min(max(cx + cut_w // 2, 0), w) - left
    rows, cols = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)
    mask = ((rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)).to(x.dtype)
    lam = 1.0 - box_h * box_w / (h * w)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    return x * (1 - mask) + x[perm] * mask, lam * onehot + (1 - lam) * onehot[perm]


def smooth_ce(logits, y, smoothing):
    """Their SmoothCrossEntropyLoss: (1 - s) * NLL + s * mean over classes of -log p, batch mean."""
    logp = F.log_softmax(logits, dim=1)
    return ((1 - smoothing) * -logp.gather(1, y[:, None]).squeeze(1) + smoothing * -logp.mean(1)).mean()


def dm_trades_iteration(model, x, y, noise, soft=None, beta=5.0, eps=8 / 255, step=2 / 255, steps=10, ls=0.1,
                        lr=0.2, wd=5e-4):
    """Their trades_loss (linf-pgd) + backward + SGD step with their groups and OneCycleLR ('cosinew')."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    decay = [p for n, p in model.named_parameters() if "batchnorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "batchnorm" in n]
    optimizer = torch.optim.SGD([dict(params=decay), dict(params=no_decay, weight_decay=0.0)], lr=lr,
                                weight_decay=wd, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, pct_start=0.025, total_steps=EPOCHS)
    kl = nn.KLDivLoss(reduction="batchmean")
    model.train()
    for m in norms:
        m.track_running_stats = False
    x_adv = torch.clamp(x.detach() + noise, 0.0, 1.0)
    if soft is not None:
        target = soft
    else:
        target = F.softmax(model(x), dim=1).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        value = kl(F.log_softmax(model(x_adv), dim=1), target)
        (grad,) = torch.autograd.grad(value, [x_adv])
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    for m in norms:
        m.track_running_stats = True
    optimizer.zero_grad()
    logits_natural, logits_adv = model(x), model(x_adv)
    natural = kl(F.log_softmax(logits_natural, dim=1), soft) if soft is not None else smooth_ce(logits_natural, y, ls)
    loss = natural + beta * kl(F.log_softmax(logits_adv, dim=1), F.softmax(logits_natural, dim=1))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    scheduler.step()  # (after the epoch in theirs)
    snap = snapshot(model, loss)
    snap["grad"] = grads
    return snap, x_adv


def replay_advews_cutmix(x, y):
    """The CutMix draws advews makes (torch's global RNG, seeded like ``advews_iteration``), then the
    attack's uniform noise."""
    torch.manual_seed(SEED)
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(x.shape[0])
    cy, cx = int(torch.randint(x.shape[-2], ())), int(torch.randint(x.shape[-1], ()))
    noise = torch.empty_like(x).uniform_(-8 / 255, 8 / 255)
    return lam, perm, cy, cx, noise


def differences(a, b):
    """Largest absolute difference per part (loss, grads, params, buffers)."""
    out = {"loss": abs(a["loss"] - b["loss"])}
    for part in ("grad", "param", "buffer"):
        assert a[part].keys() == b[part].keys()
        out[part] = max(float((a[part][k] - b[part][k]).abs().max()) for k in a[part])
    return out


def reference(cutmix=False):
    x, y = batch()
    model = initial_state()
    if not cutmix:
        torch.manual_seed(SEED)
        noise = torch.empty_like(x).uniform_(-8 / 255, 8 / 255)
        return dm_trades_iteration(model, x, y, noise)[0], None
    lam, perm, cy, cx, noise = replay_advews_cutmix(x, y)
    mixed, soft = dm_cutmix(x, y, lam, perm, cy, cx)
    snap, _ = dm_trades_iteration(model, mixed, y, noise, soft=soft)
    # theirs: clean term KL(soft || p); advews reports the CE against the soft label, the same
    # gradient, larger by the (constant) mean entropy of the soft label
    snap["loss"] += float(-(soft * torch.log(soft.clamp_min(1e-300))).sum(1).mean())
    return snap, mixed


_REFERENCE = {}


def cached_reference(cutmix):
    if cutmix not in _REFERENCE:
        _REFERENCE[cutmix] = reference(cutmix)
    return _REFERENCE[cutmix]


def test_trades_dm_iteration_matches_the_transcription():
    want, _ = cached_reference(False)
    got, _ = advews_iteration()
    diff = differences(got, want)
    assert all(v < 1e-5 for v in diff.values()), diff
    assert got["param"].keys() == want["param"].keys()
    moved = max(float((got["param"][k] - initial_state().state_dict()[k]).abs().max()) for k in got["param"])
    assert moved > 1e-3  # the step did something


def test_trades_dm_cutmix_iteration_attacks_the_mixed_label():
    want, mixed = cached_reference(True)
    got, prepared = advews_iteration(["TRADES.mix = 'cutmix'"])
    assert torch.equal(prepared.x, mixed)  # the same box and lambda on both sides
    diff = differences(got, want)
    assert all(v < 1e-5 for v in diff.values()), diff


FLIPS = [
    ([], "TRADES.attack_mode = 'eval'"),
    ([], "TRADES.attack_mode = 'train'"),  # same x' (batch statistics), running statistics moved
    ([], "TRADES.start = 'normal'"),
    ([], "optimizer.bn_weight_decay = True"),
    ([], "schedule.name = 'cosine'"),
    ([], "schedule.cycle_momentum = False"),
    ([], "schedule.div_factor = 10.0"),
    (["TRADES.mix = 'cutmix'"], "TRADES.mix_attack_target = 'prediction'"),
    (["TRADES.mix = 'cutmix'"], "TRADES.smooth_mixed_labels = True"),
]


@pytest.mark.parametrize("base, flip", FLIPS, ids=[f for _, f in FLIPS])
def test_flipping_a_reference_switch_breaks_the_agreement(base, flip):
    want, _ = cached_reference(bool(base))
    if flip == "schedule.name = 'cosine'":
        flip = [flip, "schedule.pct_start = 0.025"]  # (onecycle-only settings are ignored)
    got, _ = advews_iteration(base + ([flip] if isinstance(flip, str) else flip))
    diff = differences(got, want)
    assert max(diff.values()) > 1e-5, diff


# ------------------------------------------------------------------ unit tests of the pieces
@pytest.mark.parametrize("epochs, spe, pct", [(400, 3, 0.025), (80, 2, 0.025), (7, 1, 0.3)])
def test_onecycle_per_epoch_follows_torch_onecycle_stepped_per_epoch(epochs, spe, pct):
    model = nn.Linear(2, 2)
    ours = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    parse_gin([], ["schedule.name = 'onecycle'", f"schedule.pct_start = {pct}"])
    sched = make_scheduler(ours, spe, epochs)
    theirs = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.2, momentum=0.9, nesterov=True)
    ref = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.2, pct_start=pct, total_steps=epochs)
    for epoch in range(epochs):
        for _ in range(spe):
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
            assert ours.param_groups[0]["momentum"] == pytest.approx(theirs.param_groups[0]["momentum"], rel=1e-12)
            ours.step()
            sched.step()
        theirs.step()
        ref.step()
    assert sched.state_dict().get("momentum_at") is None  # checkpoints stay picklable


def test_onecycle_per_iteration_and_without_momentum_cycling():
    ours = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    parse_gin([], ["schedule.name = 'onecycle'", "schedule.onecycle_unit = 'iteration'",
                   "schedule.pct_start = 0.25", "schedule.cycle_momentum = False"])
    sched = make_scheduler(ours, 5, 4)
    theirs = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(theirs, max_lr=0.1, pct_start=0.25, total_steps=20,
                                              cycle_momentum=False)
    lrs = []
    for _ in range(20):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
        assert ours.param_groups[0]["momentum"] == 0.9
        lrs.append(ours.param_groups[0]["lr"])
        ours.step(), sched.step(), theirs.step(), ref.step()
    assert lrs[1] != lrs[0]  # per iteration, unlike the per-epoch default


@pytest.mark.parametrize("binding, message", [
    ("schedule.pct_start = 1.5", "schedule.pct_start must be in (0, 1), got 1.5"),
    ("schedule.onecycle_unit = 'batch'", "schedule.onecycle_unit must be one of epoch, iteration, got 'batch'"),
    ("schedule.warmup_epochs = 1", "schedule.warmup_epochs must be 0 with schedule.name = 'onecycle'"),
    ("schedule.momentum_range = (0.95, 0.85)", "schedule.momentum_range must be (low, high) with low <= high"),
    ("schedule.div_factor = 0", "schedule.div_factor must be > 0, got 0"),
])
def test_onecycle_bad_values(binding, message):
    parse_gin([], ["schedule.name = 'onecycle'", binding])
    with pytest.raises(AdvewsError) as info:
        make_scheduler(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), 3, 4)
    assert str(info.value).splitlines()[0].startswith(message)


def test_no_weight_decay_groups_are_dm_group_weight():
    model = initial_state()
    groups = param_groups(model, bn_weight_decay=False)
    theirs_no_decay = {id(p) for n, p in model.named_parameters() if "batchnorm" in n}
    assert {id(p) for p in groups[1]["params"]} == theirs_no_decay and groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()} - theirs_no_decay
    assert any(n.endswith("logits.bias") for n, p in model.named_parameters()
               if id(p) in {id(q) for q in groups[0]["params"]})  # their linear bias keeps its decay
    parse_gin([], ["optimizer.bn_weight_decay = False"])
    opt = make_optimizer(model)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert len(param_groups(model, bn_weight_decay=True)) == 1
    with pytest.raises(AdvewsError, match="needs the model"):
        make_optimizer(model.parameters())
    gin.clear_config()
    parse_gin([], ["optimizer.bn_weight_decay = 'no'"])
    with pytest.raises(AdvewsError, match=r"optimizer.bn_weight_decay must be True or False, got 'no'"):
        make_optimizer(model)


def test_ema_warmup_fraction_is_dm_warmup():
    # theirs: warmup_steps = 0.025 * epochs * update_steps, compared as a float against the 1-based step
    steps = ema_warmup(0, 0.025, 400 * 98)
    assert steps == 0.025 * 400 * 98
    ema = EMA(nn.Linear(1, 1), decay=0.995, warmup_steps=steps)
    for step in (1, 979, 980, 981, 5000):
        delta = step - steps
        want = (min(0.995, (1 + delta) / (10 + delta)) if 10 + delta != 0 else 0.995) * int(step >= steps)
        assert ema.decay_at(step) == pytest.approx(want, abs=0)
    assert ema_warmup(7, None, 100) == 7
    for args, message in (((3, 0.1, 100), "set train.ema_warmup_steps or train.ema_warmup_fraction, not both"),
                          ((0, 1.5, 100), "train.ema_warmup_fraction must be in [0, 1], got 1.5"),
                          ((0, "a", 100), "train.ema_warmup_fraction must be a finite number >= 0 or None, got 'a'")):
        with pytest.raises(AdvewsError) as info:
            ema_warmup(*args)
        assert str(info.value).startswith(message)


def dm_cw_pgd(model, x, y, noise, eps, step, steps):
    """Their LinfPGDAttack with CWLoss (selection): uniform start clipped, sign steps on
    -sum clamp(z_y - max_{j != y} z_j, min=0), projection, clip."""
    delta = (x + noise).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_()
        z = model(x + delta)
        onehot = F.one_hot(y, z.shape[1]).to(z.dtype)
        real = (onehot * z).sum(1)
        other = ((1 - onehot) * z - onehot * 10000.0).max(1)[0]
        (grad,) = torch.autograd.grad(-torch.clamp(real - other, min=0).sum(), [delta])
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).clamp(0, 1)


def test_selection_attack_is_dm_pgd40_with_their_cw_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
    x, y = torch.rand(16, 3, 2, 2, dtype=torch.float64), torch.randint(0, 4, (16,))
    attack = PGD(eps=8 / 255, steps=40, step_size=2 / 255, loss="cw_hinge")
    torch.manual_seed(3)
    got = attack(model, x, y)
    torch.manual_seed(3)
    want = dm_cw_pgd(model, x, y, torch.empty_like(x).uniform_(-8 / 255, 8 / 255), 8 / 255, 2 / 255, 40)
    assert (got - want).abs().max() < 1e-12
    torch.manual_seed(3)
    unclipped = PGD(eps=8 / 255, steps=40, step_size=2 / 255, loss="cw")(model, x, y)
    assert (unclipped - want).abs().max() > 1e-3  # the hinge stops misclassified points; the margin does not
    check_val_loss("cw_hinge")
    with pytest.raises(AdvewsError) as info:
        check_val_loss("dlr")
    assert str(info.value) == "train.val_loss must be one of 'ce', 'cw', 'cw_hinge', got 'dlr'"


def test_recipe_selection_and_ema_settings_reach_the_trainer(tmp_path):
    from test_recipes import write_cifar10

    write_cifar10(tmp_path)
    parse_gin(["trades_dm.gin"], TINY + [f"data.root = '{tmp_path}'", "data.extra_data = None", "data.val_size = 8",
                                         "data.train_limit = 16", "data.test_limit = 8",
                                         "train.batch_size = 8"])
    trainer = Trainer(output_dir=str(tmp_path / "run"), quiet=True)
    assert trainer.val_attack.loss == "cw_hinge" and trainer.val_attack.steps == 40
    assert trainer.val_attack.step_size == pytest.approx(2 / 255)
    assert trainer.ema.warmup_steps == pytest.approx(0.025 * 400 * trainer.steps_per_epoch)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [5e-4, 0.0]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 / 25)
    assert trainer.optimizer.param_groups[0]["momentum"] == pytest.approx(0.95)
    assert trainer.defense.attack.start == "uniform" and trainer.defense.attack.freeze_bn_stats


def test_trades_dm_recipe_trains_and_saves(tmp_path):
    """One tiny epoch through the real loop: the one-cycle scheduler and the frozen-BN attack
    survive a checkpoint (the scheduler's state_dict must pickle)."""
    from test_recipes import write_cifar10

    write_cifar10(tmp_path)
    parse_gin(["trades_dm.gin"], TINY + [f"data.root = '{tmp_path}'", "data.extra_data = None", "data.val_size = 8",
                                         "data.train_limit = 16", "data.test_limit = 8", "train.batch_size = 8",
                                         "train.epochs = 1", "train.val_steps = 1", "TRADES.steps = 1",
                                         "train.eval_batch_size = 8"])
    trainer = Trainer(output_dir=str(tmp_path / "run"), quiet=True)
    row = trainer.run()
    assert row["epoch"] == 1 and math.isfinite(row["train_loss"]) and "val_ema_robust_acc" in row
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert "momentum_at" not in state["scheduler"]
