"""AutoAugment and AugMix: per-example augmentation, AugMix's ops against torchvision, the JSD loss,
and a training step of their EWS variants."""

import math

import gin
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from advews.defenses import DEFENSES, AugMix, AutoAugment, build_defense, distillation_kl, jensen_shannon
from advews.defenses import augmix_ops
from advews.defenses.ews import EWSMixin
from advews.errors import AdvewsError
from advews.models import build_model
from advews.subnets import subnet

BILINEAR = TF.InterpolationMode.BILINEAR


def tiny_model():
    torch.manual_seed(0)
    return build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 3,
                        "options": {"widths": (4, 8, 8)}})


def images(n=8, seed=1):
    """Float [0, 1] images on the uint8 grid, as the data pipeline delivers them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255, torch.randint(0, 10, (n,), generator=g)


def test_jsd_matches_independent_formula():
    torch.manual_seed(0)
    logits = [torch.randn(6, 10) * 3 for _ in range(3)]
    logits[2][0, 0] = -60.0  # a tiny probability in one view pushes the mixture towards the clamp
    p = [z.softmax(1) for z in logits]
    m = ((p[0] + p[1] + p[2]) / 3).clamp(1e-7, 1)
    expected = sum((pi * (pi.log() - m.log())).sum(1).mean() for pi in p) / 3
    assert torch.allclose(jensen_shannon(*logits), expected, atol=1e-6)
    assert jensen_shannon(logits[0], logits[0], logits[0]).abs() < 1e-6


def test_augmix_loss_is_ce_plus_weighted_jsd_on_one_concatenated_forward():
    model = tiny_model()
    model.train()
    x, y = images()
    d = AugMix()
    batch = d.prepare(model, x, y)
    out = d.loss(model, batch)
    clean, a1, a2 = model(torch.cat([x, *batch.x_aug])).split(len(x))  # train-mode BN over all three views
    expected = F.cross_entropy(clean, y) + 12.0 * jensen_shannon(clean, a1, a2)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert out.search_x is x and torch.equal(out.logits, out.views[0].logits[: len(x)])
    assert len(out.views) == 1 and out.views[0].x.shape[0] == 3 * len(x)  # one concatenated view


def test_augmix_views_are_distinct_bounded_and_reproducible():
    x, y = images(16)
    d = AugMix()
    assert (d.severity, d.width, d.depth, d.jsd_weight) == (5, 3, -1, 12.0)
    torch.manual_seed(3)
    a1, a2 = d.prepare(None, x, y).x_aug
    for v in (a1, a2):
        assert v.shape == x.shape and v.dtype == torch.float32
        assert v.min() >= 0 and v.max() <= 1
        assert ((v - x).abs().flatten(1).amax(1) > 0).all()  # every example changed
    assert ((a1 - a2).abs().flatten(1).amax(1) > 0).all()
    torch.manual_seed(3)
    b1, b2 = d.prepare(None, x, y).x_aug
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_augmix_is_gin_configurable_and_validates():
    assert len(AugMix().ops) == 9 and "contrast" not in augmix_ops.OPS
    gin.parse_config(["AugMix.severity = 3", "AugMix.all_ops = True"])
    d = build_defense("AugMix_EWS")
    assert d.severity == 3 and len(d.ops) == len(augmix_ops.ALL_OPS) == 13
    with pytest.raises(AdvewsError):
        AugMix(severity=0)
    with pytest.raises(AdvewsError):
        AutoAugment(policy="mnist")


def test_mix_is_convex_combination_of_clean_and_chains():
    """With one chain that inverts the image, each output is (1 - m) x + m (255 - x) for its own m."""
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    invert = lambda im, level, sign: 255 - im  # noqa: E731
    out = augmix_ops.augment_and_mix(x, [invert], severity=5, width=1, depth=1, alpha=1.0)
    xf = x.float() / 255
    m = (out - xf) / (1 - 2 * xf)
    m = torch.where((1 - 2 * xf).abs() > 0.2, m, torch.nan).flatten(1)
    lo, hi = m.nan_to_num(2.0).amin(1), m.nan_to_num(-1.0).amax(1)
    assert (hi - lo < 1e-4).all() and (lo >= -1e-5).all() and (hi <= 1 + 1e-5).all()
    assert hi.std() > 0.05  # m differs between images


def assert_same_up_to_rounding(a, b):
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02


def test_geometric_ops_match_torchvision():
    """Magnitudes follow AugMix (rotate 3 deg/level, shear 0.03/level, translate floor(level * W / 30) px)
    and the geometry matches torchvision's (PIL-compatible) functional ops."""
    img = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for level, sign in ((2.5, 1.0), (5.0, -1.0)):
        lv, sg = torch.tensor([level]), torch.tensor([sign])
        ref = TF.rotate(img, sign * math.floor(3 * level), interpolation=BILINEAR)
        assert_same_up_to_rounding(augmix_ops.rotate(img, lv, sg), ref)
        shear = math.degrees(math.atan(sign * 0.03 * level))
        ref = TF.affine(img, 0.0, [0, 0], 1.0, [shear, 0.0], interpolation=BILINEAR, center=[0, 0])
        assert_same_up_to_rounding(augmix_ops.shear_x(img, lv, sg), ref)
        ref = TF.affine(img, 0.0, [0, 0], 1.0, [0.0, shear], interpolation=BILINEAR, center=[0, 0])
        assert_same_up_to_rounding(augmix_ops.shear_y(img, lv, sg), ref)
        # PIL's translate (1, 0, t) samples the input t pixels to the right: the content moves left.
        shift = -sign * math.floor(level * 32 / 30)
        ref = TF.affine(img, 0.0, [shift, 0], 1.0, [0.0, 0.0], interpolation=BILINEAR)
        assert torch.equal(augmix_ops.translate_x(img, lv, sg), ref)
        ref = TF.affine(img, 0.0, [0, shift], 1.0, [0.0, 0.0], interpolation=BILINEAR)
        assert torch.equal(augmix_ops.translate_y(img, lv, sg), ref)


def test_pixel_ops_and_per_image_dispatch():
    img = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(3, 3, 1, 1)
    level, sign = torch.tensor([0.5, 2.6, 5.0]), torch.ones(3)
    post = augmix_ops.posterize(img, level, sign)  # bits 4 - floor(0.4 * level): 4, 3, 2
    assert [len(post[i].unique()) for i in range(3)] == [16, 8, 4]
    sol = augmix_ops.solarize(img, level, sign)  # threshold 256 - floor(25.6 * level): 244, 190, 128
    for i, t in enumerate((244, 190, 128)):
        assert torch.equal(sol[i], torch.where(img[i] >= t, 255 - img[i], img[i]))
    ops = list(augmix_ops.OPS.values())
    out = augmix_ops.apply_ops(img, ops, torch.tensor([-1, 2, 4]), level, sign)
    assert torch.equal(out[0], img[0]) and torch.equal(out[1], post[1]) and torch.equal(out[2], sol[2])


def test_autoaugment_draws_a_sub_policy_per_example():
    x = images(1)[0].repeat(32, 1, 1, 1)
    torch.manual_seed(0)
    whole_batch = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)((x * 255).round().to(torch.uint8))
    assert len({o.numpy().tobytes() for o in whole_batch}) == 1  # the pitfall: one op for the batch
    torch.manual_seed(0)
    out = AutoAugment().prepare(None, x, torch.zeros(32, dtype=torch.long)).x
    assert out.shape == x.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert len({o.numpy().tobytes() for o in out}) >= 8


@pytest.mark.parametrize("name", ["AugMix_EWS", "AutoAugment_EWS"])
def test_ews_training_step(name):
    cls = DEFENSES[name]
    assert issubclass(cls, EWSMixin) and issubclass(cls, DEFENSES[name[: -len("_EWS")]])
    model = tiny_model()
    model.train()
    x, y = images()
    d = cls(rho=0.5)
    d.setup(model)
    drawn = []
    sample = d.search.sample
    d.search.sample = lambda: drawn.append(sample()) or drawn[-1]
    batch = d.prepare(model, x, y)
    out = d.training_loss(model, batch)
    model.zero_grad()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert out.metrics["ews_kl"] > 1e-4
    assert [v.weight for v in out.views] == [1.0]
    view = out.views[0]
    with torch.no_grad(), subnet(model, drawn[0], d.space):
        student = model(view.x)
    # AugMix: the KL over the concatenated (clean, aug1, aug2) view is the average of the three views' KLs
    parts = len(view.x) // len(x)
    per_view = [distillation_kl(t, s) for t, s in zip(view.logits.split(len(x)), student.split(len(x)))]
    assert parts == (3 if name == "AugMix_EWS" else 1)
    assert torch.allclose(out.metrics["ews_kl"], sum(per_view) / parts, atol=1e-5)
