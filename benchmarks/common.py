"""Shared benchmark helpers: machine description, a synchronising timer, medians over repeats."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable, List

import torch


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {dev}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def workload_parser(description: str, batch: int = 64) -> argparse.ArgumentParser:
    """The options every benchmark shares: which model, input size, batch and threat budget.
    Defaults are the CPU quickstart workload; PreAct ResNet-18 is ``--arch preact_resnet18
    --channels 3 --image-size 32 --eps 0.0314``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--arch", default="small_preact_resnet", help="any model.arch, timm:NAME included")
    p.add_argument("--options", default="{}",
                   help="the architecture's options as JSON, e.g. '{\"widths\": [8, 16, 16]}'")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--eps", type=float, default=0.3)
    return p


def workload_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The ``--arch``/``--options`` model for 10 classes and ``--channels`` input channels, in train mode."""
    from advews.models import build_model, model_spec

    spec = dict(model_spec(args.arch, json.loads(args.options)), num_classes=10, in_channels=args.channels)
    return build_model(spec).to(device).train()
