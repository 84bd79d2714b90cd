"""The one training loop. Every defense (and every mixin on it) trains through ``Trainer.run``."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any, Dict, Optional

import gin
import numpy as np
import torch
from tqdm import tqdm

from advews.attacks import PGD
from advews.data import load_data
from advews.defenses import build_defense
from advews.engine import distributed
from advews.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from advews.engine.optim import make_optimizer, make_scheduler
from advews.engine.precision import Precision
from advews.errors import AdvewsError
from advews.evaluation.robust import robust_accuracy
from advews.models import build_model, model_spec
from advews.subnets import install_masks

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.gin")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AdvewsError(f"bad device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdvewsError(f"device {device!r} requested but CUDA is not available; use auto or cpu")
    return dev


def prepare_output_dir(path: str, resume: bool) -> None:
    """Refuse to touch an existing run unless resuming; make sure the directory is writable."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
    if resume:
        if not os.path.isfile(os.path.join(path, "last.pt")):
            raise AdvewsError(f"cannot resume: no last.pt in {path}")
    elif existing:
        raise AdvewsError(
            f"output directory {path} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or choose another --output"
        )
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise AdvewsError(f"output directory {path} is not writable: {e.strerror or e}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@gin.configurable("train", denylist=["output_dir", "resume", "quiet"])
class Trainer:
    """Builds data, model, defense, optimizer and schedule from gin, then trains epoch by epoch.

    Each epoch: train on shuffled, augmented batches (drop_last), validate (clean and PGD robust
    accuracy on the held-out split, with a fixed seed so validation never moves the training RNG),
    save ``last.pt`` (everything a resume needs) and ``best.pt``, append a row to ``metrics.jsonl``.

    Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DDP; ``batch_size`` stays the GLOBAL
    batch: every rank draws the same shuffled global batch and takes its ``batch_size / world``
    slice, which is what DistributedSampler does with per-epoch shuffling, and validation is split
    across ranks and summed. Only rank 0 writes the run directory.
    ``amp`` ('none', 'bf16', 'fp16'), ``channels_last`` and ``compile`` make each device fast.
    ``grad_clip``: clip the model's global gradient norm before each step (None: no clipping, as
    robust_overfitting, TRADES and AWP do; the EWS authors' train_cifar clips at 3).
    """

    def __init__(
        self,
        output_dir: str,
        resume: bool = False,
        quiet: bool = False,
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
    ):
        if epochs < 1:
            raise AdvewsError(f"train.epochs must be >= 1, got {epochs}")
        if batch_size < 1:
            raise AdvewsError(f"train.batch_size must be >= 1, got {batch_size}")
        if val_steps < 1:
            raise AdvewsError(f"train.val_steps must be >= 1, got {val_steps}")
        if grad_clip is not None and not grad_clip > 0:
            raise AdvewsError(f"train.grad_clip must be > 0 or None, got {grad_clip}")
        self.grad_clip = grad_clip
        self.dist, self.device = distributed.init(resolve_device(device))
        if batch_size % self.dist.world:
            raise AdvewsError(f"train.batch_size {batch_size} must be divisible by the {self.dist.world} ranks")
        distributed.on_main(lambda: prepare_output_dir(output_dir, resume))
        self.output_dir, self.quiet = output_dir, quiet or not self.dist.main
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.eps_warmup_epochs, self.eval_batch_size = eps_warmup_epochs, eval_batch_size
        self.precision = Precision(amp, self.device, channels_last)
        seed_everything(seed)

        self.data = load_data()
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
        self.optimizer = make_optimizer(self.model.parameters())
        self.steps_per_epoch = self.data.train.num_batches(batch_size, drop_last=True)
        if self.steps_per_epoch < 1:
            raise AdvewsError(f"train.batch_size {batch_size} is larger than the training set ({len(self.data.train)})")
        self.scheduler = make_scheduler(self.optimizer, self.steps_per_epoch, epochs)
        self.val_attack = self._validation_attack(val_eps, val_steps, val_step_size)
        self.start_epoch, self.best = 0, None
        if resume:
            self._load(os.path.join(output_dir, "last.pt"))

    def _wrap(self, compile: bool):
        """(model for attacks, model for the training forward): DDP and/or torch.compile around it."""
        train_model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if not compile:
            return self.model, train_model
        # Subnet masks must be buffers, not per-context hooks, or the compiled graph keeps stale masks.
        install_masks(self.model)
        attack_model = torch.compile(self.model)
        return attack_model, (attack_model if train_model is self.model else torch.compile(train_model))

    def _validation_attack(self, eps: Optional[float], steps: int, step_size: Optional[float]) -> Optional[PGD]:
        attack = getattr(self.defense, "attack", None)
        if eps is None:
            if attack is None:
                return None
            eps = attack.eps
        norm = getattr(attack, "norm", "Linf")
        return PGD(eps=eps, norm=norm, steps=steps, step_size=step_size or 2.5 * eps / steps)

    # ----------------------------------------------------------------- state
    def _state(self, epoch: int, rng: list) -> Dict[str, Any]:
        return {
            "format": 1,
            "epoch": epoch,
            "model": self.model.state_dict(),
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
            "best": self.best,
            "config": gin.config_str(),
        }

    def _load(self, path: str) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state.get("defense") != self.defense_name:
            raise AdvewsError(
                f"cannot resume {path}: it was trained with defense {state.get('defense')!r}, "
                f"the config says {self.defense_name!r}"
            )
        if len(state["rng"]) != self.dist.world:
            raise AdvewsError(f"cannot resume {path}: it was trained on {len(state['rng'])} ranks, this run has {self.dist.world}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("precision", {}))
        self.defense.load_state_dict(state["defense_state"])
        set_rng_state(state["rng"][self.dist.rank])
        self.start_epoch, self.best = state["epoch"], state["best"]
        distributed.on_main(lambda: self._truncate_metrics(self.start_epoch))

    def _truncate_metrics(self, epochs_done: int) -> None:
        """Drop rows a crash wrote after the last checkpoint, so the log matches the resumed state."""
        path = os.path.join(self.output_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epochs_done]
        with open(path, "w") as f:
            f.writelines(rows)

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

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = self.data.train.batches(
            self.batch_size, shuffle=True, drop_last=True, generator=gen,
            augment=self.data.train_augment, device=self.device,
        )
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}",
                   disable=self.quiet or not sys.stderr.isatty(), leave=False)
        sums: Dict[str, torch.Tensor] = {}
        counts: Dict[str, int] = {}
        self.model.train()
        for i, (x, y) in enumerate(bar):
            x, y = self._shard(self.precision.input(x), y)
            self.defense.set_progress(epoch, self._eps_scale(epoch * self.steps_per_epoch + i))
            with self.precision.autocast():
                batch = self.defense.prepare(self.attack_model, x, y)
                self.defense.begin_step(self.model, batch)
                out = self.defense.training_loss(self.train_model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.backward(out.loss)
            self.precision.step(self.optimizer, self.grad_clip)
            self.defense.end_step(self.model)
            self.scheduler.step()
            step_metrics = {
                "loss": out.loss.detach().float(),
                "acc": (out.logits.detach().argmax(1) == batch.y).float().mean(),
                **{k: v.detach().float() for k, v in out.metrics.items()},
            }
            for k, v in step_metrics.items():  # some metrics (e.g. a search update) come every K steps
                sums[k] = sums[k] + v if k in sums else v.clone()
                counts[k] = counts.get(k, 0) + 1
            if not bar.disable and i % 10 == 0:
                bar.set_postfix(loss=f"{float(out.loss):.3f}")
        keys = sorted(sums)
        means = distributed.all_reduce_mean(torch.stack([sums[k].to(self.device) / counts[k] for k in keys])) \
            if keys else torch.zeros(0)
        return {f"train_{k}": float(v) for k, v in zip(keys, means)}

    def validate(self) -> Dict[str, float]:
        """Clean and PGD accuracy on the validation split; under DDP each rank takes every world-th example."""
        if self.data.val is None:
            return {}
        val = self.data.val
        if self.dist.enabled:
            val = val.subset(torch.arange(self.dist.rank, len(val), self.dist.world))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            with self.precision.autocast():
                res = robust_accuracy(self.attack_model, val, self.val_attack, self.eval_batch_size, self.device)
        counts = torch.tensor([res["clean_acc"] * res["n_examples"], res.get("robust_acc", 0.0) * res["n_examples"],
                               res["n_examples"]], dtype=torch.float64, device=self.device)
        clean, robust, n = distributed.all_reduce_sum(counts).tolist()
        out = {"val_clean_acc": round(clean) / max(n, 1)}
        if "robust_acc" in res:
            out["val_robust_acc"] = round(robust) / max(n, 1)
        return out

    def _selection_metric(self, row: Dict[str, float]) -> Optional[float]:
        key = "val_robust_acc" if self.defense.adversarial and "val_robust_acc" in row else "val_clean_acc"
        return row.get(key)

    def _save(self, epoch: int, row: Dict[str, float]) -> None:
        """Rank 0 writes best.pt, last.pt and the metrics row (RNG states come from every rank)."""
        rng = distributed.all_gather_object(rng_state())
        score = self._selection_metric(row)
        improved = score is not None and (self.best is None or score > self.best["score"])
        if improved:
            self.best = {"epoch": epoch, "score": score}

        def write() -> None:
            state = self._state(epoch, rng)
            if improved:
                keep = ("format", "epoch", "model", "model_spec", "data_spec", "defense", "threat_model", "config")
                save_checkpoint({k: state[k] for k in keep}, os.path.join(self.output_dir, "best.pt"))
            save_checkpoint(state, os.path.join(self.output_dir, "last.pt"))
            with open(os.path.join(self.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

        distributed.on_main(write)

    def _write_config(self) -> None:
        with open(os.path.join(self.output_dir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str())

    def run(self) -> Dict[str, float]:
        """Train from ``start_epoch`` to ``epochs``; returns the last metrics row."""
        try:
            distributed.on_main(self._write_config)
            row: Dict[str, float] = {}
            for epoch in range(self.start_epoch, self.epochs):
                start = time.time()
                row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
                row.update(self.train_epoch(epoch))
                row["train_time"] = time.time() - start
                row.update(self.validate())
                row["epoch_time"] = time.time() - start
                self._save(epoch + 1, row)
                if epoch == self.start_epoch:  # configurables first called during training are now recorded
                    distributed.on_main(self._write_config)
                if not self.quiet:
                    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                    print(json.dumps(shown), flush=True)
            return row
        finally:
            self.close()

    def close(self) -> None:
        """Release the process group (after dropping the DDP wrapper, see ``distributed.shutdown``)."""
        if self.dist.enabled:
            self.train_model = self.attack_model = None
            distributed.shutdown()
