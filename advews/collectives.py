"""Collectives over the torchrun ranks that are no-ops in a single process.

The bottom of the import graph, so defenses (EWS's reward, AWP's proxy gradient) and the training
loop can both call them unconditionally without the defenses importing the engine.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (returns ``t`` itself in a single process)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def average_gradients(module: nn.Module) -> None:
    """Average ``.grad`` over ranks for updates made outside DDP (e.g. AWP's proxy step)."""
    if not active():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def all_gather_object(obj: Any) -> List[Any]:
    if not active():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> Optional[T]:
    """Run ``fn`` on rank 0 only; an exception there is re-raised on every rank (nobody hangs)."""
    if not active():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - shipped to the other ranks, then re-raised
            error = e
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    return result


def barrier() -> None:
    if active():
        dist.barrier()
