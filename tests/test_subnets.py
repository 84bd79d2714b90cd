"""Subnet space discovery, the Subnet value, and running a model as a subnet (every zoo model)."""

import json
import math

import gin
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from advews.errors import AdvewsError
from advews.models import build_model
from advews.subnets import (
    PathSpace, ResidualAdapter, Subnet, discover, keep_count, random_subnet, register_adapter, space_of, subnet,
)

ZOO = ["small_preact_resnet", "preact_resnet18", "resnet18", "resnet50", "wrn_28_10", "wrn_34_10"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on 2 cores shared with other jobs, 2 spinning OpenMP threads run ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build(arch):
    in_channels = 1 if arch == "small_preact_resnet" else 3
    torch.manual_seed(0)
    return build_model({"arch": arch, "num_classes": 10, "in_channels": in_channels})


def _input(arch, n=2):
    size, channels = (28, 1) if arch == "small_preact_resnet" else (32, 3)
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=ZOO)
def zoo(request):
    return request.param, _build(request.param)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _alpha(model, rho, seed=0):
    return random_subnet(space_of(model), rho, torch.Generator().manual_seed(seed))


def test_subnet_differs_and_model_is_restored(zoo):
    arch, model = zoo
    model.eval()
    x = _input(arch)
    with torch.no_grad():
        full = model(x)
        for rho in (0.5, 0.7):
            with subnet(model, _alpha(model, rho)):
                sub = model(x)
            assert not torch.allclose(sub, full), rho
        with pytest.raises(KeyError):
            with subnet(model, _alpha(model, 0.5, seed=1)):
                model(x)
                raise KeyError("inside")
        assert torch.equal(model(x), full)
    assert _no_hooks(model) and not model.training
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, _BatchNorm))


def test_kl_gradient_and_bn_statistics(zoo):
    arch, model = zoo
    model.train()
    x = _input(arch)
    with torch.no_grad():
        p_full = F.softmax(model(x), 1)  # the full net's own forward may update BN stats
    before = _bn_state(model)
    model.zero_grad()
    with subnet(model, _alpha(model, 0.5)):
        log_p_sub = F.log_softmax(model(x), 1)
    kl = (p_full * (p_full.clamp_min(1e-12).log() - log_p_sub)).sum(1).mean()
    kl.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert kl.item() > 0
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(torch.isfinite(g).all() for g in grads)
    after = _bn_state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and _no_hooks(model)


def test_contexts_do_not_nest():
    model = _build("small_preact_resnet")
    alpha = _alpha(model, 0.7)
    with subnet(model, alpha):
        with pytest.raises(RuntimeError, match="nest"):
            with subnet(model, alpha):
                pass
    assert _no_hooks(model)


def test_masks_zero_exactly_the_dropped_channels_and_paths():
    model = _build("small_preact_resnet").train()
    space = space_of(model)
    alpha = Subnet(((0,), (1,), (0,)), ((((1, 3, 5),),), ((),), (((0, 63),),)))
    conv = space.blocks[0].paths[0].layers[0].module
    seen = {}
    with subnet(model, alpha):
        handles = [conv.register_forward_hook(lambda m, a, o: seen.update(in0=a[0], out0=o)),
                   space.blocks[2].paths[1].output_module.register_forward_hook(
                       lambda m, a, o: seen.__setitem__("shortcut2", o)),
                   space.blocks[1].paths[0].output_module.register_forward_hook(
                       lambda m, a, o: seen.__setitem__("res1", o))]
        model(_input("small_preact_resnet"))
        for h in handles:
            h.remove()
    mask = torch.zeros(1, conv.in_channels, 1, 1)
    mask[0, [1, 3, 5]] = 1
    with torch.no_grad():  # the conv computes exactly what it computes on the masked input
        assert torch.allclose(seen["out0"], conv(seen["in0"] * mask), atol=1e-6)
        assert not torch.allclose(seen["out0"], conv(seen["in0"]), atol=1e-3)
    assert not seen["shortcut2"].any() and not seen["res1"].any()
    assert _no_hooks(model) and type(conv) is nn.Conv2d


class _InputMaskedConv(nn.Conv2d):
    """A conv subclass: subnets mask its input with a pre-hook instead of its weight."""


@pytest.mark.parametrize("arch", ["small_preact_resnet", "resnet50"])
def test_weight_masks_equal_input_masks_values_and_gradients(arch):
    """conv(x, W * m) for plain convs, x * m before any other module: same outputs and gradients."""
    model = _build(arch).train()
    other = _build(arch).train()
    for layer in (l for b in space_of(other).blocks for p in b.paths for l in p.layers):
        layer.module.__class__ = _InputMaskedConv
    alpha = _alpha(model, 0.5)
    x = _input(arch)
    results = []
    for m in (model, other):
        m.zero_grad()
        with subnet(m, alpha):
            out = m(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads_a, grads_b))
    assert sum(g.abs().sum() for g in grads_a) > 0
    assert _no_hooks(model) and _no_hooks(other)


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct storages a forward saves for its backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("arch", ["small_preact_resnet", "preact_resnet18"])
def test_subnet_graph_saves_no_more_activations_than_the_full_net(arch):
    """EWS's memory: a subnet forward saves as much for its backward as the full forward (each masked
    conv saves its masked weight in place of its weight, and no masked copy of its input)."""
    model = _build(arch).train()
    x = _input(arch, n=8)
    full = _saved_bytes(model, x)
    with subnet(model, _alpha(model, 0.5)):
        sub = _saved_bytes(model, x)
    assert sub <= full + 16 * 1024, (sub, full)  # + the 0/1 masks


@pytest.mark.parametrize("rho", [0.5, 0.7, 0.9])
def test_kept_counts_follow_ceil(rho):
    space = discover(_build("resnet50"))
    alpha = random_subnet(space, rho, torch.Generator().manual_seed(0))
    for block, kept, chans in zip(space.blocks, alpha.paths, alpha.channels):
        assert len(kept) == math.ceil(rho * len(block.paths))
        for p, layers in zip(kept, chans):
            assert [len(i) for i in layers] == [math.ceil(round(rho * l.channels, 9)) for l in block.paths[p].layers]


def test_keep_count_rounding_rules():
    assert keep_count(10, 0.7) == 7  # 0.7 * 10 is 7.000000000000001 in floats
    assert keep_count(2, 0.7) == 2 and keep_count(2, 0.5) == 1
    assert [keep_count(5, 0.5, r) for r in ("ceil", "round", "floor")] == [3, 3, 2]
    assert keep_count(3, 0.1, "floor") == 1 and keep_count(64, 0.7, "round") == 45
    with pytest.raises(ValueError):
        keep_count(4, 0.5, "nearest")
    with pytest.raises(ValueError):
        keep_count(4, 0.0)
    space = space_of(_build("small_preact_resnet"))
    gin.bind_parameter("keep_count.rounding", "floor")
    try:
        alpha = random_subnet(space, 0.7)
    finally:
        gin.clear_config()
    assert [len(p) for p in alpha.paths] == [1, 1, 1]  # floor(1.4)
    for kept, chans, block in zip(alpha.paths, alpha.channels, space.shape()):
        assert [len(i) for i in chans[0]] == [keep_count(c, 0.7, "floor") for c in block[kept[0]]]


def test_space_of_zoo_blocks():
    assert discover(_build("small_preact_resnet")).shape() == (((16,), ()), ((32,), ()), ((64,), ()))
    r50 = discover(_build("resnet50"))
    assert len(r50.blocks) == 16 and r50.shape()[0] == ((64,), ())  # conv2's input, as the authors' code
    assert type(r50.blocks[0].paths[0].output_module) is nn.BatchNorm2d
    assert isinstance(r50.blocks[0].paths[1].output_module, nn.Sequential)
    assert r50.blocks[0].name == "model.layers.0.0"
    assert space_of(_build("wrn_28_10")).num_items() == sum(2 + c for c in [160] * 4 + [320] * 4 + [640] * 4)


def test_unknown_model_and_custom_adapter():
    with pytest.raises(AdvewsError, match="register_adapter"):
        discover(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 1)
            self.downsample = None

        def forward(self, x):
            return self.conv2(F.relu(self.conv1(x))) + x

    register_adapter(Block, ResidualAdapter("conv2", ("conv2",), shortcut="downsample"))
    space = discover(nn.Sequential(Block(), Block()))
    assert space.shape() == (((6,),), ((6,),))
    assert isinstance(space.blocks[1].paths[0], PathSpace) and space.blocks[1].name == "1"


def test_subnet_value_forms():
    model = _build("small_preact_resnet")
    space = space_of(model)
    a = Subnet([[0], [1], [0]], [[[[5, 1, 3]]], [[]], [[[9, 0]]]])  # lists are normalised to tuples
    b = a.canonical()
    assert b.channels[0] == (((1, 3, 5),),) and a != b and hash(b) == hash(b.canonical())
    assert sorted([a, b]) == sorted([b, a])
    assert Subnet.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    t = a.to_tensor(space)
    assert t.dtype == torch.int64 and t.shape == (space.num_items(),)
    assert Subnet.from_tensor(t, space) == a  # draw order survives
    with pytest.raises(ValueError):
        Subnet.from_tensor(t[:-1], space)
    for bad in (Subnet([[0], [1]], [[[[1]]], [[]]]),            # too few blocks
                Subnet([[0], [1], [0]], [[[[1, 1]]], [[]], [[[0]]]]),  # repeated channel
                Subnet([[2], [1], [0]], [[[]], [[]], [[[0]]]])):       # no such path
        with pytest.raises(ValueError):
            with subnet(model, bad):
                pass
    assert _no_hooks(model)


class _GroupedBlock(nn.Module):
    """conv1 (4 -> 8), then a depthwise 3x3 (groups 8), a grouped 3x3 (8 -> 12, groups 2: input
    channels 0-3 read by output rows 0-5, 4-7 by rows 6-11) and conv2 (12 -> 4); identity shortcut."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(12, 4, 1)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        h = F.relu(self.grouped(F.relu(self.dw(F.relu(self.conv1(x))))))
        return self.conv2(h) + self.shortcut(x)


def _grouped_model():
    register_adapter(_GroupedBlock, ResidualAdapter("conv2", ("dw", "grouped", "conv2")))
    torch.manual_seed(0)
    model = nn.Sequential(_GroupedBlock(), _GroupedBlock())
    order = [5, 2, 7, 0, 3, 6, 1, 4]  # the depthwise kernels' L1 norms, by channel: order[i] + 1
    with torch.no_grad():
        for block in model:
            for i, rank in enumerate(order):
                block.dw.weight[i].fill_((rank + 1) / 9)
    return model


def _reading_norms(conv):
    """Per input channel, the L1 norm of the weights that read it, straight from the definition."""
    w, per_group = conv.weight.detach().abs(), conv.in_channels // conv.groups
    rows = conv.out_channels // conv.groups
    return [float(w[(i // per_group) * rows:(i // per_group + 1) * rows, i % per_group].sum())
            for i in range(conv.in_channels)]


def test_l1_search_ranks_grouped_and_depthwise_consumers():
    from advews.subnets.search import L1Search

    model = _grouped_model()
    space = discover(model)
    assert space.shape() == (((8, 8, 12), ()),) * 2
    alpha = L1Search(space, 0.75).sample()
    for kept, chans, block in zip(alpha.paths, alpha.channels, model):
        assert kept == (0, 1)  # keep_count(2, 0.75)
        dw, grouped, conv2 = chans[0]
        assert (len(dw), len(grouped), len(conv2)) == (keep_count(8, 0.75), keep_count(8, 0.75), keep_count(12, 0.75))
        assert len(dw) == 6 and dw == (0, 1, 3, 4, 6, 7)  # norms 6, 3, 1, 4, 7, 5: all but 8 and 7
        for layer, idx in ((block.grouped, grouped), (block.conv2, conv2)):
            norms = _reading_norms(layer)
            assert idx == tuple(sorted(sorted(range(len(norms)), key=norms.__getitem__)[:len(idx)]))
    with torch.no_grad(), subnet(model, alpha):  # a grouped consumer masks its input
        assert model(torch.rand(2, 4, 5, 5)).shape == (2, 4, 5, 5)


def test_check_with_rho_catches_a_wrong_count():
    from advews.subnets.search import L1Search

    space = discover(_grouped_model())
    alpha = L1Search(space, 0.75).sample()
    alpha.check(space, 0.75)
    residual, shortcut = alpha.channels[0]
    one_short = Subnet(alpha.paths, ((residual[:1] + ((0, 1),) + residual[2:], shortcut), *alpha.channels[1:]))
    one_short.check(space)  # a valid subnet, of another width
    with pytest.raises(ValueError, match=r"block 0 path 0 layer 1 channels: keeps 2 of 8, .* keeps keep_count\(8, "
                                         r"0.75\) = 6"):
        one_short.check(space, 0.75)
    one_path = Subnet(((0,), (0, 1)), ((alpha.channels[0][0],), alpha.channels[1]))
    with pytest.raises(ValueError, match="block 0 paths: keeps 1 of 2"):
        one_path.check(space, 0.75)
    with pytest.raises(ValueError, match="layer 0 channels: keeps 6 of 8"):  # paths: keep_count(2, 0.6) = 2
        alpha.check(space, 0.6)
