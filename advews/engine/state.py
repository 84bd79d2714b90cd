"""What a checkpoint holds and how the trainer saves and restores it (a mixin of ``Trainer``).

``last.pt`` holds the position (completed epochs, and ``step`` batches into the next one), every
RNG state per rank, the model, optimizer, scheduler, scaler and defense state (EWS controller),
the divergence guard's count, the partial train-metric sums of an unfinished epoch, the metrics
history and the config, the EMA of the weights (``ema``, None without one) and which weights
evaluation and export take by default (``weights``: 'ema' or 'live'), so a resume from any checkpoint is bit-exact and rewrites metrics.jsonl.
It also holds the training data's fingerprint (``engine.data_identity``): a resume on changed data is refused,
and the compute ledger's totals (``ledger``, ``engine.ledger``), which continue across the resume.

A write that fails for a full disk (``DiskFullError``, exit 4) names what is still on disk (``_kept``);
one during a preemption save still ends the run as preempted (exit 143) and says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import gin
import torch

from advews.engine import distributed
from advews.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from advews.engine.data_identity import check_same_data
from advews.engine.model_check import check_rng_states
from advews.engine.preemption import Preempted
from advews.engine.resume import show_value
from advews.engine.rundir import BEST, LAST, read_metrics, write_metrics
from advews.errors import AdvewsError, DiskFullError
from advews.models.timm_arch import is_timm, version_note

FORMAT = 2
RESUME_KEYS = ("epoch", "model", "defense", "defense_state", "optimizer", "scheduler", "rng", "best")
BEST_KEYS = ("format", "epoch", "model", "ema", "weights", "model_spec", "data_spec", "defense", "threat_model",
             "config", "data_fingerprint")


class CheckpointState:
    """Save/restore for ``Trainer``; uses its model, optimizer, scheduler, precision, defense, guard."""

    def _state(self, epochs_done: int, rng: list, step: int = 0, partial: Optional[dict] = None) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "epoch": epochs_done,
            "step": step,
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "weights": self.weights,
            "model_spec": self.spec,
            "data_spec": {"dataset": self.data.name, **gin.get_bindings("data")},
            "defense": self.defense_name,
            "threat_model": None if self.val_attack is None
            else {"eps": self.val_attack.eps, "norm": self.val_attack.norm},
            "defense_state": self.defense.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "rng": rng,
            "partial": partial,
            "best": self.best,
            "history": list(self.history),
            "guard": self.guard.state_dict(),
            "overrides": list(self.overrides),
            "config": gin.config_str(),
            "data_fingerprint": self.data_fingerprint,
            "ledger": self.ledger.state_dict(),
        }

    def _kept(self) -> str:
        """What is on disk when a write fails, and what to do, for the one-line DiskFullError."""
        last, best = getattr(self, "_last_on_disk", None), getattr(self, "_best_on_disk", None)
        if last is None:
            kept = "no checkpoint was written yet"
        else:
            kept = f"last.pt ({last})" + (f" and best.pt (epoch {best}) are kept" if best else " is kept")
        return kept + "; free some space, then run the same command with --resume"

    @contextlib.contextmanager
    def _preemption_save(self, where: str, if_signalled: bool = False) -> Iterator[None]:
        """A preemption save that fails for a full disk still ends the run as preempted (exit 143,
        what a scheduler expects after its SIGTERM), with a line saying the save failed and what
        survives; ``if_signalled``: only if a signal came (asked of every rank, like the loop does)."""
        try:
            yield
        except DiskFullError as e:
            if if_signalled and not self.signals.requested(self.device):
                raise
            raise Preempted(f"preempted by {self.signals.received or 'a signal'} at {where}, but the save "
                            f"failed: {e}") from None

    def _describe_saved(self, epochs_done: int, step: int) -> None:
        """What the guard's message says survives a divergence."""
        where = f"epoch {epochs_done + 1}, step {step}" if step else f"the end of epoch {epochs_done}"
        best = f", best.pt from epoch {self.best['epoch']}" if self.best else ""
        self.guard.last_good = f"last.pt is from {where}{best}"

    def _save_partial(self, epoch: int, done: int, lr: float, sums: Dict[str, torch.Tensor],
                      counts: Dict[str, int]) -> str:
        """A mid-epoch ``last.pt`` after ``done`` batches of ``epoch``; returns its path."""
        self.guard.check_model(self.model, f"epoch {epoch + 1}, step {done}")
        ranks = distributed.all_gather_object(
            {"rng": rng_state(), "sums": {k: v.cpu() for k, v in sums.items()}, "counts": dict(counts)})
        partial = {"lr": lr, "sums": [r["sums"] for r in ranks], "counts": [r["counts"] for r in ranks]}
        state = self._state(epoch, [r["rng"] for r in ranks], step=done, partial=partial)
        path = os.path.join(self.output_dir, LAST)

        def write() -> None:
            save_checkpoint(state, path, kept=self._kept())
            self._last_on_disk = f"epoch {epoch + 1}, step {done}"

        distributed.on_main(write)
        self._describe_saved(epoch, done)
        return path

    def _end_epoch(self, epochs_done: int, row: Dict[str, float], is_collapsed: bool) -> None:
        """Rank 0 writes best.pt (when improved), last.pt, then metrics.jsonl from the history."""
        where = f"the end of epoch {epochs_done}"
        self.guard.check_row(row, where)
        self.guard.check_model(self.model, where)
        rng = distributed.all_gather_object(rng_state())
        score = self._selection_metric(row)
        if is_collapsed and not self.quiet:
            print(f"warning: epoch {epochs_done}: every validation prediction is the same class; "
                  "this model is not eligible for best.pt", file=sys.stderr, flush=True)
        improved = not is_collapsed and score is not None and (self.best is None or score > self.best["score"])
        if improved:
            self.best = {"epoch": epochs_done, "score": score}
        self.history.append(row)
        state = self._state(epochs_done, rng)

        def write() -> None:
            if improved:
                best = {k: state[k] for k in BEST_KEYS}
                save_checkpoint(best, os.path.join(self.output_dir, BEST), kept=self._kept())
                self._best_on_disk = epochs_done
            save_checkpoint(state, os.path.join(self.output_dir, LAST), kept=self._kept())
            self._last_on_disk = where
            write_metrics(self.output_dir, self.history, kept=self._kept())

        distributed.on_main(write)
        self._describe_saved(epochs_done, 0)

    def _load(self, path: str, overrides: Sequence[Tuple[str, Any, Any]] = ()) -> None:
        state = load_checkpoint(path, map_location=self.device)
        missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise AdvewsError(f"cannot resume {path}: not an advews training checkpoint (no {', '.join(missing)})")
        if state.get("defense") != self.defense_name:
            raise AdvewsError(
                f"cannot resume {path}: it was trained with defense {state.get('defense')!r}, "
                f"the config says {self.defense_name!r}"
            )
        check_same_data(state.get("data_fingerprint"), self.data_fingerprint, self.data.name, path)
        saved_spec = state.get("model_spec") if isinstance(state.get("model_spec"), dict) else {}
        drift = version_note(saved_spec.get("timm_version")) if is_timm(self.spec["arch"]) else ""
        if drift:
            raise AdvewsError(f"cannot resume {path}: {drift}; a run resumes on the code it started with")
        check_rng_states(path, state["rng"])
        if len(state["rng"]) != self.dist.world:
            raise AdvewsError(f"cannot resume {path}: it was trained on {len(state['rng'])} ranks, this run has {self.dist.world}")
        step = state.get("step", 0)
        if step > self.steps_per_epoch:
            raise AdvewsError(f"cannot resume {path}: it stopped after batch {step} of an epoch, but this "
                              f"config has {self.steps_per_epoch} batches per epoch")
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        fresh_base = list(self.scheduler.base_lrs)
        part = "model"
        try:
            self.model.load_state_dict(state["model"])
            part = "optimizer"
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.precision.load_state_dict(state.get("precision", {}))
            part = "defense"
            self.defense.load_state_dict(state["defense_state"])
            part = "ema"
            self._load_ema(state.get("ema"))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdvewsError(f"cannot resume {path}: its {part} state does not fit the configured {part} "
                              f"({first})") from None
        set_rng_state(state["rng"][self.dist.rank])
        self.start_epoch, self.start_step, self.best = state["epoch"], step, state["best"]
        partial = state.get("partial")
        if partial:
            r = self.dist.rank
            self.partial = {"lr": partial["lr"], "counts": dict(partial["counts"][r]),
                            "sums": {k: v.to(self.device) for k, v in partial["sums"][r].items()}}
        self.guard.load_state_dict(state.get("guard", {}))
        self.ledger.load_state_dict(state.get("ledger"))
        self.history = list(state["history"]) if "history" in state else read_metrics(self.output_dir, self.start_epoch)
        self.overrides = list(state.get("overrides", []))
        if overrides:
            self._apply_overrides(fresh, fresh_base, overrides)
        self._last_on_disk = f"epoch {self.start_epoch + 1}, step {step}" if step \
            else f"the end of epoch {self.start_epoch}"
        has_best = self.best and os.path.exists(os.path.join(self.output_dir, BEST))
        self._best_on_disk = self.best["epoch"] if has_best else None
        distributed.on_main(lambda: write_metrics(self.output_dir, self.history, kept=self._kept()))
        self._describe_saved(self.start_epoch, self.start_step)

    def _load_ema(self, ema: Optional[Dict[str, torch.Tensor]]) -> None:
        """The saved EMA; a run that had none (EMA switched on with --override) starts it here."""
        if self.ema is None:
            return
        if ema is None:
            self.ema.reset(self.model)
            if not self.quiet:
                print("the checkpoint has no EMA of the weights: it starts from the resumed weights", flush=True)
        else:
            self.ema.load_state_dict(ema)

    def _apply_overrides(self, fresh: List[dict], fresh_base: List[float],
                         overrides: Sequence[Tuple[str, Any, Any]]) -> None:
        """Re-set the optimizer's and schedule's hyper-parameters from the new config (the loaded
        state carries the old ones) and record the changes in the run's history of overrides."""
        last = self.scheduler.last_epoch
        for group, new, base, factor in zip(self.optimizer.param_groups, fresh, fresh_base, self.scheduler.lr_lambdas):
            group.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
            group["initial_lr"] = base
            group["lr"] = base * factor(last)
        self.scheduler.base_lrs = fresh_base
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.overrides.append({"epoch": self.start_epoch, "step": self.start_step,
                               "changes": {k: [show_value(a), show_value(b)] for k, a, b in overrides}})
