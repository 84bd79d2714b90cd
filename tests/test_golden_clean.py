"""Golden steps, clean and corruption rows (EWS paper Tables 1-3): one training iteration of each recipe
computed by advews and by a transcription of the authors' ``train_cifar.py`` / ``train_imnet.py``
(``train`` and ``train_augmix``; the two scripts' iterations are the same code), from the same
weights, batch, subnet draws and dropout noise, compared to 1e-5.

The recipe file itself is parsed (so a recipe that drifts from the authors' objective fails here);
only the model is swapped for a tiny one of the recipe's family (a Bottleneck ResNet; torchvision's
for the ImageNet rows, with 1000 classes so that the KL's 1/classes scale is the real one). The
switches advews deliberately sets otherwise by default are put at the authors' position
(``REFERENCE``): BN in train mode for the search's reward, their per-item controller objective and
their advantage baseline. What remains different, and is not part of one iteration: the controller's
parametrisation (one head per decision; the transcription walks advews's heads with the authors'
formulas), masks that apply on CIFAR (their CIFAR script's never did), the LR schedule.
"""

import copy
from pathlib import Path

import gin
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from advews.defenses import build_defense
from advews.engine.optim import make_optimizer
from advews.engine.precision import Precision
import advews.engine.trainer  # noqa: F401  (registers train.* for the recipes)
from advews.models.resnet import Bottleneck, ResNet
from advews.subnets import space_of

GIN = Path(__file__).resolve().parents[1] / "advews" / "gin"
CIFAR = ["standard", "standard_dropout", "autoaugment", "augmix"]
IMAGENET = ["standard_imagenet", "augmix_imagenet", "deepaugment_imagenet", "deepaugment_augmix_imagenet"]
REFERENCE = [
    "EWS.search_bn = 'train'",              # their clean scripts score subnets in train mode
    "ControllerSearch.objective = 'authors'",
    "ControllerSearch.baseline = 'advantage'",
]
DROPOUT_SEED = 1234


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(recipe: str, dropout: float) -> nn.Module:
    torch.manual_seed(0)
    if recipe in IMAGENET:
        from torchvision.models.resnet import Bottleneck as TvBottleneck, ResNet as TvResNet

        model = TvResNet(TvBottleneck, [1, 1, 1, 1], num_classes=1000, width_per_group=16)
    else:
        model = ResNet(Bottleneck, (1, 1), num_classes=10, dropout=dropout)
    return model.double()


def batch(recipe: str, model: nn.Module):
    """Images, and labels the full net mostly predicts, so that subnet accuracies (the reward) differ
    between the BN modes and views the switches choose between."""
    g = torch.Generator().manual_seed(1)
    size = 32 if recipe in IMAGENET else 16
    x = torch.rand(24, 3, size, size, generator=g)
    with torch.no_grad():
        y = model.train()(x.double()).argmax(1)
    y[::3] = torch.randint(0, 10, y[::3].shape, generator=g)
    return x, y


def query(key: str, default):
    try:
        return gin.query_parameter(key)
    except ValueError:
        return default


def parse(recipe: str, bindings=()) -> None:
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN))
    gin.parse_config_files_and_bindings([str(GIN / f"{recipe}.gin")], list(bindings))


def conv2_masks(model: nn.Module, space, alpha):
    """The authors' subnet (``model.py``: MaskBottleneck masks conv2's input channels; 2 paths, both
    kept at rho 0.7): a pre-hook per Bottleneck's conv2 zeroing the dropped input channels, which is
    their index_select of input and weight."""
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    blocks = [m for m in model.modules() if isinstance(m, (Bottleneck, TvBottleneck))]
    assert len(blocks) == len(space.blocks)
    handles = []
    for bottleneck, kept, chans in zip(blocks, alpha.paths, alpha.channels):
        assert kept == (0, 1), "rho 0.7 keeps both paths of a 2-path block"
        mask = torch.zeros(bottleneck.conv2.in_channels, dtype=torch.float64)
        mask[list(chans[0][0])] = 1.0
        hook = bottleneck.conv2.register_forward_pre_hook(lambda m, inp, mask=mask: (inp[0] * mask[:, None, None],))
        handles.append(hook)
    return handles


class AuthorsSubnet:
    """switch_to_subnet / switch_to_fullnet: masks on, BN momentum 0, dropout p 0; then back."""

    def __init__(self, model, space, alpha):
        self.model, self.space, self.alpha = model, space, alpha

    def __enter__(self):
        self.handles = conv2_masks(self.model, self.space, self.alpha)
        self.saved = [(m, m.momentum) for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.drops = [(m, m.p) for m in self.model.modules() if isinstance(m, nn.Dropout)]
        for m, _ in self.saved:
            m.momentum = 0.0
        for m, _ in self.drops:
            m.p = 0.0

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for m, momentum in self.saved:
            m.momentum = momentum
        for m, p in self.drops:
            m.p = p


def authors_policy_terms(ctrl, sub):
    """Their ``Controller.forward`` terms for one subnet on advews's heads: per decision (certain ones
    included) p = softmax(logits) + 1e-6, log_p += sum log p_a, entropy += -sum p_a log p_a."""
    draws = ctrl._draws([sub])
    state = (torch.zeros(1, ctrl.hidden), torch.zeros(1, ctrl.hidden))
    x, log_p, entropy = ctrl.start[None], 0.0, 0.0
    for block, kept in zip(ctrl.plan, sub.paths):
        for d in [block.paths] + [d for p in kept for d in block.layers[p]]:
            state = ctrl.cell(x, state)
            p = torch.softmax(ctrl.heads[str(d.index)](state[0]), dim=-1)[0] + 1e-6
            a = draws[d.index][0]
            log_p = log_p + p[a].log().sum()
            entropy = entropy - (p[a] * p[a].log()).sum()
            x = ctrl.embeds[d.index](a).mean(0, keepdim=True)
    return log_p, entropy


def kl_mean(student, teacher):
    """nn.KLDivLoss()(log_softmax(student), softmax(teacher)): reduction 'mean', over batch x classes."""
    p = teacher.softmax(1)
    return (p * (p.log() - student.log_softmax(1))).sum() / p.numel()


def augmix_jsd(logits, n):
    """AugMix's consistency term as their train_augmix writes it (weight 12, mixture clamped)."""
    probs = [z.softmax(1) for z in logits.split(n)]
    log_m = torch.clamp(sum(probs) / 3.0, 1e-7, 1).log()
    return 12 * sum((q * (q.log() - log_m)).sum() / n for q in probs) / 3.0


def reference_step(recipe, ews, model, ctrl, space, views, y, draws, lr_model, cfg):
    """One iteration of their ``train`` / ``train_augmix``: controller update (step 0), then the model."""
    n = y.shape[0]
    inputs = torch.cat(views)
    model.train()
    if ews:
        ctrl_opt = torch.optim.Adam(ctrl.parameters(), lr=cfg["controller_lr"], betas=(0.5, 0.999))
        with AuthorsSubnet(model, space, draws["update"]), torch.no_grad():
            student = model(inputs)[:n]
        reward = -(student.argmax(1) == y).float().mean().item()  # baseline 0: reward itself
        log_p, entropy = authors_policy_terms(ctrl, draws["update"])
        ctrl_opt.zero_grad()
        (-log_p * reward - cfg["entropy_coeff"] * entropy).backward()
        nn.utils.clip_grad_norm_(ctrl.parameters(), 3.0)
        ctrl_opt.step()
    opt = torch.optim.SGD(model.parameters(), lr=lr_model, momentum=0.9, nesterov=True, weight_decay=cfg["wd"])
    opt.zero_grad()
    torch.manual_seed(DROPOUT_SEED)
    logits = model(inputs)
    loss = F.cross_entropy(logits[:n], y)
    if len(views) == 3:
        loss = loss + augmix_jsd(logits, n)
    if ews:
        with AuthorsSubnet(model, space, draws["distil"]):
            student = model(inputs)
        kl = sum(kl_mean(s, t.detach()) for s, t in zip(student.split(n), logits.split(n))) / len(views)
        loss = loss + 1.0 * kl  # lambda_kl 1, the paper's clean-training weight
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    nn.utils.clip_grad_norm_(model.parameters(), 3.0)  # their --grad_clip 3 (train_cifar and train_imnet)
    opt.step()
    return float(loss.detach()), grads


def advews_step(recipe, ews, model, x, y, bindings):
    """The calls of the training loop's ``_train_step`` (fp32 precision object, no DDP, no guard)."""
    parse(f"{recipe}_ews" if ews else recipe, REFERENCE + list(bindings))
    defense = build_defense(gin.query_parameter("train.defense"))
    defense.setup(model)
    draws = {}
    if ews:
        search = defense.search
        sample = search.controller.sample

        def recording_sample(*args, **kwargs):
            out = sample(*args, **kwargs)
            draws.setdefault("update", out.subnets[0].canonical())  # the first draw: the update's
            return out

        search.controller.sample = recording_sample
        distil = search.sample

        def recording_distil():
            draws["distil"] = distil()
            return draws["distil"]

        search.sample = recording_distil
    optimizer = make_optimizer(model)
    model.train()
    defense.set_progress(0, 1.0)
    torch.manual_seed(7)
    prepared = defense.prepare(model, x, y)
    views = [prepared.x.double()] + [v.double() for v in getattr(prepared, "x_aug", ())]
    prepared.x = views[0]
    if len(views) > 1:
        prepared.x_aug = tuple(views[1:])
    defense.begin_step(model, prepared)
    optimizer.zero_grad()
    torch.manual_seed(DROPOUT_SEED)
    out = defense.training_loss(model, prepared, None)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    grad_clip = query("train.grad_clip", None)
    Precision("none", torch.device("cpu")).step(optimizer, grad_clip, None)
    defense.end_step(model)
    ctrl = defense.search.controller if ews else None
    return float(out.loss.detach()), grads, views, draws, ctrl, optimizer.param_groups[0]["lr"]


def run_both(recipe, ews, bindings=()):
    parse(recipe)
    options = query("model.options", None) or {}
    dropout = options.get("dropout", 0.0)
    model = tiny_model(recipe, dropout)
    x, y = batch(recipe, model)
    reference = copy.deepcopy(model)
    controller_init = None
    if ews:  # the controller's initial weights (at the reference position), before advews's update
        parse(f"{recipe}_ews", REFERENCE)
        probe = build_defense(gin.query_parameter("train.defense"))
        probe.setup(copy.deepcopy(model))
        controller_init = copy.deepcopy(probe.search.controller)
    loss, grads, views, draws, ctrl, lr = advews_step(recipe, ews, model, x, y, bindings)
    cfg = {"controller_lr": 3e-4, "entropy_coeff": 0.005, "wd": 1e-4}
    ref_loss, ref_grads = reference_step(recipe, ews, reference, controller_init, space_of(reference), views,
                                         y, draws, lr, cfg)
    diffs = {"loss": abs(loss - ref_loss)}
    diffs["grad"] = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads))
    diffs["weights"] = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), reference.parameters()))
    if ews:  # Adam's first step moves every parameter by ~lr whatever the gradient's size: compare both
        ours, theirs = list(ctrl.named_parameters()), dict(controller_init.named_parameters())
        if [n for n, _ in ours] != list(theirs):  # another objective has other heads
            return {**diffs, "controller": float("inf")}
        diffs["controller"] = max(float((p - theirs[n]).detach().abs().max()) for n, p in ours)
        diffs["controller_grad"] = max(float((p.grad - theirs[n].grad).abs().max())
                                       for n, p in ours if p.grad is not None)
    return diffs


@pytest.mark.parametrize("ews", [False, True], ids=["vanilla", "ews"])
@pytest.mark.parametrize("recipe", CIFAR + IMAGENET)
def test_one_iteration_equals_the_authors_script(recipe, ews):
    diffs = run_both(recipe, ews)
    assert max(diffs.values()) < 1e-5, diffs


FLIPS = {
    "EWS.lam = 1.0": CIFAR + IMAGENET,                  # the paper's lambda read with advews's KL reduction
    "train.grad_clip = None": CIFAR + IMAGENET,
    "EWS.search_bn = 'eval'": ["standard", "augmix_imagenet"],
    "ControllerSearch.objective = 'exact'": ["standard", "standard_imagenet"],
    "ControllerSearch.baseline = 'reward'": ["autoaugment"],
    "EWS.subnet_dropout = True": ["standard_dropout"],
    "AugMix.search_on = 'all'": ["augmix", "augmix_imagenet"],
}


@pytest.mark.parametrize("flip, recipe", [(f, r) for f, rs in FLIPS.items() for r in rs])
def test_flipping_a_reference_switch_breaks_the_equality(flip, recipe):
    diffs = run_both(recipe, True, [flip])
    assert max(diffs.values()) > 1e-5, (flip, diffs)
