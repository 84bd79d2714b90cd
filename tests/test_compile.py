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


def test_installed_masks_survive_until_backward():
    """A subnet forward's saved masks must stay valid for the backward after the context closes."""
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                         "options": {"widths": (4, 8, 8)}}).train()
    space = space_of(model)
    alpha = random_subnet(space, 0.5, torch.Generator().manual_seed(0))
    x = torch.rand(8, 1, 28, 28)
    with subnet(model, alpha, space):
        expected_loss = model(x).logsumexp(1).mean()
    expected_loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    install_masks(model, space)
    with subnet(model, alpha, space):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    for g, e in zip((p.grad for p in model.parameters()), expected):
        assert torch.allclose(g, e, atol=1e-6)


def test_training_with_compile_matches_eager(tmp_path):
    """train.compile = True trains an EWS defense (masks as buffers) and tracks the eager run."""
    from advews.cli.common import parse_gin
    from advews.engine.trainer import Trainer

    rows = {}
    for flag in (False, True):
        parse_gin(["quickstart_ews.gin"], [
            f"train.compile = {flag}", "train.epochs = 1", "data.train_limit = 256", "data.val_size = 64",
            "AT.steps = 2", "train.val_steps = 2", "EWS.interval = 2", "EWS.num_samples = 2",
            "model.options = {'widths': (8, 16, 16)}",
        ])
        counters.clear()
        rows[flag] = Trainer(output_dir=str(tmp_path / str(flag)), quiet=True).run()
        if flag:
            assert 0 < counters["stats"]["unique_graphs"] <= 8  # a handful of graphs, not one per step
    assert abs(rows[True]["train_loss"] - rows[False]["train_loss"]) < 0.02 * rows[False]["train_loss"]
    assert rows[True]["train_ews_kl"] > 0
