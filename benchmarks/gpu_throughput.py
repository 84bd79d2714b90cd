"""Benchmark 5 (GPU only): images per second of PreAct ResNet-18 PGD-10 AT on synthetic CIFAR-sized
batches: fp32 vs bf16 vs bf16 + channels_last (+ torch.compile), ratios against fp32."""

from __future__ import annotations

import argparse
import sys

import torch

from advews.defenses import AT
from advews.engine.precision import Precision
from advews.models import build_model
from common import machine, median_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also measure bf16 + channels_last + torch.compile")
    args = p.parse_args()
    print(f"machine: {machine()}")
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        sys.exit(0)
    device = torch.device("cuda")
    configs = [("fp32", "none", False, False), ("bf16", "bf16", False, False),
               ("bf16+channels_last", "bf16", True, False)]
    if args.compile:
        configs.append(("bf16+channels_last+compile", "bf16", True, True))
    base = None
    for label, amp, cl, comp in configs:
        torch.manual_seed(0)
        model = build_model({"arch": "preact_resnet18", "num_classes": 10, "in_channels": 3}).to(device).train()
        precision = Precision(amp, device, channels_last=cl)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        fwd = torch.compile(model) if comp else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        defense = AT()
        x = precision.input(torch.rand(args.batch, 3, 32, 32, device=device))
        y = torch.randint(0, 10, (args.batch,), device=device)

        def it():
            with precision.autocast():
                out = defense.training_loss(fwd, defense.prepare(fwd, x, y))
            opt.zero_grad(set_to_none=True)
            precision.backward(out.loss)
            precision.step(opt)

        t = median_time(it, device, args.repeats, warmup=3)
        ips = args.batch / t
        base = base or ips
        print(f"{label:<28} {ips:8.0f} images/s  x{ips / base:.2f}")


if __name__ == "__main__":
    main()
