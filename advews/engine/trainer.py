"""The one training loop. Every defense (and every mixin on it) trains through ``Trainer.run``.

Runs survive preemption and crashes: SIGTERM or SIGUSR1 saves a resumable ``last.pt`` at the next
step boundary and ends the run with ``Preempted`` (the CLI exits ``PREEMPTED_EXIT`` = 143);
``train.checkpoint_every_steps`` also saves mid-epoch; a resume from any checkpoint continues
bit-exactly. A non-finite loss, gradient or weight ends the run with ``DivergenceError`` (exit 3)
before anything non-finite is saved (``train.nonfinite = 'skip'`` drops such steps instead). A full
disk ends it with ``DiskFullError`` (exit 4) naming what is kept. The run directory is locked
(``rundir.take_output_dir``) from before the first thing written in it until the run ends.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gin
import numpy as np
import torch
from tqdm import tqdm

from advews.attacks import PGD
from advews.data import load_data
from advews.defenses import build_defense
from advews.engine import distributed
from advews.engine.backward import StepBackward
from advews.engine.data_identity import data_fingerprint
from advews.engine.devices import resolve_device
from advews.engine.ema import EMA, ema_warmup
from advews.engine.guard import NonFiniteGuard, collapsed
from advews.engine.ledger import Ledger, first_batch, untouched_rng
from advews.engine.optim import make_optimizer, make_scheduler
from advews.engine.params import require_bool, require_int, require_str
from advews.engine.precision import Precision
from advews.engine.preemption import Preempted, PreemptionSignals
from advews.engine.rundir import holds_checkpoint, take_output_dir, write_config
from advews.engine.settings import check_settings
from advews.engine.state import CheckpointState
from advews.engine.tensorboard import TensorBoardLog
from advews.engine.validation import check_val_loss, validation_counts
from advews.errors import AdvewsError
from advews.models import build_model, model_spec
from advews.subnets import install_masks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@gin.configurable("train", denylist=["output_dir", "resume", "quiet", "overrides"])
class Trainer(CheckpointState):
    """Builds data, model, defense, optimizer and schedule from gin, then trains epoch by epoch.

    Each epoch: train on shuffled, augmented batches (drop_last; the order comes from a generator
    seeded by seed and epoch, so a resume can replay it), validate (clean and PGD robust accuracy on
    the held-out split, with a fixed seed so validation never moves the training RNG), save
    ``last.pt`` (everything a resume needs, metrics history included) and ``best.pt``, rewrite
    ``metrics.jsonl``. A model whose clean validation predictions are all one class is never best.

    Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DDP; ``batch_size`` stays the GLOBAL
    batch: every rank draws the same shuffled global batch and takes its ``batch_size / world``
    slice, which is what DistributedSampler does with per-epoch shuffling, and validation is split
    across ranks and summed. Only rank 0 writes the run directory.
    ``amp`` ('none', 'bf16', 'fp16'), ``channels_last`` and ``compile`` make each device fast.
    ``grad_clip``: clip the model's global gradient norm before each step (None: no clipping, as
    robust_overfitting, TRADES and AWP do; the EWS authors' train_cifar clips at 3).
    ``nonfinite``: 'stop' (a non-finite loss or gradient norm ends the run) or 'skip' (drop the step,
    at most ``max_skipped_steps`` times in the run). ``checkpoint_every_steps``: also save ``last.pt``
    every N optimizer steps (None: at the end of each epoch only; a preemption signal always saves).
    ``tensorboard``: mirror metrics.jsonl into ``RUN_DIR/tensorboard``, plus each ``log_every``-th
    step's training metrics (``engine.tensorboard``; needs the ``advews[tensorboard]`` extra).
    ``ema_decay``: keep an EMA of the weights (``engine.ema``; None: off; DM-AT uses 0.995), updated
    after every step with the decay 0 for the first ``ema_warmup_steps`` steps, then ramped as
    ``min(ema_decay, (1 + d) / (10 + d))`` unless ``ema_dynamic_decay`` is False (DM-AT's warm-up is
    2.5% of the run: ``ema_warmup_fraction = 0.025`` instead of ``ema_warmup_steps``). Validation
    then also reports the EMA (``val_ema_*``); ``select_on`` ('ema' or
    'live') says which weights pick ``best.pt`` and which ``advews-eval``/``advews-export`` take by
    default ('ema' means the live weights when there is no EMA). EWS distils from the live model.
    ``val_loss``: what the validation PGD maximises (``engine.validation.VAL_LOSSES``): 'ce'
    (robust_overfitting, TRADES, AWP, EWS) or DM-Improves-AT's 'cw_hinge' (its PGD-40 selection).
    ``resume`` with no ``last.pt`` in ``output_dir`` starts from scratch; ``overrides`` are the
    changed settings (``engine.resume.check_changes``) to apply on top of the checkpoint.
    """

    def __init__(
        self,
        output_dir: str,
        resume: bool = False,
        quiet: bool = False,
        overrides: Sequence[Tuple[str, Any, Any]] = (),
        defense: str = "AT",
        epochs: int = 10,
        batch_size: int = 128,
        seed: int = 0,
        device: str = "auto",
        eps_warmup_epochs: float = 0.0,
        val_eps: Optional[float] = None,
        val_steps: int = 10,
        val_step_size: Optional[float] = None,
        eval_batch_size: int = 256,
        amp: str = "none",
        channels_last: bool = False,
        compile: bool = False,
        sync_batchnorm: bool = False,
        grad_clip: Optional[float] = None,
        nonfinite: str = "stop",
        max_skipped_steps: int = 10,
        checkpoint_every_steps: Optional[int] = None,
        tensorboard: bool = False,
        log_every: int = 50,
        ema_decay: Optional[float] = None,
        ema_warmup_steps: int = 0,
        ema_dynamic_decay: bool = True,
        select_on: str = "ema",
        ema_warmup_fraction: Optional[float] = None,
        val_loss: str = "ce",
    ):
        check_settings(epochs, batch_size, seed, eps_warmup_epochs, val_eps, val_steps, val_step_size,
                       eval_batch_size, channels_last, compile, sync_batchnorm, grad_clip, max_skipped_steps,
                       checkpoint_every_steps, ema_decay, ema_warmup_steps, ema_dynamic_decay, select_on)
        require_str("train.defense", defense)
        ema_warmup(ema_warmup_steps, ema_warmup_fraction, 1)
        check_val_loss(val_loss)
        self.guard = NonFiniteGuard(nonfinite, max_skipped_steps)
        self.grad_clip, self.checkpoint_every_steps = grad_clip, checkpoint_every_steps
        self.dist, self.device = distributed.init(resolve_device(device))
        if batch_size % self.dist.world:
            raise AdvewsError(f"train.batch_size {batch_size} must be divisible by the {self.dist.world} ranks")
        self.output_dir, self.quiet = output_dir, quiet or not self.dist.main
        continuing = resume and holds_checkpoint(output_dir)
        self.run_lock = distributed.on_main(lambda: take_output_dir(output_dir, resume, continuing))
        if self.run_lock is not None:  # rank 0: released when the run ends, or if this object is dropped unrun
            weakref.finalize(self, self.run_lock.release)
        if resume and not continuing and self.dist.main:
            print(f"no last.pt in {output_dir}: starting the run from scratch", flush=True)
        try:
            require_bool("train.tensorboard", tensorboard)
            require_int("train.log_every", log_every, minimum=1)
            self.tensorboard = TensorBoardLog(output_dir, log_every, tensorboard and self.dist.main)
            self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
            self.eps_warmup_epochs, self.eval_batch_size = eps_warmup_epochs, eval_batch_size
            self.precision = Precision(amp, self.device, channels_last)
            seed_everything(seed)

            self.data = load_data(rank=self.dist.rank, world=self.dist.world)  # each rank reads only its extra rows
            self.data_fingerprint = data_fingerprint(self.data)
            self.spec = dict(
                model_spec(),
                num_classes=self.data.num_classes,
                in_channels=self.data.in_channels,
                mean=list(self.data.mean),
                std=list(self.data.std),
            )
            self.model = build_model(self.spec).to(self.device)
            if sync_batchnorm and self.dist.enabled:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            self.defense_name = defense
            self.defense = build_defense(defense)
            self.defense.setup(self.model)
            self.attack_model, self.train_model = self._wrap(compile)
            self.ema = None if ema_decay is None else EMA(self.model, ema_decay, ema_warmup_steps, ema_dynamic_decay)
            self.weights = "ema" if self.ema is not None and select_on == "ema" else "live"
            self.optimizer = make_optimizer(self.model)
            self.steps_per_epoch = self.data.train.num_batches(batch_size, drop_last=True)
            if self.steps_per_epoch < 1:
                raise AdvewsError(f"train.batch_size {batch_size} is larger than the training set "
                                  f"({len(self.data.train)})")
            self.scheduler = make_scheduler(self.optimizer, self.steps_per_epoch, epochs)
            if self.ema is not None:
                self.ema.warmup_steps = ema_warmup(ema_warmup_steps, ema_warmup_fraction, self.steps_per_epoch * epochs)
            self.val_attack = self._validation_attack(val_eps, val_steps, val_step_size, val_loss)
            self.start_epoch, self.start_step, self.partial, self.best = 0, 0, None, None
            self.history: List[Dict[str, float]] = []
            self.overrides: List[Dict[str, Any]] = []
            self.signals = PreemptionSignals()
            self.ledger = Ledger(self.dist.world)  # the compute ledger (engine.ledger), saved with the state
            if continuing:
                self._load(os.path.join(output_dir, "last.pt"), overrides)
        except BaseException:  # a run that cannot start leaves the directory as it found it
            if self.run_lock is not None:
                self.run_lock.release(failed=True)
            raise

    def _wrap(self, compile: bool):
        """(model for attacks, model for the training forward): DDP and/or torch.compile around it;
        sets ``backward``, the ``Backward`` defenses get (DDP's ``no_sync`` is its ``local``)."""
        train_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.backward = StepBackward(self.precision, train_model if self.dist.enabled else None)
        if not compile:
            return self.model, train_model
        # Subnet masks must be buffers, not per-context hooks, or the compiled graph keeps stale masks.
        install_masks(self.model)
        attack_model = torch.compile(self.model)
        return attack_model, (attack_model if train_model is self.model else torch.compile(train_model))

    def _validation_attack(self, eps: Optional[float], steps: int, step_size: Optional[float],
                           loss: str = "ce") -> Optional[PGD]:
        attack = getattr(self.defense, "attack", None)
        if eps is None:
            if attack is None:
                return None
            eps = attack.eps
        norm = getattr(attack, "norm", "Linf")
        return PGD(eps=eps, norm=norm, steps=steps, step_size=step_size or 2.5 * eps / steps, loss=loss)

    # ----------------------------------------------------------------- loop
    def _eps_scale(self, step: int) -> float:
        ramp = self.eps_warmup_epochs * self.steps_per_epoch
        return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)

    def _shard(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's slice of the global batch (all of it in a single process)."""
        if not self.dist.enabled:
            return x, y
        n = x.shape[0] // self.dist.world
        r = self.dist.rank
        return x[r * n:(r + 1) * n], y[r * n:(r + 1) * n]

    def _train_step(self, epoch: int, i: int, x: torch.Tensor, y: torch.Tensor,
                    sums: Dict[str, torch.Tensor], counts: Dict[str, int]) -> Tuple[torch.Tensor, Optional[Dict]]:
        """One optimizer step (unless the guard skips it); accumulates the step's metrics; returns the
        loss and the step's metrics (None for a skipped step)."""
        x, y = self._shard(self.precision.input(x), y)
        self.defense.set_progress(epoch, self._eps_scale(epoch * self.steps_per_epoch + i))
        with self.precision.autocast():
            batch = self.defense.prepare(self.attack_model, x, y)
            self.defense.begin_step(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            out = self.defense.training_loss(self.train_model, batch, self.backward)
        if not out.backpropagated:
            self.backward(out.loss)
        grad_norm = self.precision.grad_norm(self.optimizer)
        applied = self.guard.step_ok(out.loss, grad_norm, f"epoch {epoch + 1}, step {i + 1}")
        if applied:
            self.precision.step(self.optimizer, self.grad_clip, grad_norm)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.defense.end_step(self.model)
        if self.ema is not None:
            self.ema.update(self.model, epoch * self.steps_per_epoch + i + 1)
        self.scheduler.step()
        loss, step_metrics = out.loss.detach().float(), None
        if applied:  # a skipped step's non-finite numbers never reach the metrics
            step_metrics = {
                "loss": loss,
                "acc": (out.logits.detach().argmax(1) == batch.y).float().mean(),
                **{k: v.detach().float() for k, v in out.metrics.items()},
            }
            for k, v in step_metrics.items():  # some metrics (e.g. a search update) come every K steps
                sums[k] = sums[k] + v if k in sums else v.clone()
                counts[k] = counts.get(k, 0) + 1
        return loss, step_metrics

    def train_epoch(self, epoch: int, first: int = 0, partial: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
        """Train ``epoch`` from batch ``first`` on (a mid-epoch resume replays the first batches'
        draws from the epoch's generator without training on them, and restores ``partial`` sums)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = iter(self.data.train.batches(
            self.batch_size, shuffle=True, drop_last=True, generator=gen,
            augment=self.data.train_augment, device=self.device,
        ))
        for _ in range(first):
            next(batches)
        sums: Dict[str, torch.Tensor] = dict(partial["sums"]) if partial else {}
        counts: Dict[str, int] = dict(partial["counts"]) if partial else {}
        lr = partial["lr"] if partial else self.optimizer.param_groups[0]["lr"]
        bar = tqdm(batches, total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{self.epochs}",
                   disable=self.quiet or not sys.stderr.isatty(), leave=False)
        self.model.train()
        for i, (x, y) in enumerate(bar, start=first):
            loss, step_metrics = self._train_step(epoch, i, x, y, sums, counts)
            self.tensorboard.step(epoch * self.steps_per_epoch + i + 1, step_metrics)
            if not bar.disable and i % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
            done = i + 1
            if self.signals.requested(self.device):
                bar.close()
                with self._preemption_save(f"epoch {epoch + 1}, step {done}"):
                    path = self._save_partial(epoch, done, lr, sums, counts)
                raise Preempted(f"preempted by {self.signals.received or 'a signal'}: saved {path} at epoch "
                                f"{epoch + 1}, step {done} of {self.steps_per_epoch}; run again with --resume")
            every = self.checkpoint_every_steps
            if every and done < self.steps_per_epoch and (epoch * self.steps_per_epoch + done) % every == 0:
                self._save_partial(epoch, done, lr, sums, counts)
        bar.close()
        keys = sorted(sums)
        means = distributed.all_reduce_mean(torch.stack([sums[k].to(self.device) / counts[k] for k in keys])) \
            if keys else torch.zeros(0)
        return {"lr": lr, **{f"train_{k}": float(v) for k, v in zip(keys, means)}}

    def _validate(self) -> Tuple[Dict[str, float], bool]:
        """(clean and PGD accuracy of the live model and of the EMA on the validation split, whether
        the selected weights' predictions collapsed to one class); under DDP each rank takes every
        world-th example, and the EMA's BN statistics are rank 0's (the ones its checkpoint saves)."""
        if self.data.val is None:
            return {}, False
        val = self.data.val
        if self.dist.enabled:
            val = val.subset(torch.arange(self.dist.rank, len(val), self.dist.world))
        out, collapses = self._validate_model(self.attack_model, val, "val_")
        if self.ema is not None:
            distributed.broadcast_buffers(self.ema.model)
            ema_out, ema_collapses = self._validate_model(self.ema.model, val, "val_ema_")
            out.update(ema_out)
            if self.weights == "ema":
                collapses = ema_collapses
        return out, collapses

    def _validate_model(self, model: torch.nn.Module, val, prefix: str) -> Tuple[Dict[str, float], bool]:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            with self.precision.autocast():
                counts = validation_counts(model, val, self.val_attack, self.data.num_classes,
                                           self.eval_batch_size, self.device, self.quiet)
        counts = distributed.all_reduce_sum(counts).cpu()
        clean, robust, n = counts[:3].tolist()
        k = self.data.num_classes
        out = {f"{prefix}clean_acc": round(clean) / max(n, 1)}
        if self.val_attack is not None:
            out[f"{prefix}robust_acc"] = round(robust) / max(n, 1)
        return out, collapsed(counts[3:3 + k], counts[3 + k:])

    def validate(self) -> Dict[str, float]:
        """Clean and PGD accuracy on the validation split (and of the EMA, ``val_ema_*``)."""
        return self._validate()[0]

    def _selection_metric(self, row: Dict[str, float]) -> Optional[float]:
        """Robust (adversarial defenses) else clean validation accuracy of the ``select_on`` weights."""
        prefix = "val_ema_" if self.weights == "ema" else "val_"
        key = f"{prefix}robust_acc" if self.defense.adversarial and f"{prefix}robust_acc" in row else f"{prefix}clean_acc"
        return row.get(key)

    def _write_config(self) -> None:
        write_config(self.output_dir, gin.operative_config_str(), kept=self._kept())

    def run(self) -> Dict[str, float]:
        """Train from the checkpoint's position to ``epochs``; returns the last metrics row."""
        try:
            row: Dict[str, float] = self.history[-1] if self.history else {}
            if self.start_epoch >= self.epochs:  # nothing to do, nothing rewritten
                if not self.quiet:
                    print(f"the run already finished its {self.start_epoch} epochs; raise train.epochs "
                          "to continue it", flush=True)
                return row
            with self.signals:
                distributed.on_main(self._write_config)
                self._measure_cost()
                for epoch in range(self.start_epoch, self.epochs):
                    with self._preemption_save(f"the end of epoch {epoch + 1}", if_signalled=True):
                        row = self._run_epoch(epoch)
                    if epoch == self.start_epoch:  # configurables first called during training are now recorded
                        distributed.on_main(self._write_config)
                    if self.signals.requested(self.device):
                        raise Preempted(f"preempted by {self.signals.received or 'a signal'}: saved "
                                        f"{os.path.join(self.output_dir, 'last.pt')} at the end of epoch "
                                        f"{epoch + 1}; run again with --resume")
                return row
        finally:
            self.close()

    def _measure_cost(self) -> None:
        """FLOPs and passes of one real iteration, on copies, RNG streams untouched (``engine.ledger``)."""
        with untouched_rng(self.device):
            x, y = first_batch(self.data, self.batch_size, self.seed, self.device)
            x, y = self._shard(self.precision.input(x), y)
            self.ledger.measure(self.model, self.defense, self.precision, x, y, quiet=self.quiet)

    def _run_epoch(self, epoch: int) -> Dict[str, float]:
        start = time.time()
        self.ledger.begin_epoch()
        first, partial = (self.start_step, self.partial) if epoch == self.start_epoch else (0, None)
        row: Dict[str, Any] = {"epoch": epoch + 1}
        row.update(self.train_epoch(epoch, first, partial))
        row["train_time"] = time.time() - start
        row.update(self.ledger.end_epoch(self.steps_per_epoch, self.batch_size, row["train_time"]))
        metrics, is_collapsed = self._validate()
        row.update(metrics)
        row["epoch_time"] = time.time() - start
        self._end_epoch(epoch + 1, row, is_collapsed)
        self.tensorboard.epoch(row)
        if not self.quiet:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            print(json.dumps(shown), flush=True)
        return row

    def close(self) -> None:
        """Close the event files; release the process group (after dropping the DDP wrapper, see
        ``distributed.shutdown``)."""
        self.tensorboard.close()
        if self.dist.enabled:
            self.train_model = self.attack_model = self.backward = None
            distributed.shutdown()
        if self.run_lock is not None:
            self.run_lock.release()
