"""External models: public state_dict layouts load into the zoo with identical logits; clear errors."""

import re
import textwrap

import pytest
import torch

from advews.errors import AdvewsError
from advews.models import build_model
from advews.models.external import load_external, load_module
from advews.data.cifar import CIFAR10_MEAN, CIFAR10_STD

SMALL_PREACT = {"arch": "small_preact_resnet", "options": {"widths": (4, 8, 8)}}
SMALL_WRN = {"arch": "wide_resnet", "options": {"depth": 10, "widen_factor": 2}}


def source_model(spec):
    """A zoo model with every parameter and BN statistic random, so a mix-up of tensors shows."""
    torch.manual_seed(0)
    model = build_model({**spec, "num_classes": 10, "in_channels": 3,
                         "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}).eval()
    with torch.no_grad():
        for name, t in model.model.state_dict().items():
            if name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.normal_(0, 0.2)
    return model


def kuangliu(key):  # layer1.0.conv1, linear, shortcut.0 (kuangliu ResNets, Rice et al.'s PreAct)
    return re.sub(r"^layers\.(\d+)\.", lambda m: f"layer{int(m[1]) + 1}.", key)


def torchvision_style(key):  # layer1.0.downsample.0, fc
    return re.sub(r"^linear\.", "fc.", kuangliu(key).replace(".shortcut.", ".downsample."))


def robustbench_wrn(key):  # block1.layer.0.convShortcut, final bn1, fc
    key = re.sub(r"^layers\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.layer.", key)
    key = key.replace(".shortcut.0.", ".convShortcut.")
    return re.sub(r"^bn\.", "bn1.", re.sub(r"^linear\.", "fc.", key))


def public_state(model, rename, prefix=""):
    return {prefix + rename(k): v.clone() for k, v in model.model.state_dict().items()}


def assert_same_logits(spec, weights):
    original = source_model(spec)
    loaded = load_external(spec["arch"], str(weights), options=spec["options"])
    x = torch.rand(4, 3, 32, 32)
    assert not loaded.training
    assert torch.equal(loaded(x), original(x))


def test_our_layout_and_our_normalized_checkpoint(tmp_path):
    model = source_model(SMALL_PREACT)
    torch.save(model.model.state_dict(), tmp_path / "net.pt")
    assert_same_logits(SMALL_PREACT, tmp_path / "net.pt")
    # the whole Normalized state (model. prefix, mean/std buffers), as inside an advews checkpoint
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    assert_same_logits(SMALL_PREACT, tmp_path / "wrapped.pt")
    with pytest.raises(AdvewsError, match="saved with input mean") as err:
        load_external("small_preact_resnet", str(tmp_path / "wrapped.pt"), normalization="none",
                      options=SMALL_PREACT["options"])
    assert "\n" not in str(err.value)


def test_preact_public_layout_behind_dataparallel(tmp_path):
    torch.save(public_state(source_model(SMALL_PREACT), kuangliu, "module."), tmp_path / "w.pt")
    assert_same_logits(SMALL_PREACT, tmp_path / "w.pt")


def test_wrn_robustbench_layout_with_trades_unused_sub_block(tmp_path):
    model = source_model(SMALL_WRN)
    state = public_state(model, robustbench_wrn)
    assert "block1.layer.0.convShortcut.weight" in state and "bn1.weight" in state and "fc.weight" in state
    # TRADES' WideResNet also saves a "1st sub-block" its forward never uses
    state.update({k.replace("block1.", "sub_block1.", 1): torch.randn_like(v.float())
                  for k, v in state.items() if k.startswith("block1.")})
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    assert_same_logits(SMALL_WRN, tmp_path / "w.pt")


def test_resnet18_torchvision_style_old_checkpoint(tmp_path):
    spec = {"arch": "resnet18", "options": {}}
    state = public_state(source_model(spec), torchvision_style, "module.")
    assert "module.layer2.0.downsample.1.running_var" in state and "module.bn1.weight" in state  # stem bn1
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 BN
    torch.save(state, tmp_path / "w.pt")
    assert_same_logits(spec, tmp_path / "w.pt")


def load_error(tmp_path, state, **kwargs):
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(AdvewsError) as err:
        load_external("small_preact_resnet", str(tmp_path / "bad.pt"), options=SMALL_PREACT["options"], **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_wrong_key_lists_missing_and_unexpected(tmp_path):
    state = public_state(source_model(SMALL_PREACT), kuangliu)
    state["layer1.0.convX.weight"] = state.pop("layer1.0.conv1.weight")
    message = load_error(tmp_path, state)
    assert "missing 1: layers.0.0.conv1.weight" in message and "unexpected 1: layer1.0.convX.weight" in message


def test_wrong_shape_and_truncated_lists(tmp_path):
    state = public_state(source_model(SMALL_PREACT), kuangliu)
    message = load_error(tmp_path, state, num_classes=100)
    assert "wrong shape 2" in message and "linear.weight (10, 8) vs linear.weight (100, 8)" in message
    message = load_error(tmp_path, {f"junk{i}.weight": torch.zeros(1) for i in range(9)})
    assert "unexpected 9: junk0.weight" in message and "(5 more)" in message and "missing 39" in message


@pytest.mark.parametrize("content, needle", [(None, "no weights file"), ([1, 2], "holds no state_dict")])
def test_unreadable_weights(tmp_path, content, needle):
    path = tmp_path / "w.pt"
    if content is not None:
        torch.save(content, path)
    with pytest.raises(AdvewsError, match=needle):
        load_external("small_preact_resnet", str(path))


def test_load_module(tmp_path, monkeypatch):
    (tmp_path / "my_zoo.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny():
            return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 3))

        def not_a_model():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_module("my_zoo:tiny")
    assert isinstance(model, torch.nn.Sequential) and not model.training
    assert model(torch.rand(2, 3, 2, 2)).shape == (2, 3)
    for spec, needle in [("my_zoo", "module:function"), ("no_such_zoo_module:f", "cannot import"),
                         ("my_zoo:missing", "no function 'missing'"), ("my_zoo:not_a_model", "returned a int")]:
        with pytest.raises(AdvewsError, match=needle) as err:
            load_module(spec)
        assert "\n" not in str(err.value)
