"""Independent transcriptions of one training iteration as the reference scripts compute it.

Golden-step tests run one advews iteration and, from the same weights, batch, attack noise and subnet
draw, the iteration below, then compare loss, gradients and updated weights. Each function names the
reference file and lines it transcribes (facts carried over, code written here). References:

- EWS (guoyongcs/EWS): ``train_adv_at.py`` (AT(+AWP)+EWS: switch_to_subnet/fullnet L210-227, update_baseline L230,
  attack_pgd L254-307, train L429-500),
  ``train_adv_trades.py`` (TRADES(+AWP)+EWS, train L462-550), ``utils.py`` (CrossEntropyLabelSmooth
  L22-35, diff_in_weights/add_into_weights L321-340, AdvWeightPerturb L343-369, TradesAWP L372-402,
  Robust_KL_Loss L405-413), ``search.py`` (Controller.forward L66-119).
- locuslab/robust_overfitting ``train_cifar.py`` and csdongxian/AWP ``AT_AWP/train_cifar10.py``: the same
  attack_pgd and AWP step as the EWS AT script (they use plain CE; the recipes' rows use the EWS
  script's label smoothing 0.1).
- yaodongyu/TRADES ``trades.py`` trades_loss and csdongxian/AWP ``trades_AWP`` (TradesAWP): the same
  attack and loss as the EWS TRADES script up to a 1e-12 inside the log (plain CE there; 0.1 smoothing
  in the EWS script and the recipes).
- YisenWang/MART ``mart.py`` mart_loss (L7-58).

Documented differences that are NOT transcribed (they cannot be numerically matched):
- the controller's parametrisation: advews has one head/embedding per decision and a learned start
  vector; the authors share ``w_path``/``w_channel`` cut to n outputs, one embedding per block, and
  also take an LSTM step for the 1-item "channel" decision of a shortcut path. The *formula* (their
  log-p and entropy) is transcribed on advews's walk.
- subnet masks come from advews's ``subnet`` context (proven equal to the authors' index_select masks
  elsewhere); BN momentum 0 and dropout p 0 inside a subnet are applied here as switch_to_subnet does.
- attack start noise: the references draw ``torch.randn(shape)``/``uniform_`` on the GPU; here the
  same N(0, 1)/U(-eps, eps) values as advews's draw (same seed, same dtype) so both starts coincide.
- extra train-mode forwards that only move BN running statistics: the transcription keeps the EWS
  scripts' forwards, including attack_pgd's 11th (restart bookkeeping) forward; robust_overfitting and
  AWP AT_AWP also forward the clean batch in train mode after the step, and TRADES's trades_loss and
  AWP's trades_AWP forward f(x) twice. None of these changes the step's loss, gradients or weights.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, Mapping, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from advews.subnets import subnet as advews_subnet

LOG_EPS = 1e-12  # train_adv_*.py: log(softmax + 1e-12) for the subnet's KL
CONTROLLER_EPS = 1e-6  # search.py: softmax + 1e-6


# --- comparisons ------------------------------------------------------------------------------------
def tree_diffs(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Max abs difference per key (inf for a key only one side has, or a shape mismatch)."""
    out = {}
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            out[k] = float("inf")
            continue
        x, y = torch.as_tensor(a[k]).double(), torch.as_tensor(b[k]).double()
        out[k] = float("inf") if x.shape != y.shape else float((x - y).abs().max()) if x.numel() else 0.0
    return out


def assert_close_tree(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                      atol: float = 1e-5, what: str = "advews vs reference") -> None:
    """Every entry within ``atol``; the message names the worst entries and their differences."""
    diffs = tree_diffs(actual, expected)
    bad = sorted(((d, k) for k, d in diffs.items() if not d <= atol), reverse=True)
    if bad:
        worst = ", ".join(f"{k} by {d:.3g}" for d, k in bad[:4])
        raise AssertionError(f"{what}: {len(bad)} of {len(diffs)} entries differ by more than {atol:g}: {worst}")


def running_stats(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every BN running mean and variance, keyed ``buffer/<name>``."""
    return {f"buffer/{n}": b.detach().clone() for n, b in model.named_buffers() if "running_" in n}


# --- losses -----------------------------------------------------------------------------------------
def ref_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """utils.py CrossEntropyLabelSmooth (L22-35): targets (1 - eps) one-hot + eps / classes, loss
    -sum_c t_c log p_c averaged over the batch; smoothing 0 is F.cross_entropy (TRADES, MART, AWP)."""
    log_probs = F.log_softmax(logits, dim=1)
    k = logits.shape[1]
    targets = torch.zeros_like(log_probs).scatter_(1, y.unsqueeze(1), 1)
    targets = (1 - smoothing) * targets + smoothing / k
    return (-targets * log_probs).mean(0).sum()


def ref_robust_kl(log_input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """utils.py Robust_KL_Loss (L405-413): KLDivLoss(reduction='none') summed over classes, mean over
    the batch: sum_i sum_c t (log t - input) / N."""
    return F.kl_div(log_input, target, reduction="none").sum(1).sum() / log_input.shape[0]


def ref_distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """train_adv_*.py: criterion_kl(log(softmax(student) + 1e-12), softmax(teacher.detach()))."""
    return ref_robust_kl(torch.log(F.softmax(student_logits, 1) + LOG_EPS), F.softmax(teacher_logits.detach(), 1))


# --- subnets ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def ref_subnet(model: nn.Module, alpha, space) -> Iterator[None]:
    """train_adv_at.py switch_to_subnet/switch_to_fullnet (L210-227): dropout p = 0, BN momentum 0 (so
    running statistics do not move), the subnet's masks (advews's ``subnet``, masks only); restored after."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            saved.append((m, "p", m.p))
            m.p = 0.0
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, "momentum", m.momentum))
            m.momentum = 0.0
    try:
        with advews_subnet(model, alpha, space, dropout=True):
            yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


def ref_subnet_accuracy(model: nn.Module, alpha, space, x: torch.Tensor, y: torch.Tensor, train_mode: bool) -> float:
    """train_adv_*.py controller block (AT L447-456, TRADES L492-501): the subnet's top-1 accuracy on
    x_adv, model in train mode (AT: batch statistics) or eval mode (TRADES: after its eval attack);
    complementary_accuracy = -prec1 / 100 is the reward."""
    was = model.training
    model.train(train_mode)
    with torch.no_grad(), ref_subnet(model, alpha, space):
        correct = (model(x).argmax(1) == y).float().sum()
    model.train(was)
    return float(correct * (100.0 / y.numel())) / 100


# --- controller -------------------------------------------------------------------------------------
def ref_controller_terms(controller: nn.Module, alpha) -> Tuple[torch.Tensor, torch.Tensor]:
    """search.py Controller.forward (L66-119): per decision p = softmax(logits) + 1e-6 over ALL n items;
    log_p += sum over the drawn items of log p; entropy += -sum over the drawn items of p log p; the next
    input is the mean embedding of the drawn items. Walked in advews's parametrisation (``Controller._walk``:
    learned start, a head and an embedding per decision, paths then each kept path's layers)."""
    h = torch.zeros(1, controller.hidden)
    state = (h, torch.zeros_like(h))
    x = controller.start.view(1, -1)
    log_p, entropy = torch.zeros(()), torch.zeros(())
    for b, block in enumerate(controller.plan):
        steps = [(block.paths, alpha.paths[b])]
        for j, p in enumerate(alpha.paths[b]):
            steps += [(d, alpha.channels[b][j][l]) for l, d in enumerate(block.layers[p])]
        for d, items in steps:
            state = controller.cell(x, state)
            probs = F.softmax(controller.heads[str(d.index)](state[0]), dim=-1) + CONTROLLER_EPS
            idx = torch.tensor([list(items)])
            picked_log, picked = torch.log(probs).gather(1, idx), probs.gather(1, idx)
            log_p = log_p + picked_log.sum()
            entropy = entropy - (picked_log * picked).sum()
            x = controller.embeds[d.index](idx).mean(1)
    return log_p, entropy


def ref_policy_loss(controller: nn.Module, alpha, reward: float, entropy_coeff: float) -> torch.Tensor:
    """train_adv_at.py L461: policy_loss = -log_p * reward - entropy_coeff * entropy (reward: the
    advantage the script computed)."""
    log_p, entropy = ref_controller_terms(controller, alpha)
    return -log_p * reward - entropy_coeff * entropy


def ref_controller_update(controller: nn.Module, alpha, reward: float, baseline: float, entropy_coeff: float,
                          lr: float = 3e-4, grad_clip: float = 3.0, gamma: float = 0.99) -> Dict[str, torch.Tensor]:
    """train_adv_at.py L447-465 (same in train_adv_trades.py L492-510): advantage =
    r - b if b else r; policy loss; backward; clip_grad_norm_ 3; Adam(lr 3e-4, betas (0.5, 0.999))
    step (a fresh optimizer: its first step); b <- 0.99 b + 0.01 * advantage (update_baseline L230).
    Updates ``controller`` in place; returns the loss, clipped gradients and new baseline."""
    optimizer = torch.optim.Adam(controller.parameters(), lr=lr, betas=(0.5, 0.999))
    optimizer.zero_grad()
    advantage = reward - baseline if baseline else reward
    loss = ref_policy_loss(controller, alpha, advantage, entropy_coeff)
    loss.backward()
    nn.utils.clip_grad_norm_(controller.parameters(), grad_clip)
    optimizer.step()
    out = {"policy_loss": loss.detach(), "baseline": torch.tensor(baseline * gamma + advantage * (1 - gamma))}
    out.update({f"controller_grad/{n}": p.grad.clone() for n, p in controller.named_parameters() if p.grad is not None})
    return out


# --- attacks ----------------------------------------------------------------------------------------
def ref_attack_pgd(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epsilon: float, alpha: float,
                   iters: int) -> torch.Tensor:
    """train_adv_at.py attack_pgd (L254-307; robust_overfitting and AWP AT_AWP identical), l_inf,
    restarts 1, no early stop, in the model's current mode: delta ~ U(-eps, eps) clipped to the box;
    per step delta <- clamp(delta + alpha sign(grad mean CE), -eps, eps) clipped to the box; then the
    restart bookkeeping forward on X + delta (one more forward: in train mode one more BN update).
    Returns clamp(X + delta, 0, 1) as the script's x_adv."""
    delta = torch.zeros_like(X).uniform_(-epsilon, epsilon)
    delta = torch.max(torch.min(delta, 1 - X), 0 - X)
    for _ in range(iters):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(X + delta), y), delta)
        d = torch.clamp(delta.detach() + alpha * torch.sign(grad), min=-epsilon, max=epsilon)
        delta = torch.max(torch.min(d, 1 - X), 0 - X)
    with torch.no_grad():
        model(X + delta)  # all_loss = F.cross_entropy(model(X + delta), y, reduction='none')
    return torch.clamp(X + delta.detach(), 0, 1)


def ref_trades_attack(model: nn.Module, x: torch.Tensor, epsilon: float, step_size: float, steps: int) -> torch.Tensor:
    """train_adv_trades.py L478-490 (TRADES trades.py L28-41): model.eval(); x' = x + 0.001 N(0, 1)
    unclipped; per step x' <- x' + step sign(grad KL_sum(log_softmax(f(x')) || softmax(f(x)))),
    projected onto the eps-ball then [0, 1]."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = ref_robust_kl(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1))
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * torch.sign(grad)
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0.0, 1.0)
    return x_adv.detach()


def ref_mart_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, step_size: float,
                    steps: int) -> torch.Tensor:
    """MART mart.py L17-32: model.eval(); x' = x + 0.001 N(0, 1) unclipped; per step x' <- x' + step
    sign(grad mean CE(f(x'), y)), projected onto the eps-ball then [0, 1]."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + step_size * torch.sign(grad)
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0.0, 1.0)
    return x_adv.detach()


# --- AWP --------------------------------------------------------------------------------------------
def ref_awp_diff(model: nn.Module, proxy_loss, proxy_lr: float) -> Dict[str, torch.Tensor]:
    """utils.py AdvWeightPerturb/TradesAWP.calc_awp + diff_in_weights (L321-402): a proxy loads the
    model's state, in train mode takes one SGD(proxy_lr) step on -proxy_loss(proxy); for each
    state-dict entry with 'weight' in its name and dim > 1, diff = ||w|| / (||w_proxy - w|| + 1e-20) (w_proxy - w)."""
    proxy = copy.deepcopy(model)
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    opt = torch.optim.SGD(proxy.parameters(), lr=proxy_lr)
    opt.zero_grad()
    (-proxy_loss(proxy)).backward()
    opt.step()
    diff = {}
    new = proxy.state_dict()
    for k, w in model.state_dict().items():
        if w.dim() > 1 and "weight" in k:
            d = new[k] - w
            diff[k] = w.norm() / (d.norm() + 1e-20) * d
    return diff


def ref_awp_add(model: nn.Module, diff: Dict[str, torch.Tensor], coeff: float) -> None:
    """utils.py add_into_weights: param += coeff * diff (perturb: +gamma, restore: -gamma)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in diff:
                p.add_(coeff * diff[name])


def ref_at_awp_loss(x_adv: torch.Tensor, y: torch.Tensor):
    """utils.py AdvWeightPerturb.calc_awp: the proxy's loss is plain CE on x_adv."""
    return lambda proxy: F.cross_entropy(proxy(x_adv), y)


def ref_trades_awp_loss(x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, beta: float):
    """utils.py TradesAWP.calc_awp: CE(f(x), y) + beta * KL_batchmean(log_softmax(f(x')) || softmax(f(x)))
    (plain CE; the KL's target is not detached)."""
    return lambda proxy: F.cross_entropy(proxy(x), y) + beta * F.kl_div(
        F.log_softmax(proxy(x_adv), 1), F.softmax(proxy(x), 1), reduction="batchmean")


# --- one iteration ----------------------------------------------------------------------------------
def _controller_block(ews: dict, model, x_adv, y, train_mode: bool) -> Dict[str, torch.Tensor]:
    """The scripts' 'train the controller' block (step % K == 0), on the full net's x_adv."""
    acc = ref_subnet_accuracy(model, ews["search_subnet"], ews["space"], x_adv, y, train_mode)
    out = ref_controller_update(ews["controller"], ews["search_subnet"], -acc, ews["baseline"], ews["entropy_coeff"])
    out["reward"] = torch.tensor(-acc)
    out.update({f"controller/{n}": p.detach().clone() for n, p in ews["controller"].named_parameters()})
    return out


def _finish(model, loss, optimizer, diff, gamma, out) -> Dict[str, torch.Tensor]:
    """loss.backward(); optimizer.step(); AWP restore; record loss, gradients and new weights."""
    loss.backward()
    out["loss"] = loss.detach()
    out.update({f"grad/{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    optimizer.step()
    if diff is not None:
        ref_awp_add(model, diff, -gamma)
    out.update({f"weight/{n}": p.detach().clone() for n, p in model.named_parameters()})
    out.update(running_stats(model))
    return out


def ref_at_step(model, x, y, *, eps, step_size, steps, smoothing, sgd, awp=None, ews=None, seed=0):
    """train_adv_at.py train() L429-500 for one step (robust_overfitting / AWP AT_AWP for the non-EWS
    rows: same order): model.train(); PGD in train mode; [controller block, BN train mode]; sample the
    subnet; [AWP: proxy CE on x_adv, perturb]; loss = CE_ls(f(x_adv)) [+ lam KL(sub(x_adv) || f(x_adv))];
    backward; SGD step; [AWP restore]. ``awp``: (gamma, proxy_lr); ``ews``: dict (see _controller_block)."""
    model.train()
    torch.manual_seed(seed)
    x_adv = ref_attack_pgd(model, x, y, eps, step_size, steps)
    out = _controller_block(ews, model, x_adv, y, train_mode=True) if ews else {}
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    optimizer.zero_grad()
    diff = ref_awp_diff(model, ref_at_awp_loss(x_adv, y), awp[1]) if awp else None
    if diff is not None:
        ref_awp_add(model, diff, awp[0])
    adv_logits = model(x_adv)
    loss = ref_cross_entropy(adv_logits, y, smoothing)
    if ews:
        with ref_subnet(model, ews["distill_subnet"], ews["space"]):
            loss = loss + ews["lam"] * ref_distill_kl(model(x_adv), adv_logits)
    return _finish(model, loss, optimizer, diff, awp[0] if awp else 0.0, out)


def ref_trades_step(model, x, y, *, eps, step_size, steps, beta, smoothing, sgd, awp=None, ews=None, seed=0):
    """train_adv_trades.py train() L462-550 (TRADES trades_loss / AWP trades_AWP for the non-EWS rows):
    eval-mode KL attack; [controller block in eval mode]; model.train(); [TradesAWP, perturb];
    loss = CE_ls(f(x)) + lam KL(sub(x) || f(x)) + beta (KL(f(x') || f(x)) + lam KL(sub(x') || f(x')));
    the full-net KL's target softmax(f(x)) is not detached. ``awp``: (gamma, proxy_lr)."""
    model.train()
    torch.manual_seed(seed)
    x_adv = ref_trades_attack(model, x, eps, step_size, steps)
    out = _controller_block(ews, model, x_adv, y, train_mode=False) if ews else {}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    optimizer.zero_grad()
    diff = ref_awp_diff(model, ref_trades_awp_loss(x, x_adv, y, beta), awp[1]) if awp else None
    if diff is not None:
        ref_awp_add(model, diff, awp[0])
    logits, adv_logits = model(x), model(x_adv)
    loss_clean = ref_cross_entropy(logits, y, smoothing)
    loss_adv = ref_robust_kl(torch.log(F.softmax(adv_logits, 1) + LOG_EPS), F.softmax(logits, 1))
    if ews:
        with ref_subnet(model, ews["distill_subnet"], ews["space"]):
            loss_clean = loss_clean + ews["lam"] * ref_distill_kl(model(x), logits)
            loss_adv = loss_adv + ews["lam"] * ref_distill_kl(model(x_adv), adv_logits)
    return _finish(model, loss_clean + beta * loss_adv, optimizer, diff, awp[0] if awp else 0.0, out)


def ref_mart_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART mart.py L34-58: CE(f(x'), y) + NLL(log(1.0001 - p(x') + 1e-12), y') with y' the most likely
    class other than y, + beta * mean_i KL_i(p(x) || p(x')) (1.0000001 - p(y|x)); nothing detached."""
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    return loss_adv + beta * (kl * (1.0000001 - true_probs)).sum() / logits.shape[0]


def ref_mart_step(model, x, y, *, eps, step_size, steps, beta, sgd, ews=None, seed=0):
    """MART train_wideresnet.py train() with mart_loss: eval-mode CE attack, model.train(), forwards
    f(x) then f(x'), MART loss, backward, SGD step. MART + EWS has no authors' script: the EWS term is
    written in the TRADES script's pattern (controller block in eval mode, as after MART's eval attack;
    lam KL on the clean view + beta lam KL on the adversarial view), which is advews's MART_EWS."""
    model.train()
    torch.manual_seed(seed)
    x_adv = ref_mart_attack(model, x, y, eps, step_size, steps)
    out = _controller_block(ews, model, x_adv, y, train_mode=False) if ews else {}
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    optimizer.zero_grad()
    logits, adv_logits = model(x), model(x_adv)
    loss = ref_mart_loss(logits, adv_logits, y, beta)
    if ews:
        with ref_subnet(model, ews["distill_subnet"], ews["space"]):
            kl = ref_distill_kl(model(x), logits) + beta * ref_distill_kl(model(x_adv), adv_logits)
            loss = loss + ews["lam"] * kl
    return _finish(model, loss, optimizer, None, 0.0, out)
