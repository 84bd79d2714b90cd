"""torch.compile with subnets: installed masks give the eager subnet outputs without recompiling."""

import torch
from torch._dynamo.utils import counters

from advews.models import build_model
from advews.subnets import install_masks, random_subnet, space_of, subnet


def test_installed_masks_match_temporary_hooks_and_keep_state_dict():
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                         "options": {"widths": (4, 8, 8)}}).eval()
    keys = set(model.state_dict())
    space = space_of(model)
    x = torch.rand(8, 1, 28, 28)
    alphas = [random_subnet(space, 0.5, torch.Generator().manual_seed(i)) for i in range(3)]
    expected = []
    for a in alphas:
        with subnet(model, a, space):
            expected.append(model(x))
    full = model(x)
    install_masks(model)
    assert set(model.state_dict()) == keys  # mask buffers are not saved in checkpoints
    for a, e in zip(alphas, expected):
        with subnet(model, a, space):
            assert torch.allclose(model(x), e, atol=1e-6)
    assert torch.equal(model(x), full)


def test_compiled_model_runs_every_subnet_without_recompiling():
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                         "options": {"widths": (4, 8, 8)}}).eval()
    space = space_of(model)
    x = torch.rand(8, 1, 28, 28)
    alphas = [random_subnet(space, 0.5, torch.Generator().manual_seed(i)) for i in range(4)]
    expected = []
    for a in alphas:
        with subnet(model, a, space):
            expected.append(model(x))
    install_masks(model, space)
    compiled = torch.compile(model)
    counters.clear()
    for a, e in zip(alphas, expected):
        with subnet(compiled, a, space):
            assert torch.allclose(compiled(x), e, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
