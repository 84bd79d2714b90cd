"""timm architectures (ViT, DeiT, Swin, ConvNeXt, ConvStem variants): their subnet spaces, masks equal
to input masks in values and gradients, every search, AT_EWS training with a bit-exact resume, the
subnet analysis, the timm-version checks and the export round trip."""

import json
import os

import pytest
import timm
import torch
from torch import nn

from advews.cli.eval import main as eval_main
from advews.cli.export import main as export_main
from advews.cli.train import main as train_main
from advews.engine.checkpoint import load_checkpoint, save_checkpoint
from advews.errors import AdvewsError
from advews.models import build_model, model_spec
from advews.subnets import L1Search, RandomSearch, Subnet, keep_count, random_subnet, space_of, subnet
from advews.subnets.search import ControllerSearch

FAMILIES = {
    "vit": ("timm:vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 16,
                                          "num_heads": 4}),
    "vit_convstem": ("timm:vit_tiny_patch16_224", {"img_size": 28, "patch_size": 4, "depth": 2, "embed_dim": 16,
                                                   "num_heads": 4, "conv_stem": True, "conv_stem_width": 4}),
    "deit": ("timm:deit_tiny_patch16_224", {"img_size": 28, "patch_size": 7, "depth": 2, "embed_dim": 12,
                                            "num_heads": 3}),
    "swin": ("timm:swin_tiny_patch4_window7_224", {"img_size": 28, "depths": (2,), "num_heads": (2,),
                                                   "embed_dim": 8, "window_size": 7}),
    "convnext": ("timm:convnext_tiny", {"depths": (1, 1, 1, 1), "dims": (8, 8, 8, 8), "output_stride": 8}),
    "convnext_convstem": ("timm:convnext_tiny", {"depths": (1, 1, 1, 1), "dims": (8, 8, 8, 8), "output_stride": 8,
                                                 "conv_stem": True, "conv_mlp": True}),
}
TRAINED = ("vit", "deit", "swin", "convnext")
pytestmark = pytest.mark.usefixtures("one_thread")


def build(family, seed=0):
    arch, options = FAMILIES[family]
    torch.manual_seed(seed)
    return build_model(dict(model_spec(arch, options), num_classes=10, in_channels=1))


def digits(n=4):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_families_discover_heads_hidden_units_and_paths():
    """Per family what a path and a channel are: a ViT block's attention heads and MLP hidden units,
    a ConvNeXt block's hidden units and its shortcut."""
    vit = space_of(build("vit"))
    assert vit.shape() == (((4,), (64,)),) * 2  # 2 blocks: attn (4 heads), mlp (4 x 16 hidden)
    layer = vit.blocks[0].paths[0].layers[0]
    assert layer.group == 4 and layer.module.in_features == 16  # a head is head_dim = 4 columns of proj
    assert space_of(build("deit")).shape() == (((3,), (48,)),) * 2
    assert space_of(build("swin")).shape() == (((2,), (32,)),) * 2
    convnext = space_of(build("convnext"))
    assert convnext.shape() == (((32,), ()),) * 4 and convnext.blocks[0].paths[1].name.endswith("shortcut")
    assert space_of(build("vit_convstem")).shape() == vit.shape()  # the stem is not a block
    assert keep_count(4, 0.7) == 3 and keep_count(3, 0.9) == 3


def test_conv_stems_replace_the_patchify_stem():
    vit = build("vit_convstem").model
    convs = [m for m in vit.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(1, 4, 2), (4, 8, 2), (8, 16, 1)]
    assert vit(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    convnext = build("convnext_convstem").model
    convs = [m for m in convnext.stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [(1, 4, 2), (4, 8, 2)]


def _reference_masks(model, alpha):
    """Input masking written out from the documented semantics: a kept head keeps its head_dim
    columns of the projection's input, dropped paths' outputs are zeroed. Returns hook handles."""
    space, handles = space_of(model), []
    for b, block in enumerate(space.blocks):
        for p, path in enumerate(block.paths):
            if p not in alpha.paths[b]:
                handles.append(path.output_module.register_forward_hook(lambda m, a, o: o * 0))
                continue
            for layer, idx in zip(path.layers, alpha.channels[b][alpha.paths[b].index(p)]):
                mask = torch.zeros(layer.channels * layer.group)
                for i in idx:
                    mask[i * layer.group:(i + 1) * layer.group] = 1
                shape = (1, -1, 1, 1) if isinstance(layer.module, nn.Conv2d) else (-1,)
                handles.append(layer.module.register_forward_pre_hook(
                    lambda m, a, mask=mask.view(shape): (a[0] * mask,)))
    return handles


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_weight_masks_equal_input_masks_values_and_gradients(family):
    model, other = build(family).train(), build(family).train()
    alpha = random_subnet(space_of(model), 0.5, torch.Generator().manual_seed(3))
    assert any(len(k) < len(b.paths) for k, b in zip(alpha.paths, space_of(model).blocks))  # a path is dropped
    x = digits()
    results = []
    for m, masked in ((model, True), (other, False)):
        xi = x.clone().requires_grad_(True)
        handles = [] if masked else _reference_masks(m, alpha)
        if masked:
            with subnet(m, alpha):
                out = m(xi)
        else:
            out = m(xi)
        out.square().sum().backward()
        for h in handles:
            h.remove()
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]))
    (out_a, gx_a, grads_a), (out_b, gx_b, grads_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert torch.allclose(gx_a, gx_b, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads_a, grads_b))
    with torch.no_grad():
        assert not torch.allclose(out_a, model(x), atol=1e-4)  # the subnet is not the full net


def test_a_dropped_head_gets_no_gradient_through_its_projection_columns():
    model = build("vit").train()
    space = space_of(model)
    alpha = Subnet(((0, 1), (0, 1)), (((( 0, 2),), (tuple(range(64)),)), (((1, 2, 3),), (tuple(range(64)),))))
    with subnet(model, alpha):
        model(digits()).sum().backward()
    proj = space.blocks[0].paths[0].layers[0].module
    assert not proj.weight.grad[:, 4:8].any() and not proj.weight.grad[:, 12:16].any()  # heads 1 and 3
    assert proj.weight.grad[:, 0:4].abs().sum() > 0 and proj.weight.grad[:, 8:12].abs().sum() > 0
    assert type(proj) is nn.Linear


@pytest.mark.parametrize("family", TRAINED)
def test_every_search_draws_width_rho_subnets(family):
    model = build(family).train()
    space = space_of(model)
    for search in (RandomSearch(space, 0.5), L1Search(space, 0.5), ControllerSearch(space, 0.5)):
        alpha = search.sample()
        alpha.check(space, 0.5)
        with subnet(model, alpha):
            assert torch.isfinite(model(digits())).all()


def test_l1_ranks_heads_by_all_their_columns():
    model = build("vit")
    proj = space_of(model).blocks[0].paths[0].layers[0].module
    with torch.no_grad():
        proj.weight.fill_(1.0)
        proj.weight[:, 8:12] = 0.01  # head 2 is the weakest (smallest weights reading it)
        proj.weight[0, 4] = -5.0  # one large weight in one of its columns makes head 1 the strongest
    alpha = L1Search(space_of(model), 0.6).sample()  # keeps both paths and keep_count(4, 0.6) = 3 heads
    assert alpha.paths[0] == (0, 1) and alpha.channels[0][0][0] == (0, 2, 3)


TINY = ["train.epochs = 2", "data.train_limit = 64", "data.val_size = 32", "train.batch_size = 32", "AT.steps = 1",
        "train.val_steps = 1", "train.defense = 'AT_EWS'", "EWS.interval = 1", "EWS.num_samples = 2"]


def _train(out, family, *extra, resume=False):
    arch, options = FAMILIES[family]
    args = ["--gin", "quickstart_ews.gin", "--quiet", "--output", str(out)]
    for p in (*TINY, f"model.arch = '{arch}'", f"model.options = {options!r}", *extra):
        args += ["--gin-param", p]
    return train_main(args + (["--resume"] if resume else []))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per trained family: an uninterrupted 2-epoch AT_EWS run and one stopped after epoch 1 and resumed."""
    root = tmp_path_factory.mktemp("timm")
    for family in TRAINED:
        assert _train(root / family, family) == 0
        assert _train(root / f"{family}_resumed", family, "train.epochs = 1") == 0
        assert _train(root / f"{family}_resumed", family, resume=True) == 0
    return root


@pytest.mark.parametrize("family", TRAINED)
def test_at_ews_trains_and_resumes_bit_exactly(runs, family):
    a, b = (load_checkpoint(str(runs / f / "last.pt")) for f in (family, f"{family}_resumed"))
    for key in ("epoch", "model", "optimizer", "defense_state", "rng", "best"):
        assert _same(a[key], b[key]), key
    rows = [json.loads(line) for line in open(runs / family / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["train_ews_kl"] > 0
    spec = a["model_spec"]
    assert spec["arch"] == FAMILIES[family][0] and spec["timm_version"] == timm.__version__
    assert spec["options"] == FAMILIES[family][1]


@pytest.mark.parametrize("family", TRAINED)
def test_subnet_analysis_and_block_vulnerability(runs, family, tmp_path):
    out = tmp_path / "subnets.json"
    assert eval_main(["--checkpoint", str(runs / family / "last.pt"), "--analysis", "subnets", "--rho", "0.5",
                      "--search", "random,controller,l1", "--search-updates", "2", "--n-subnets", "2",
                      "--n-examples", "16", "--steps", "1",
                      "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"random", "controller", "l1"} <= set(result)
    assert [b["name"] for b in result["block_vulnerability"]["blocks"]] == [b.name for b in space_of(build(family)).blocks]
    assert (tmp_path / "subnets_fig7.png").stat().st_size > 0  # the block-vulnerability plot


def test_timm_version_is_checked_on_load_and_resume(runs, tmp_path, capsys):
    state = load_checkpoint(str(runs / "vit" / "last.pt"))
    state["model_spec"]["timm_version"] = "0.9.2"
    save_checkpoint(state, str(tmp_path / "old.pt"))
    assert eval_main(["--checkpoint", str(tmp_path / "old.pt"), "--attack", "pgd", "--steps", "1",
                      "--n-examples", "8"]) == 0  # the weights fit: usable, with one warning
    err = capsys.readouterr().err
    assert "saved with timm 0.9.2, this is timm " + timm.__version__ in err
    state["model"] = {k.replace("blocks.", "layers.", 1): v for k, v in state["model"].items()}  # a timm rename
    save_checkpoint(state, str(tmp_path / "renamed.pt"))
    assert eval_main(["--checkpoint", str(tmp_path / "renamed.pt"), "--attack", "pgd", "--steps", "1",
                      "--n-examples", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit its weights" in err and "pip install timm==0.9.2" in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    run = tmp_path / "run"
    run.mkdir()
    state = load_checkpoint(str(runs / "vit_resumed" / "last.pt"))
    state["model_spec"]["timm_version"] = "0.9.2"
    save_checkpoint(state, str(run / "last.pt"))
    for name in ("config.gin", "metrics.jsonl"):
        (run / name).write_bytes((runs / "vit_resumed" / name).read_bytes())
    before = (run / "last.pt").read_bytes()
    assert _train(run, "vit", resume=True) == 2
    err = capsys.readouterr().err.strip()
    assert "saved with timm 0.9.2" in err and "resumes on the code it started with" in err
    assert (run / "last.pt").read_bytes() == before


@pytest.mark.parametrize("options, needle", [
    ("{'pretrained': True}", "downloads no weights"),
    ("{'conv_stem': 'yes'}", "conv_stem must be True or False"),
    ("{'no_such_option': 3}", "timm cannot build"),
])
def test_bad_timm_settings_are_one_line(options, needle, tmp_path, capsys):
    assert _train(tmp_path / "run", "vit", f"model.options = {options}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and not (tmp_path / "run").exists()


def test_unknown_timm_model_and_conv_stem_on_swin(tmp_path, capsys):
    assert _train(tmp_path / "a", "vit", "model.arch = 'timm:vit_nonexistent'") == 2
    assert "unknown timm model 'vit_nonexistent'" in capsys.readouterr().err
    with pytest.raises(AdvewsError, match="conv_stem applies to timm ViT/DeiT and ConvNeXt"):
        build_model(dict(model_spec("timm:swin_tiny_patch4_window7_224", dict(FAMILIES["swin"][1], conv_stem=True)),
                         num_classes=10, in_channels=1))


def test_export_round_trip_of_a_timm_model(runs, tmp_path):
    import advews

    out = tmp_path / "export"
    assert export_main([str(runs / "vit" / "best.pt"), str(out)]) == 0
    moved = tmp_path / "elsewhere"
    os.rename(out, moved)
    exported = advews.load_model(str(moved))
    original = advews.load_model(str(runs / "vit" / "best.pt"))
    x = digits(8)
    with torch.no_grad():
        assert torch.equal(exported.eval()(x), original.eval()(x))


class _ChannelsFirstLN(nn.Module):
    """Singh et al.'s channels-first LayerNorm (ConvNeXt's), written out: mean and biased variance
    over channels, eps 1e-6, then the affine."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


def _reference_stem(widths, final=None):
    """Their ConvBlock (ViT: 3x3 stride-2 conv, LN, GELU per width, then a 1x1 conv to ``final``) and
    ConvBlock1 (ConvNeXt-T/S: the same without the 1x1), transcribed from nmndeep/revisiting-at."""
    layers, cin = [], 3
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), _ChannelsFirstLN(w), nn.GELU()]
        cin = w
    if final:
        layers.append(nn.Conv2d(cin, final, 1))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("which", ["vit_s", "convnext_t"])
def test_conv_stems_equal_a_transcription_of_singh_et_al(which):
    """ViT-S ConvStem (ConvBlock(48, end_siz=8): widths 48-384, 1x1 to 384) and ConvNeXt-T ConvStem
    (ConvBlock1(48): widths 48, 96) from the same weights: same outputs and input gradients."""
    from advews.models.timm_arch import convnext_conv_stem, vit_conv_stem

    torch.manual_seed(0)
    if which == "vit_s":
        ours = vit_conv_stem(nn.Conv2d(3, 384, 16, stride=16), 48)
        theirs = _reference_stem((48, 96, 192, 384), final=384)
        with torch.device("meta"):  # the recipe's model gets exactly this stem
            deit = build_model(dict(model_spec("timm:deit_small_patch16_224", {"conv_stem": True}),
                                    num_classes=10, in_channels=3)).model
        assert [type(m) for m in deit.patch_embed.proj] == [type(m) for m in ours]
    else:
        ours = convnext_conv_stem(nn.Sequential(nn.Conv2d(3, 96, 4, stride=4), nn.Identity()))
        theirs = _reference_stem((48, 96))
    params = list(ours.parameters())
    assert [p.shape for p in params] == [p.shape for p in theirs.parameters()]
    with torch.no_grad():
        for a, b in zip(params, theirs.parameters()):
            a.copy_(torch.randn_like(a) * 0.2)  # norms' affines too, so they matter
            b.copy_(a)
    x = torch.rand(2, 3, 64, 64)
    outs = []
    for stem in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        out = stem(xi)
        out.square().sum().backward()
        outs.append((out.detach(), xi.grad, [p.grad for p in stem.parameters()]))
    (a, ga, pa), (b, gb, pb) = outs
    assert a.shape == b.shape == ((2, 384, 4, 4) if which == "vit_s" else (2, 96, 16, 16))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-5)
    assert all((p - q).abs().max() <= 1e-5 * q.abs().max() for p, q in zip(pa, pb))  # float32 sums of ~1e5 terms
