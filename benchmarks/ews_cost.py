"""Benchmark 1: seconds per training iteration of AT_EWS vs AT and TRADES_EWS vs TRADES, with a breakdown.

Per iteration: the attack (defense.prepare), the training step (loss, backward, optimizer step),
the EWS subnet step (the extra subnet forward + KL backward) and the controller update (every K
iterations, amortised). The analytic floor is 1 + (one extra forward/backward) / (the vanilla
iteration), the cost EWS cannot avoid when subnet channels are zeroed rather than sliced.

    python benchmarks/ews_cost.py                      # CPU-sized default: small PreAct ResNet, MNIST size
    python benchmarks/ews_cost.py --arch preact_resnet18 --image-size 32 --channels 3 --batch 128  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from advews.defenses import DEFENSES
from advews.models import build_model
from common import default_device, machine, sync


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def measure(name: str, args, device) -> dict:
    torch.manual_seed(0)
    model = build_model({"arch": args.arch, "num_classes": 10, "in_channels": args.channels}).to(device).train()
    eps = {"eps": args.eps, "step_size": args.eps / 4, "steps": args.steps}
    extra = {"rho": 0.9, "interval": args.interval} if name.endswith("_EWS") else {}
    defense = DEFENSES[name](**eps, **extra)
    defense.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    parts = {"attack": [], "train_step": [], "total": []}
    ews = name.endswith("_EWS")
    updates = []
    if ews:  # time the controller update separately (it runs inside training_loss every K iterations)
        update = defense.search.update

        def timed_update(score):
            out, t = timed(device, lambda: update(score))
            updates.append(t)
            return out

        defense.search.update = timed_update
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        batch, t_attack = timed(device, lambda: defense.prepare(model, x, y))

        def step():
            out = defense.training_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        _, t_step = timed(device, step)
        if i >= args.warmup:
            parts["attack"].append(t_attack)
            parts["train_step"].append(t_step)
            parts["total"].append(time.perf_counter() - start)
    res = {k: statistics.median(v) for k, v in parts.items()}
    res["controller_update"] = (sum(updates) / (args.warmup + args.iters)) if ews else 0.0
    return res


def subnet_step_cost(args, device) -> float:
    """One forward + backward of the model (what the EWS subnet step adds, at most)."""
    torch.manual_seed(0)
    model = build_model({"arch": args.arch, "num_classes": 10, "in_channels": args.channels}).to(device).train()
    x = torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device)
    times = []
    for i in range(args.warmup + args.iters):
        _, t = timed(device, lambda: model(x).logsumexp(1).mean().backward())
        if i >= args.warmup:
            times.append(t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small_preact_resnet")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--interval", type=int, default=10, help="EWS K")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    device = default_device()
    print(f"machine: {machine()}")
    print(f"model {args.arch}, batch {args.batch}, {args.channels}x{args.image_size}x{args.image_size}, "
          f"PGD-{args.steps}, EWS K={args.interval} rho=0.9; medians over {args.iters} iterations")
    fb = subnet_step_cost(args, device)
    for base in ("AT", "TRADES"):
        vanilla, ews = measure(base, args, device), measure(f"{base}_EWS", args, device)
        subnet = ews["train_step"] - vanilla["train_step"] - ews["controller_update"]
        views = 2 if base == "TRADES" else 1
        floor = 1 + views * fb / vanilla["total"]
        print(f"\n{base}_EWS vs {base}: {ews['total']:.4f} s vs {vanilla['total']:.4f} s per iteration, "
              f"ratio {ews['total'] / vanilla['total']:.3f} (analytic floor {floor:.3f})")
        print(f"  attack       {vanilla['attack']:.4f} s vs {ews['attack']:.4f} s")
        print(f"  train step   {vanilla['train_step']:.4f} s vs {ews['train_step']:.4f} s "
              f"(of which subnet step ~{max(subnet, 0):.4f} s, controller update {ews['controller_update']:.4f} s amortised)")


if __name__ == "__main__":
    main()
