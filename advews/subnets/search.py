"""Strategies that find weak subnets to distil into, behind one interface (``WeakSubnetSearch``).

``controller``: the paper's learned policy (REINFORCE on reward = -accuracy). ``random``: uniform
subnets of width rho, the ablation. ``l1``: a deterministic weight-magnitude heuristic.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import gin
import torch

from advews.errors import AdvewsError
from advews.subnets.apply import Subnet
from advews.subnets.controller import Controller
from advews.subnets.space import PathSpace, SubnetSpace, keep_count

Score = Callable[[List[Subnet]], torch.Tensor]
BASELINES = ("reward", "advantage")


class WeakSubnetSearch:
    """Proposes the subnet to distil into and learns from subnets' accuracies.

    ``update(score)``: ``score(subnets)`` returns each subnet's accuracy in [0, 1] on the search view
    (a float tensor); the strategy draws its candidates, scores them and updates itself, returning
    metrics. ``state_dict`` holds only tensors, numbers, strings, lists and dicts, so it survives
    ``torch.save`` + ``torch.load(weights_only=True)``.
    """

    def __init__(self, space: SubnetSpace, rho: float):
        self.space = space
        self.rho = rho

    def sample(self) -> Subnet:
        raise NotImplementedError  # abstract

    def update(self, score: Score) -> Dict[str, float]:
        raise NotImplementedError  # abstract

    def begin_epoch(self, epoch: int) -> None:
        """The training loop enters ``epoch`` (the authors' AT/TRADES baseline restarts here)."""

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, d: Dict) -> None:
        pass


def _fp32():
    """The controller (on the CPU) always runs in fp32, even inside the training step's autocast."""
    return torch.autocast("cpu", enabled=False)


def _seed(seed: Optional[int]) -> int:
    """None: the global torch seed (``train.seed`` in a training run; identical on every DDP rank)."""
    return torch.initial_seed() if seed is None else seed


def _accuracies(score: Score, subnets: List[Subnet]) -> torch.Tensor:
    acc = torch.as_tensor(score(subnets)).detach().to("cpu", torch.float32).flatten()
    if acc.numel() != len(subnets):
        raise ValueError(f"score returned {acc.numel()} accuracies for {len(subnets)} subnets")
    return acc


@gin.configurable
class ControllerSearch(WeakSubnetSearch):
    """REINFORCE on an LSTM policy (``Controller``, kept on the CPU) with reward = -accuracy.

    Baseline (``baseline='reward'``): an EMA (``baseline_decay``) of the raw reward, initialised with
    the first update's mean reward; each update's advantage uses the baseline from before its own
    rewards are folded in. ``baseline='advantage'`` is the authors' (their ``update_baseline``): the
    advantage is r - b (r itself while b is exactly 0) and b follows an EMA of the advantage, which
    settles at half the reward; ``reset_baseline_each_epoch`` restarts b at 0 every epoch, as their
    AT/TRADES scripts do (their clean scripts carry it over). ``objective``: 'exact' Plackett-Luce
    log-prob and entropy, or 'authors' (their per-item terms, see ``Controller``).
    ``leave_one_out`` (needs ``num_samples`` > 1): each sample's baseline is instead the mean reward of
    the other samples of the same update (learned ~5x faster in the MNIST prototype); the EMA is still
    tracked for logging. Loss = -(advantage * log_prob).mean() - entropy_weight * entropy.mean().
    Sampling uses a dedicated generator, so the global RNG is untouched and resume is exact.
    ``seed`` None (default): ``torch.initial_seed()``, i.e. the run's ``train.seed``, so runs with
    different seeds also start from different controllers and draw different subnets.
    """

    def __init__(
        self,
        space: SubnetSpace,
        rho: float,
        num_samples: int = 1,
        lr: float = 3e-4,
        betas: Tuple[float, float] = (0.5, 0.999),
        entropy_weight: float = 0.005,
        baseline_decay: float = 0.99,
        grad_clip: float = 3.0,
        leave_one_out: bool = False,
        hidden: int = 100,
        seed: Optional[int] = None,
        objective: str = "exact",
        baseline: str = "reward",
        reset_baseline_each_epoch: bool = False,
    ):
        super().__init__(space, rho)
        seed = _seed(seed)
        if leave_one_out and num_samples < 2:
            raise AdvewsError("leave_one_out needs num_samples >= 2")
        if baseline not in BASELINES:
            raise AdvewsError(f"ControllerSearch.baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        self.baseline_kind, self.reset_baseline_each_epoch = baseline, bool(reset_baseline_each_epoch)
        self.epoch = 0
        self.num_samples = num_samples
        self.entropy_weight = entropy_weight
        self.baseline_decay = baseline_decay
        self.grad_clip = grad_clip
        self.leave_one_out = leave_one_out
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(seed)
            self.controller = Controller(space.shape(), rho, hidden, objective)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=lr, betas=tuple(betas))
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline = 0.0
        self.baseline_ready = False
        self.updates = 0

    def sample(self) -> Subnet:
        with torch.no_grad(), _fp32():
            return self.controller.sample(1, self.generator).subnets[0].canonical()

    def begin_epoch(self, epoch: int) -> None:
        if epoch != self.epoch and self.reset_baseline_each_epoch:
            self.baseline, self.baseline_ready = 0.0, False
        self.epoch = epoch

    def advantage(self, reward: torch.Tensor) -> torch.Tensor:
        """Advantages of ``reward`` (one per sample); folds their mean (or, for the authors' baseline,
        the mean advantage) into the EMA baseline."""
        if self.baseline_kind == "advantage":
            own = reward - self.baseline if self.baseline != 0 else reward
            tracked = float(own.mean())
        else:
            if not self.baseline_ready:
                self.baseline, self.baseline_ready = float(reward.mean()), True
            own, tracked = reward - self.baseline, float(reward.mean())
        adv = reward - (reward.sum() - reward) / (reward.numel() - 1) if self.leave_one_out else own
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * tracked
        return adv

    def update(self, score: Score) -> Dict[str, float]:
        with _fp32():
            samples = self.controller.sample(self.num_samples, self.generator)
        acc = _accuracies(score, [s.canonical() for s in samples.subnets])  # the model's own precision
        with _fp32():
            adv = self.advantage(-acc)
            loss = -(adv * samples.log_prob).mean() - self.entropy_weight * samples.entropy.mean()
            self.optimizer.zero_grad(set_to_none=True)
            grad_norm = torch.zeros(())
            if loss.requires_grad:  # False when rho keeps every item: the policy has nothing to choose
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.controller.parameters(), self.grad_clip)
                self.optimizer.step()
        self.updates += 1
        return {
            "subnet_acc": float(acc.mean()),
            "reward_mean": float(-acc.mean()),
            "baseline": self.baseline,
            "advantage_mean": float(adv.mean()),
            "entropy": float(samples.entropy.detach().mean()),
            "loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
        }

    def state_dict(self) -> Dict:
        return {
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
            "baseline_ready": self.baseline_ready,
            "updates": self.updates,
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, d: Dict) -> None:
        self.controller.load_state_dict(d["controller"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.baseline = float(d["baseline"])
        self.baseline_ready = bool(d["baseline_ready"])
        self.updates = int(d["updates"])
        self.generator.set_state(d["generator"])
        self.epoch = int(d.get("epoch", 0))


def random_subnet(space: SubnetSpace, rho: float, generator: Optional[torch.Generator] = None) -> Subnet:
    """A uniformly random subnet of width ``rho`` (canonical: indices sorted)."""

    def pick(n: int) -> Tuple[int, ...]:
        return tuple(sorted(torch.randperm(n, generator=generator)[: keep_count(n, rho)].tolist()))

    paths, channels = [], []
    for block in space.shape():
        kept = pick(len(block))
        paths.append(kept)
        channels.append(tuple(tuple(pick(c) for c in block[p]) for p in kept))
    return Subnet(tuple(paths), tuple(channels))


@gin.configurable
class RandomSearch(WeakSubnetSearch):
    """Uniform random subnets; ``update`` only scores ``num_samples`` of them, for logging.
    ``seed`` None: the run's seed, as for ``ControllerSearch``."""

    def __init__(self, space: SubnetSpace, rho: float, num_samples: int = 1, seed: Optional[int] = None):
        super().__init__(space, rho)
        seed = _seed(seed)
        self.num_samples = num_samples
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Subnet:
        return random_subnet(self.space, self.rho, self.generator)

    def update(self, score: Score) -> Dict[str, float]:
        acc = _accuracies(score, [self.sample() for _ in range(self.num_samples)])
        return {"subnet_acc": float(acc.mean()), "reward_mean": float(-acc.mean())}

    def state_dict(self) -> Dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, d: Dict) -> None:
        self.generator.set_state(d["generator"])


def _smallest(norms: Sequence[float], k: int) -> Tuple[int, ...]:
    order = sorted(range(len(norms)), key=lambda i: (norms[i], i))  # ties: lower index first
    return tuple(sorted(order[:k]))


def path_gain(path: PathSpace) -> float:
    """Weight-magnitude gain of a path: mean over output channels of the L1 norm of their weights.

    Taken on the last module with a weight inside the path's ``gain_module``, else its output module
    (a conv's kernel, or a BN's |gamma|). Per output channel, so paths of different kernel sizes compare. An identity
    shortcut is a 1x1 conv with the identity matrix: gain 1.
    """
    where = path.gain_module if path.gain_module is not None else path.output_module
    weighted = [m for m in where.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not weighted:
        return 1.0
    w = weighted[-1].weight.detach().abs()
    return float(w.flatten(1).sum(1).mean() if w.dim() > 1 else w.mean())


@gin.configurable
class L1Search(WeakSubnetSearch):
    """The heuristic weak subnet: keep the smallest-magnitude paths and channels.

    Per layer it keeps the ``keep_count(c, rho)`` channels whose weights in the consuming module
    (``input_norms``: every weight that reads the channel) have the smallest L1 norm; per block the
    paths with the smallest ``path_gain``. Deterministic given the weights; recomputed from the
    current weights each call.
    """

    @staticmethod
    def input_norms(module: torch.nn.Module) -> torch.Tensor:
        """L1 norm of the weights reading each input channel of ``module`` (a conv or a linear).

        Plain conv or linear: ``weight[:, i]``. Grouped conv (``groups`` g, weight of shape
        C_out x C_in/g x k...): channel i is in group i // (C_in/g), read by that group's C_out/g
        output rows only, as their column i % (C_in/g); depthwise (g = C_in) is a single kernel per
        channel. Transposed conv (weight C_in x C_out/g x k...): ``weight[i]``.
        """
        w = module.weight.detach().abs()
        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            return w.flatten(1).sum(1)
        groups = getattr(module, "groups", 1)
        return w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).sum(dim=(1, 3)).flatten()

    def sample(self) -> Subnet:
        paths, channels = [], []
        for block in self.space.blocks:
            kept = _smallest([path_gain(p) for p in block.paths], keep_count(len(block.paths), self.rho))
            paths.append(kept)
            per_path = []
            for p in kept:
                layers = []
                for l in block.paths[p].layers:
                    norms = self.input_norms(l.module)
                    if len(norms) == l.channels * l.group:  # a channel spans ``group`` columns (a head)
                        norms = norms.reshape(l.channels, l.group).sum(1)
                    if len(norms) != l.channels:
                        raise AdvewsError(f"{l.name}: its weight ranks {len(norms)} input channels, the space has "
                                          f"{l.channels}; L1Search cannot rank a {type(l.module).__name__}")
                    layers.append(_smallest(norms.tolist(), keep_count(l.channels, self.rho)))
                per_path.append(tuple(layers))
            channels.append(tuple(per_path))
        alpha = Subnet(tuple(paths), tuple(channels))
        alpha.check(self.space, self.rho)
        return alpha

    def update(self, score: Score) -> Dict[str, float]:
        acc = _accuracies(score, [self.sample()])
        return {"subnet_acc": float(acc.mean()), "reward_mean": float(-acc.mean())}


SEARCHES: Dict[str, Type[WeakSubnetSearch]] = {
    "controller": ControllerSearch,
    "random": RandomSearch,
    "l1": L1Search,
}


def build_search(strategy: str, space: SubnetSpace, rho: float, **kwargs) -> WeakSubnetSearch:
    """The search named ``strategy``; its other options come from ``kwargs`` or gin."""
    if strategy not in SEARCHES:
        raise AdvewsError(f"unknown subnet search {strategy!r}; choose one of {', '.join(SEARCHES)}")
    return SEARCHES[strategy](space, rho, **kwargs)
