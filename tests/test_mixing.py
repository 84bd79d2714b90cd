"""CutMix / MixUp: the mixed images, the mixed labels, and the defenses that train on them."""

import pytest
import torch
import torch.nn.functional as F

from advews.defenses import AT, TRADES, Standard, build_defense
from advews.defenses.mixing import Mixing
from advews.errors import AdvewsError
from advews.models import build_model


def source_coded(n=8, size=16):
    """Images whose every pixel says which example it came from."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size) / n, torch.arange(n) % 5


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_share_and_labels(seed):
    torch.manual_seed(seed)
    x, y = source_coded()
    mixed, dominant, (minor, share) = Mixing("cutmix", alpha=1.0)(x, y)
    assert share <= 0.5
    for i in range(len(x)):
        sources = (mixed[i, 0] * len(x)).round().long()
        values, counts = sources.unique(return_counts=True)
        fractions = dict(zip(values.tolist(), (counts.float() / sources.numel()).tolist()))
        assert len(fractions) <= 2
        if len(fractions) == 1:  # the permutation paired the image with itself: one label
            assert dominant[i] == minor[i] == y[i]
            continue
        own = fractions.get(i, 0.0)
        other = 1.0 - own
        assert min(own, other) == pytest.approx(share, abs=1e-6)  # the box's exact, clipped area
        major = i if own >= 0.5 else next(k for k in fractions if k != i)
        assert dominant[i] == y[major]


def test_mixup_images_and_labels():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8)
    mixed, dominant, (minor, share) = Mixing("mixup", alpha=0.4)(x, y)
    # every mixed image is (1 - share) * x[dominant] + share * x[minor] (labels = indices here)
    assert torch.allclose(mixed, (1 - share) * x[dominant] + share * x[minor], atol=1e-6)
    assert share <= 0.5 and not torch.equal(dominant, minor)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_cross_entropy_is_ce_against_the_mixed_label(smoothing):
    torch.manual_seed(1)
    d = Standard(label_smoothing=smoothing, mix="cutmix")
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    batch = d.prepare(None, x, y)
    logits = torch.randn(8, 10, requires_grad=True)
    minor, share = batch.mix
    soft = (1 - share) * F.one_hot(batch.y, 10).float() + share * F.one_hot(minor, 10).float()
    want = F.cross_entropy(logits, soft, label_smoothing=smoothing)
    got = d.batch_cross_entropy(logits, batch)
    assert torch.allclose(got, want, atol=1e-6)
    (g1,) = torch.autograd.grad(got, logits)
    (g2,) = torch.autograd.grad(want, logits)
    assert torch.allclose(g1, g2, atol=1e-7)


def small_model():
    torch.manual_seed(0)
    return build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                        "options": {"widths": [8, 8, 8]}}).train()


def soft_pgd(model, x, y, minor, share, eps, step, steps, noise):
    """Sign PGD maximising the CE against the mixed label distribution (DM-Improves-AT's AT with CutMix)."""
    soft = (1 - share) * F.one_hot(y, 10).to(x.dtype) + share * F.one_hot(minor, 10).to(x.dtype)
    x_adv = (x + noise).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), soft), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


@pytest.mark.parametrize("target", ["mixed", "dominant"])
def test_at_attack_target_with_mixing(target):
    model, x, y = small_model().double(), torch.rand(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
    at = AT(eps=0.3, step_size=0.1, steps=3, mix="cutmix", attack_mode="eval", mix_attack_target=target)
    torch.manual_seed(2)
    batch = at.prepare(model, x, y)
    minor, share = batch.mix
    torch.manual_seed(2)  # replay the mixing draws, then the start's noise
    at.mixing(x, y)
    noise = torch.empty_like(x).uniform_(-0.3, 0.3)
    model.eval()
    if target == "mixed":  # the default, as DM-Improves-AT / Rebuffi et al.
        want = soft_pgd(model, batch.x, batch.y, minor, share, 0.3, 0.1, 3, noise)
    else:  # the old behaviour: PGD on the dominant label
        want = soft_pgd(model, batch.x, batch.y, batch.y, 0.0, 0.3, 0.1, 3, noise)
    assert (batch.x_adv - want).abs().max() < 1e-9
    out = at.loss(model, batch)
    assert torch.allclose(out.loss, at.batch_cross_entropy(model(batch.x_adv), batch), atol=1e-8)


@pytest.mark.parametrize("target", ["mixed", "prediction"])
def test_trades_attack_target_with_mixing(target):
    model = small_model().double().eval()
    x, y = torch.rand(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
    # uniform start: from x + 0.001 N(0, 1) the first KL gradient to p(x) is float-rounding sized
    trades = TRADES(eps=0.3, step_size=0.1, steps=3, mix="mixup", mix_attack_target=target, start="uniform")
    torch.manual_seed(3)
    batch = trades.prepare(model, x, y)
    minor, share = batch.mix
    torch.manual_seed(3)
    trades.mixing(x, y)
    start = (batch.x + torch.empty_like(x).uniform_(-0.3, 0.3)).clamp(0, 1)
    if target == "mixed":  # KL(mixed || p(x')), DM-Improves-AT's trades_loss with CutMix
        target_p = (1 - share) * F.one_hot(batch.y, 10).double() + share * F.one_hot(minor, 10).double()
    else:  # KL(p(x) || p(x')), the clean prediction
        target_p = F.softmax(model(batch.x), 1).detach()
    x_adv = start
    for _ in range(3):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), target_p, reduction="batchmean")
        (g,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + 0.1 * g.sign(), batch.x - 0.3), batch.x + 0.3).clamp(0, 1)
    assert (batch.x_adv - x_adv).abs().max() < 1e-9
    out = trades.loss(model, batch)
    assert torch.allclose(out.metrics["natural_loss"], trades.batch_cross_entropy(model(batch.x), batch), atol=1e-8)


@pytest.mark.parametrize("cls", [AT, TRADES])
@pytest.mark.parametrize("smooth", [False, True])
def test_mixed_labels_are_smoothed_only_with_the_switch(cls, smooth):
    d = cls(label_smoothing=0.1, mix="cutmix", smooth_mixed_labels=smooth)
    torch.manual_seed(1)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    x, dominant, minor = d.mixing(x, y)
    logits = torch.randn(8, 10)
    soft = (1 - minor[1]) * F.one_hot(dominant, 10).float() + minor[1] * F.one_hot(minor[0], 10).float()
    from advews.defenses.base import Batch

    got = d.batch_cross_entropy(logits, Batch(x, dominant, mix=minor))
    assert torch.allclose(got, F.cross_entropy(logits, soft, label_smoothing=0.1 if smooth else 0.0), atol=1e-6)
    # an unmixed batch always gets the defense's label smoothing
    plain = d.batch_cross_entropy(logits, Batch(x, dominant))
    assert torch.allclose(plain, F.cross_entropy(logits, dominant, label_smoothing=0.1), atol=1e-6)


def test_options_and_bad_values():
    assert Mixing("cutmix", prob=0.0)(torch.rand(4, 1, 8, 8), torch.arange(4))[2] is None
    import gin

    gin.parse_config(["AT.mix = 'mixup'"])
    assert build_defense("AT_AWP_EWS").mixing.mode == "mixup"  # one binding reaches every AT variant
    for kwargs, message in (({"mix": "cutout"}, "mix must be one of none, cutmix, mixup, got 'cutout'"),
                            ({"mix": "cutmix", "mix_alpha": 0.0}, "mix_alpha must be a finite number > 0, got 0.0"),
                            ({"mix": "cutmix", "mix_prob": 1.5}, "mix_prob must be in [0, 1], got 1.5")):
        with pytest.raises(AdvewsError) as info:
            Standard(**kwargs)
        assert str(info.value).splitlines()[0] == message  # gin adds where it was called on a second line
    for cls, kwargs, message in (
            (AT, {"mix_attack_target": "prediction"},
             "AT.mix_attack_target must be one of 'mixed', 'dominant', got 'prediction'"),
            (TRADES, {"mix_attack_target": "dominant"},
             "TRADES.mix_attack_target must be one of 'mixed', 'prediction', got 'dominant'"),
            (AT, {"smooth_mixed_labels": "yes"}, "AT.smooth_mixed_labels must be True or False, got 'yes'"),
            (TRADES, {"smooth_mixed_labels": 1}, "TRADES.smooth_mixed_labels must be True or False, got 1"),
            (TRADES, {"attack_mode": "frozen"},
             "TRADES.attack_mode must be one of 'eval', 'train', 'train_frozen', got 'frozen'"),
            (TRADES, {"start": "zero"}, "TRADES.start must be one of 'normal', 'uniform', got 'zero'")):
        with pytest.raises(AdvewsError) as info:
            cls(**kwargs)
        assert str(info.value).splitlines()[0] == message
