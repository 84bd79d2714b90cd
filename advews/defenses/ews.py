"""Enhancing Weak Subnets (EWS, Guo et al., ECCV 2022) as a mixin on any defense.

Each iteration the full net's loss gets ``lam * sum_v w_v * KL(p_full(v).detach() || p_subnet(v))``
over the defense's views v (KL summed over classes, averaged over the batch), where the subnet is
drawn from a weak-subnet search; every ``interval`` iterations the search is updated on the
defense's search view (clean accuracy for clean defenses, robust accuracy on the adversarial batch
for adversarial ones). The registry derives ``X_EWS = (EWSMixin, X)`` for every registered defense.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import gin
import torch
from torch import nn
import torch.nn.functional as F

from advews import collectives
from advews.defenses.base import Backward, Batch, DefenseOutput
from advews.defenses.params import require_number
from advews.defenses.registry import register_deriver
from advews.errors import AdvewsError, require_bool
from advews.subnets import Subnet, build_search, set_bn_mode, space_of, subnet

BN_MODES = ("eval", "train")


def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student): summed over classes, averaged over the batch (not batch*classes)."""
    return F.kl_div(  # fp32 even under autocast: softmax of bf16 logits stays bf16 on the CPU
        F.log_softmax(student_logits.float(), dim=1), F.log_softmax(teacher_logits.float(), dim=1),
        reduction="sum", log_target=True,
    ) / teacher_logits.shape[0]


@gin.configurable("EWS", module="advews")
class EWSMixin:
    """Mix in before a defense: ``class TRADES_EWS(EWSMixin, TRADES)``.

    Defaults follow the paper: clean/corruption defenses lam 1, rho 0.7, entropy 0.005; adversarial
    defenses lam 0.1, rho 0.9, entropy 0.01 (the authors' AT/TRADES code); K = ``interval`` = 10.
    ``search_bn``: BN mode in which candidate subnets are scored for the search reward; ``eval``
    (running statistics, as a deployed net runs) finds far weaker subnets than ``train`` (the
    authors' code scores in train mode during AT; see the README's differences table).
    ``subnet_dropout``: whether dropout stays active in the distillation's subnet forward; off by
    default, as the authors' switch_to_subnet sets p = 0. ``search_at_awp_weights``: with AWP, score
    the search's subnets at the perturbed weights (where the training loss runs) instead of before
    AWP perturbs (default, the order of both authors' EWS scripts); without AWP the two coincide.
    ``interval_each_epoch``: count the ``interval`` from each epoch's first step, as the authors'
    scripts do (``step % K`` with ``step`` the index within the epoch; default), or over the whole
    run (False). The two differ only around epoch boundaries.
    """

    def __init__(
        self,
        *args,
        lam: Optional[float] = None,
        rho: Optional[float] = None,
        interval: int = 10,
        search: str = "controller",
        num_samples: int = 1,
        controller_lr: float = 3e-4,
        entropy_weight: Optional[float] = None,
        search_bn: str = "eval",
        subnet_dropout: bool = False,
        search_at_awp_weights: bool = False,
        interval_each_epoch: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        adversarial = self.adversarial
        self.lam = (0.1 if adversarial else 1.0) if lam is None else lam
        self.rho = (0.9 if adversarial else 0.7) if rho is None else rho
        self.entropy_weight = (0.01 if adversarial else 0.005) if entropy_weight is None else entropy_weight
        require_number("EWS.lam", self.lam, ">= 0")
        require_number("EWS.rho", self.rho, "in (0, 1]")
        require_number("EWS.interval", interval, ">= 1", integer=True)
        require_number("EWS.num_samples", num_samples, ">= 1", integer=True)
        require_number("EWS.controller_lr", controller_lr, "> 0")
        require_number("EWS.entropy_weight", self.entropy_weight, ">= 0")
        if self.lam < 0:
            raise AdvewsError(f"EWS.lam must be >= 0, got {self.lam}")
        if not 0 < self.rho <= 1:
            raise AdvewsError(f"EWS.rho must be in (0, 1], got {self.rho}")
        if interval < 1:
            raise AdvewsError(f"EWS.interval must be >= 1, got {interval}")
        if num_samples < 1:
            raise AdvewsError(f"EWS.num_samples must be >= 1, got {num_samples}")
        if controller_lr <= 0:
            raise AdvewsError(f"EWS.controller_lr must be > 0, got {controller_lr}")
        if self.entropy_weight < 0:
            raise AdvewsError(f"EWS.entropy_weight must be >= 0, got {self.entropy_weight}")
        if not isinstance(search, str):
            raise AdvewsError(f"EWS.search must be the name of a search (e.g. 'controller'), got {search!r}")
        require_bool("EWS.subnet_dropout", subnet_dropout)
        require_bool("EWS.search_at_awp_weights", search_at_awp_weights)
        if search_bn not in BN_MODES:
            raise AdvewsError(f"EWS.search_bn must be one of {', '.join(BN_MODES)}, got {search_bn!r}")
        self.interval, self.search_name, self.num_samples = interval, search, num_samples
        self.controller_lr, self.search_bn = controller_lr, search_bn
        self.subnet_dropout, self.search_at_awp_weights = subnet_dropout, search_at_awp_weights
        require_bool("EWS.interval_each_epoch", interval_each_epoch)
        self.interval_each_epoch = interval_each_epoch
        self.iteration = 0
        self.epoch_step, self._search_epoch = 0, None  # steps into the epoch the search last saw
        self._search_metrics: Optional[dict] = None  # this iteration's search update, once it ran
        self.space = None
        self.search = None

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.space = space_of(model)
        options = {"num_samples": self.num_samples} if self.search_name in ("controller", "random") else {}
        if self.search_name == "controller":
            options.update(lr=self.controller_lr, entropy_weight=self.entropy_weight)
        self.search = build_search(self.search_name, self.space, self.rho, **options)

    def set_progress(self, epoch: int, eps_scale: float) -> None:
        super().set_progress(epoch, eps_scale)
        if epoch != self._search_epoch:
            if self._search_epoch is not None:
                self.epoch_step = 0
            self._search_epoch = epoch
        if self.search is not None:
            self.search.begin_epoch(epoch)

    def score_subnets(self, model: nn.Module, subnets: List[Subnet], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accuracy of each subnet on the rows of (x, y) with a label >= 0 (all of x is forwarded), BN
        in ``search_bn`` mode; no gradients, no state change."""
        modes = [(m, m.training) for m in model.modules()]
        set_bn_mode(model, self.search_bn)
        scored = None if bool((y >= 0).all()) else y >= 0
        try:
            with torch.no_grad():
                accs = []
                for alpha in subnets:
                    with subnet(model, alpha, self.space):
                        correct = (model(x).argmax(1) == y).float()
                        accs.append((correct if scored is None else correct[scored]).mean())
                # Under DDP every rank scores the same subnets on its shard: the reward is the mean
                # over ranks, so every rank's controller takes the same update and stays identical.
                return collectives.all_reduce_mean(torch.stack(accs))
        finally:
            for m, training in modes:
                m.training = training

    def _update_search(self, model: nn.Module, batch: Batch) -> None:
        """Every ``interval`` iterations, one search update scored on the defense's search view."""
        if self.search is None:
            raise RuntimeError(f"{self.name}.setup(model) must be called before training")
        self._search_metrics = {}
        if (self.epoch_step if self.interval_each_epoch else self.iteration) % self.interval == 0:
            x, y = self.search_view(batch)
            x = x.detach()
            stats = self.search.update(lambda subnets: self.score_subnets(model, subnets, x, y))
            self._search_metrics = {f"search_{k}": torch.tensor(float(v)) for k, v in stats.items()}

    def begin_step(self, model: nn.Module, batch: Batch) -> None:
        if self.search_at_awp_weights:
            super().begin_step(model, batch)
            self._update_search(model, batch)
        else:
            self._update_search(model, batch)
            super().begin_step(model, batch)

    def training_loss(self, model: nn.Module, batch: Batch, backward: Optional[Backward] = None) -> DefenseOutput:
        """The defense's loss plus ``lam`` times the subnets' KL. With the loop's ``backward``, each
        part is backpropagated as soon as its forward ran: the defense's loss before the subnet
        forwards, then each view's KL (the teacher logits are detached, so the gradients are those
        of the sum); all but the last inside ``backward.local()``, so DDP all-reduces once. The peak
        memory then holds the largest single graph, not all of them."""
        if self._search_metrics is None:  # called without begin_step (e.g. from user code)
            self._update_search(model, batch)
        staged = backward is not None and self.lam > 0
        with backward.local() if staged else contextlib.nullcontext():
            out = super().training_loss(model, batch, backward)
            if staged and not out.backpropagated:
                backward(out.loss)
        metrics, self._search_metrics = self._search_metrics, None
        self.iteration += 1
        self.epoch_step += 1
        if self.lam > 0:
            alpha = self.search.sample()
            kl = out.loss.new_zeros(())
            with subnet(model, alpha, self.space, dropout=self.subnet_dropout):
                for v, view in enumerate(out.views):
                    last = v == len(out.views) - 1
                    with backward.local() if staged and not last else contextlib.nullcontext():
                        student = model(view.x)
                        term = view.weight * distillation_kl(view.logits.detach(), student)
                        if staged:
                            backward(self.lam * term)
                    kl = kl + (term.detach() if staged else term)
                    if view.x is out.search_x:
                        metrics["ews_subnet_acc"] = (student.detach().argmax(1) == out.search_y).float().mean()
            if staged:
                out.loss, out.backpropagated = out.loss.detach() + self.lam * kl, True
            else:
                out.loss = out.loss + self.lam * kl
            metrics["ews_kl"] = kl.detach()
        out.metrics = {**out.metrics, **metrics}
        return out

    def state_dict(self) -> dict:
        return {"base": super().state_dict(), "iteration": self.iteration, "search": self.search.state_dict(),
                "epoch_step": self.epoch_step, "search_epoch": self._search_epoch}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state["base"])
        self.iteration = state["iteration"]
        self.epoch_step = state.get("epoch_step", self.iteration)
        self._search_epoch = state.get("search_epoch")
        self.search.load_state_dict(state["search"])


def _derive_ews(cls: type) -> Optional[type]:
    if issubclass(cls, EWSMixin):
        return None
    return type(f"{cls.__name__}_EWS", (EWSMixin, cls), {"__doc__": f"{cls.__name__} with EWS.", "__module__": cls.__module__})


register_deriver(_derive_ews)
