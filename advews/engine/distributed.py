"""torch.distributed plumbing for the one training loop (torchrun: nccl on GPUs, gloo on CPU).

Joining and leaving the process group live here; the collectives that defenses, mixins and the loop
call (no-ops in a single process) live in ``advews.collectives``, below every layer that uses them,
and are re-exported here.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from advews.collectives import (  # noqa: F401  (re-exported for the loop)
    active, all_gather_object, all_reduce_mean, all_reduce_sum, average_gradients, barrier, on_main,
)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def main_process() -> bool:
    """Whether this process speaks for the run: rank 0 under torchrun, read from the environment so
    it holds before the process group exists and after a failure (a refusal is printed once, not
    once per rank), and always in a single process."""
    try:
        return int(os.environ.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> "tuple[Dist, torch.device]":
    """Join the torchrun process group (if launched so); on CUDA each rank takes its local GPU."""
    if not launched_by_torchrun():
        return Dist(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), device


def shutdown() -> None:
    """Tear down the process group. Callers drop their DDP wrapper first: with gloo on CPU, about one
    exit in four aborts ("terminate called without an active exception") while one is alive."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. the EMA's BN statistics, copied from each rank's live
    model, whose statistics drift apart between DDP's broadcasts); a no-op in a single process."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
