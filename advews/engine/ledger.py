"""The compute ledger: what a training run cost, in FLOPs, device time, examples and network passes.

Once at the start of each ``Trainer.run``, one real training iteration of the run's defense (its
attack, the defense's loss and backward, EWS's subnet pass and controller update, AWP's proxy step)
runs under PyTorch's ``FlopCounterMode`` (``FlopCounter``) on deep copies of the model, the defense
and the precision state, with a batch drawn by its own generator, inside ``untouched_rng``: the
run's weights, BN statistics, optimizer, defense state and RNG streams are not changed, so a resume
stays bit-exact. It costs about one iteration's time once per process (and, while it runs, a copy
of the weights' memory). EWS's controller update (every ``interval`` steps) is forced into that
iteration, measured on its own and amortised over the interval. Hooks count the forward and
backward passes through the network (and through a same-class copy a defense runs, such as AWP's
proxy), in examples.

Scope of the count: ``FlopCounterMode`` counts matrix multiplications, convolutions and attention
(forward and backward, 2 FLOPs per multiply-add); elementwise ops (BN, activations, losses, the
optimizer step, the attack's projection), data loading and communication are not counted; on conv
nets they are a few percent of the total. FLOPs are those of the model as configured, whatever the
precision or compilation.

Each metrics.jsonl row gets ``pflops``, ``device_seconds`` (training wall time of the epoch times
the number of ranks; validation excluded), ``examples`` (training examples drawn), their running
totals (``*_total``), and ``forward_passes``/``backward_passes`` per example. The totals are saved in
the checkpoint (``state_dict``) and continue across ``--resume``.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from advews.engine.backward import StepBackward
from advews.engine.precision import Precision

TOTALS = ("pflops", "device_seconds", "examples")


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP counts towards 'Global' only."""

    parents = ("Global",)

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class FlopCounter(FlopCounterMode):
    """``FlopCounterMode`` without its per-module breakdown, whose backward hooks make
    ``torch.autograd.grad`` with respect to a leaf input (every attack step) fail in PyTorch 2.x."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _GlobalOnly()


@contextlib.contextmanager
def untouched_rng(device: torch.device) -> Iterator[None]:
    """Torch's (CPU and ``device``), Python's and NumPy's RNG states are put back on exit."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


class PassCounter:
    """Counts examples forwarded through ``modules`` and examples whose gradient flowed back
    through them (a batch of n is n passes); a context manager that removes its hooks on exit."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.forward = self.backward = 0
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, inputs: Tuple, output: Any) -> None:
        n = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), 0)
        self.forward += n
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self._backward(n))

    def _backward(self, n: int) -> None:
        self.backward += n

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class IterationCost:
    """One training iteration on one rank: FLOPs, passes per example, and the seconds measuring took."""

    flops: float
    forward: float
    backward: float
    seconds: float


def first_batch(data: Any, batch_size: int, seed: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """A training batch as the loop draws them (augmented, on the device), from its own generator."""
    gen = torch.Generator().manual_seed(seed)
    batches = data.train.batches(batch_size, shuffle=True, drop_last=True, generator=gen,
                                 augment=data.train_augment, device=device)
    x, y = next(iter(batches))
    return x, y


def _copies(model: nn.Module, defense: Any) -> List[nn.Module]:
    """The network and the same-class copies the defense runs (AWP's proxy)."""
    return [model] + [v for v in vars(defense).values() if isinstance(v, nn.Module) and type(v) is type(model)]


def measure_iteration(model: nn.Module, defense: Any, precision: Precision, x: torch.Tensor,
                      y: torch.Tensor) -> IterationCost:
    """FLOPs and passes per example of one training iteration on this rank's batch ``(x, y)``,
    run on copies (call it inside ``untouched_rng``)."""
    start = time.perf_counter()
    model, defense, precision = copy.deepcopy((model, defense, precision))
    model.train()
    periodic = {"flops": 0.0, "forward": 0, "backward": 0}
    with FlopCounter() as counter, PassCounter(_copies(model, defense)) as passes:
        search, interval = getattr(defense, "search", None), getattr(defense, "interval", None)
        if search is not None and interval:  # EWS: its controller update runs in this iteration
            defense.epoch_step = defense.iteration = 0
            update = search.update

            def measured(score: Any) -> Any:
                before = (counter.get_total_flops(), passes.forward, passes.backward)
                out = update(score)
                after = (counter.get_total_flops(), passes.forward, passes.backward)
                periodic.update(zip(("flops", "forward", "backward"), (a - b for a, b in zip(after, before))))
                return out

            search.update = measured
        with precision.autocast():
            batch = defense.prepare(model, x, y)
            defense.begin_step(model, batch)
            out = defense.training_loss(model, batch, StepBackward(precision))
        if not out.backpropagated:
            StepBackward(precision)(out.loss)
        total = (float(counter.get_total_flops()), passes.forward, passes.backward)
    share = 1.0 / interval if search is not None and interval else 1.0
    flops, forward, backward = (t - p + share * p for t, p in zip(total, periodic.values()))
    n = max(x.shape[0], 1)
    return IterationCost(flops, forward / n, backward / n, time.perf_counter() - start)


class Ledger:
    """The run's running totals and this process's measured iteration cost (``world`` ranks)."""

    def __init__(self, world: int = 1):
        self.world = world
        self.cost: Optional[IterationCost] = None
        self.totals: Dict[str, float] = {"pflops": 0.0, "device_seconds": 0.0, "examples": 0}
        self.carried = 0.0  # training seconds of the unfinished epoch spent by earlier processes
        self._epoch_start: Optional[float] = None

    def measure(self, model: nn.Module, defense: Any, precision: Precision, x: torch.Tensor, y: torch.Tensor,
                quiet: bool = True) -> IterationCost:
        """Measure one iteration on this rank's batch (see ``measure_iteration``) and say so."""
        self.cost = measure_iteration(model, defense, precision, x, y)
        if not quiet:
            print(f"compute ledger: one training step = {self.cost.flops * self.world / 1e9:.4g} GFLOPs "
                  f"({self.cost.forward:g} forward and {self.cost.backward:g} backward passes per example; "
                  f"counted in {self.cost.seconds:.2f} s)", flush=True)
        return self.cost

    def begin_epoch(self) -> None:
        self._epoch_start = time.time()

    def end_epoch(self, steps: int, batch_size: int, train_seconds: float) -> Dict[str, float]:
        """The epoch's ledger fields for its metrics row: ``steps`` iterations of ``batch_size``
        (global) examples, ``train_seconds`` of training wall time in this process."""
        if self.cost is None:
            raise RuntimeError("Ledger.measure must run before the first epoch ends")
        epoch = {"pflops": steps * self.cost.flops * self.world / 1e15,
                 "device_seconds": (train_seconds + self.carried) * self.world,
                 "examples": steps * batch_size}
        self.carried, self._epoch_start = 0.0, None
        row: Dict[str, float] = {}
        for key in TOTALS:
            self.totals[key] += epoch[key]
            row[key], row[f"{key}_total"] = epoch[key], self.totals[key]
        row.update(forward_passes=self.cost.forward, backward_passes=self.cost.backward)
        return row

    def state_dict(self) -> Dict[str, float]:
        """The totals, and the training seconds of an unfinished epoch (for a mid-epoch save)."""
        running = 0.0 if self._epoch_start is None else time.time() - self._epoch_start
        return {**self.totals, "epoch_seconds": self.carried + running}

    def load_state_dict(self, state: Optional[Dict[str, float]]) -> None:
        """Continue the saved totals (a checkpoint from before the ledger starts them at 0)."""
        state = state or {}
        self.totals = {"pflops": float(state.get("pflops", 0.0)),
                       "device_seconds": float(state.get("device_seconds", 0.0)),
                       "examples": int(state.get("examples", 0))}
        self.carried = float(state.get("epoch_seconds", 0.0))


class AttackCost:
    """Forward and backward passes of an evaluation attack, and its FLOPs from the measured FLOPs
    of one forward pass and one input-gradient backward pass per example (``FlopCounterMode``
    scope as above; the model's mode and BN statistics are left as they were)."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        was_training = model.training
        model.eval()
        try:
            with untouched_rng(example.device), FlopCounter() as counter:
                x = example[:1].detach().clone().requires_grad_(True)
                logits = model(x)
                self.forward_flops = float(counter.get_total_flops())
                torch.autograd.grad(logits.float().logsumexp(1).sum(), x)
                self.backward_flops = float(counter.get_total_flops()) - self.forward_flops
        finally:
            model.train(was_training)
        self.model = model

    @contextlib.contextmanager
    def count(self, entry: Dict[str, Any], n_examples: int) -> Iterator[None]:
        """Count the passes of what runs inside; then add ``forward_passes`` and ``backward_passes``
        (per example) and ``flops`` (total over the ``n_examples``) to the attack's JSON ``entry``."""
        with PassCounter([self.model]) as passes:
            yield
        n = max(n_examples, 1)
        entry.update(forward_passes=round(passes.forward / n, 3), backward_passes=round(passes.backward / n, 3),
                     flops=passes.forward * self.forward_flops + passes.backward * self.backward_flops)
