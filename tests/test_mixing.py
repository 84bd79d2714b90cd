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


def test_at_attacks_the_dominant_label_and_trades_mixes_its_clean_term():
    model, x, y = small_model(), torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.manual_seed(2)
    at = AT(eps=0.3, step_size=0.1, steps=2, mix="cutmix")
    batch = at.prepare(model, x, y)
    assert batch.mix is not None and (batch.x_adv - batch.x).abs().max() <= 0.3 + 1e-6
    out = at.loss(model, batch)
    assert torch.allclose(out.loss, at.batch_cross_entropy(model(batch.x_adv), batch), atol=1e-5)
    torch.manual_seed(3)
    trades = TRADES(eps=0.3, step_size=0.1, steps=2, mix="mixup")
    batch = trades.prepare(model, x, y)
    out = trades.loss(model, batch)
    assert torch.allclose(out.metrics["natural_loss"], trades.batch_cross_entropy(model(batch.x), batch), atol=1e-5)


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
