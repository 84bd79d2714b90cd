"""SiLU wide ResNets: the activation option, DeepMind's WideResNet (zoo names, reference layout and
forward, parameter counts), its subnets and an AT_EWS step on it. Tiny nets, 32x32 inputs."""

import gin
import pytest
import torch
import torch.nn.functional as F

from advews.defenses import DEFENSES, distillation_kl
from advews.errors import AdvewsError
from advews.models import ARCHITECTURES, DMBlock, build_model, model_spec
from advews.models.dm_wide_resnet import DM_CIFAR10_MEAN, DM_CIFAR10_STD
from advews.models.external import load_external
from advews.subnets import random_subnet, space_of, subnet

FAMILY = [
    ("small_preact_resnet", {"widths": (4, 8, 8)}),
    ("wide_resnet", {"depth": 10, "widen_factor": 1}),
    ("dm_wide_resnet", {"depth": 10, "width": 1}),
]


def build(arch, options, seed=0, num_classes=10):
    torch.manual_seed(seed)
    return build_model({"arch": arch, "options": options, "num_classes": num_classes, "in_channels": 3})


def images(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("arch, options", FAMILY)
def test_activation_changes_the_output_but_not_the_weights(arch, options):
    x, _ = images()
    relu, silu = build(arch, {**options, "activation": "relu"}), build(arch, {**options, "activation": "silu"})
    relu.eval(), silu.eval()
    a, b = relu.state_dict(), silu.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(relu(x), silu(x), atol=1e-4)
    if arch != "dm_wide_resnet":  # the 2020 family keeps ReLU by default, so old checkpoints mean the same
        assert torch.equal(build(arch, options).eval()(x), relu(x))


def test_activation_from_gin_and_bad_name():
    gin.parse_config(["model.arch = 'wide_resnet'",
                      "model.options = {'depth': 10, 'widen_factor': 1, 'activation': 'silu'}"])
    model = build_model({**model_spec(), "num_classes": 10, "in_channels": 3})
    assert {m.act for m in model.modules() if hasattr(m, "act")} == {F.silu}
    for arch, options in FAMILY + [("wrn_28_10", {}), ("preact_resnet18", {}), ("dm_wrn_70_16", {})]:
        with pytest.raises(AdvewsError) as err:
            build(arch, {**options, "activation": "gelu"})
        assert str(err.value) == "unknown activation 'gelu'; choose one of relu, silu"


def dm_parameters(depth, width, num_classes=10, in_channels=3):
    """Parameter count of the reference DMWideResNet, by formula (convs have no bias, BN has 2 per channel)."""
    n, w = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    total = in_channels * 16 * 9 + 2 * w[3] + w[3] * num_classes + num_classes
    for a, c in zip(w[:-1], w[1:]):
        total += 2 * a + 9 * a * c + (a * c if a != c else 0) + 2 * c + 9 * c * c  # first block
        total += (n - 1) * 2 * (2 * c + 9 * c * c)
    return total


@pytest.mark.parametrize("arch, options, depth, width, classes, known", [
    ("dm_wrn_28_10", {}, 28, 10, 10, 36_479_194),  # RobustBench's WRN-28-10 entries: 36.5M
    ("dm_wrn_70_16", {}, 70, 16, 10, 266_796_506),  # Gowal 2020 / Rebuffi 2021 WRN-70-16: 266.8M
    ("dm_wrn_70_16", {}, 70, 16, 100, None),
    ("dm_wide_resnet", {"depth": 34, "width": 20}, 34, 20, 10, None),
    ("dm_wide_resnet", {"depth": 10, "width": 1}, 10, 1, 10, None),
])
def test_zoo_names_have_the_reference_parameter_count(arch, options, depth, width, classes, known):
    with torch.device("meta"):  # no memory: WRN-70-16 has 267M parameters
        net = ARCHITECTURES[arch](num_classes=classes, in_channels=3, **options)
    count = sum(p.numel() for p in net.parameters())
    assert count == dm_parameters(depth, width, classes)
    assert known is None or count == known


@pytest.mark.parametrize("options", [{"depth": 12, "width": 1}, {"depth": 4, "width": 1}, {"depth": 10, "width": 0}])
def test_bad_depth_or_width_is_one_line(options):
    with pytest.raises(AdvewsError, match="dm_wide_resnet (depth|width) must be") as err:
        build("dm_wide_resnet", options)
    assert "\n" not in str(err.value)


def reference_state(depth, width, num_classes=10, seed=0):
    """A random state_dict with the names and shapes of RobustBench's / DeepMind's DMWideResNet."""
    g = torch.Generator().manual_seed(seed)
    n, w = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    state = {"init_conv.weight": torch.randn(16, 3, 3, 3, generator=g) * 0.3}

    def bn(name, c):
        state.update({f"{name}.weight": 1 + 0.2 * torch.randn(c, generator=g),
                      f"{name}.bias": 0.2 * torch.randn(c, generator=g),
                      f"{name}.running_mean": 0.2 * torch.randn(c, generator=g),
                      f"{name}.running_var": 0.5 + torch.rand(c, generator=g),
                      f"{name}.num_batches_tracked": torch.tensor(7)})

    for gi in range(3):
        for i in range(n):
            p, a, c = f"layer.{gi}.block.{i}.", w[gi] if i == 0 else w[gi + 1], w[gi + 1]
            bn(p + "batchnorm_0", a)
            state[p + "conv_0.weight"] = torch.randn(c, a, 3, 3, generator=g) * (2 / (9 * a)) ** 0.5
            bn(p + "batchnorm_1", c)
            state[p + "conv_1.weight"] = torch.randn(c, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5
            if a != c:
                state[p + "shortcut.weight"] = torch.randn(c, a, 1, 1, generator=g) * (1 / a) ** 0.5
    bn("batchnorm", w[3])
    state["logits.weight"] = torch.randn(num_classes, w[3], generator=g) * 0.1
    state["logits.bias"] = torch.randn(num_classes, generator=g) * 0.1
    return state


def reference_forward(s, x, depth, act):
    """The reference forward, written out from its facts: baked-in CIFAR-10 statistics; projection
    shortcut on the activated input, identity on the raw one; stride-2 conv padded (0, 1, 0, 1)."""
    def bn(t, name):
        stats = [s[f"{name}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")]
        return F.batch_norm(t, *stats)

    out = (x - torch.tensor(DM_CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(DM_CIFAR10_STD).view(3, 1, 1)
    out = F.conv2d(out, s["init_conv.weight"], padding=1)
    for gi in range(3):
        for i in range((depth - 4) // 6):
            p, stride = f"layer.{gi}.block.{i}.", 2 if gi > 0 and i == 0 else 1
            projection = p + "shortcut.weight" in s
            pre = act(bn(out, p + "batchnorm_0"))
            shortcut = F.conv2d(pre, s[p + "shortcut.weight"], stride=stride) if projection else out
            padded = F.pad(pre, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))
            r = F.conv2d(padded, s[p + "conv_0.weight"], stride=stride)
            out = shortcut + F.conv2d(act(bn(r, p + "batchnorm_1")), s[p + "conv_1.weight"], padding=1)
    out = F.avg_pool2d(act(bn(out, "batchnorm")), 8).flatten(1)
    return F.linear(out, s["logits.weight"], s["logits.bias"])


@pytest.mark.parametrize("activation, act", [("silu", F.silu), ("relu", F.relu)])
def test_reference_layout_loads_with_reference_logits(tmp_path, activation, act):
    state = reference_state(depth=16, width=1)  # identity and projection shortcuts, strides 1 and 2
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "dm.pt")
    model = load_external("dm_wide_resnet", str(tmp_path / "dm.pt"), normalization="cifar10_dm",
                          options={"depth": 16, "width": 1, "activation": activation})
    x, _ = images()
    with torch.no_grad():
        assert torch.allclose(model(x), reference_forward(state, x, 16, act), atol=1e-5)


@pytest.mark.parametrize("arch, options", [FAMILY[1], FAMILY[2]])
def test_silu_wrn_subnet_differs_and_its_kl_has_gradient(arch, options):
    model = build(arch, {**options, "activation": "silu"}).train()
    space = space_of(model)
    assert space.shape() == (((16,), ()), ((32,), ()), ((64,), ()))  # residual (masked conv input), shortcut
    if arch == "dm_wide_resnet":
        assert all(isinstance(m, DMBlock) for m in [model.get_submodule(b.name) for b in space.blocks])
    x, _ = images()
    full = model(x)
    alpha = random_subnet(space, 0.5, torch.Generator().manual_seed(0))
    with subnet(model, alpha):
        student = model(x)
    assert not torch.allclose(full, student, atol=1e-4)
    model.zero_grad()
    distillation_kl(full.detach(), student).backward()
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0


def test_at_ews_training_step_on_a_tiny_dm_wrn():
    model = build("dm_wide_resnet", {"depth": 10, "width": 1}).train()
    before = [p.detach().clone() for p in model.parameters()]
    d = DEFENSES["AT_EWS"](eps=8 / 255, step_size=2 / 255, steps=2, lam=1.0, rho=0.5)
    d.setup(model)
    x, y = images()
    out = d.training_loss(model, d.prepare(model, x, y))
    assert torch.isfinite(out.loss) and out.metrics["ews_kl"] > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
