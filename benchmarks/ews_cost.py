"""Benchmark 1: seconds per training iteration of AT_EWS vs AT and TRADES_EWS vs TRADES, with a breakdown,
beside the ratio of their FLOPs (``engine.ledger``: one iteration under PyTorch's FLOP counter).

Per iteration: the attack (defense.prepare), the training step (loss, backward, optimizer step),
the EWS subnet step (the extra subnet forward + KL backward) and the controller update (every K
iterations, amortised). The analytic floor is 1 + (one extra forward/backward per distilled view) /
(the vanilla iteration), the cost EWS cannot avoid when subnet channels are zeroed rather than
sliced; it is given in time (measured forward/backward) and in FLOPs (a Standard iteration's).
Any architecture of the model registry: ``--arch NAME --options JSON`` (``advews.models.model_spec``).

    python benchmarks/ews_cost.py                      # CPU-sized default: small PreAct ResNet, MNIST size
    python benchmarks/ews_cost.py --arch preact_resnet18 --image-size 32 --channels 3 --batch 128  # GPU
    python benchmarks/ews_cost.py --arch timm:vit_tiny_patch16_224 --options '{"img_size": 32, "patch_size": 4}' \
        --image-size 32 --channels 3 --eps 0.0314
"""

from __future__ import annotations

import statistics
import time

import torch

from advews.defenses import DEFENSES
from advews.engine.ledger import measure_iteration
from advews.engine.precision import Precision
from common import default_device, machine, sync, workload_model, workload_parser


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


class Runner:
    """One defense on its own copy of the same model and batch; ``step()`` times one iteration."""

    def __init__(self, name: str, args, device):
        torch.manual_seed(0)
        self.device = device
        self.model = workload_model(args, device)
        eps = {"eps": args.eps, "step_size": args.eps / 4, "steps": args.steps}
        extra = {"rho": 0.9, "interval": args.interval} if name.endswith("_EWS") else {}
        self.defense = DEFENSES[name](**eps, **extra)
        self.defense.setup(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device)
        self.y = torch.randint(0, 10, (args.batch,), device=device)
        self.cost = measure_iteration(self.model, self.defense, Precision("none", device), self.x, self.y)
        self.parts = {"attack": [], "train_step": [], "total": []}
        self.updates: list = []
        if name.endswith("_EWS"):  # time the controller update (it runs inside training_loss every K steps)
            update = self.defense.search.update

            def timed_update(score):
                out, t = timed(device, lambda: update(score))
                self.updates.append(t)
                return out

            self.defense.search.update = timed_update

    def step(self, record: bool) -> None:
        start = time.perf_counter()
        batch, t_attack = timed(self.device, lambda: self.defense.prepare(self.model, self.x, self.y))

        def train():
            out = self.defense.training_loss(self.model, batch)
            self.opt.zero_grad(set_to_none=True)
            out.loss.backward()
            self.opt.step()

        _, t_step = timed(self.device, train)
        if record:
            self.parts["attack"].append(t_attack)
            self.parts["train_step"].append(t_step)
            self.parts["total"].append(time.perf_counter() - start)

    def result(self, iterations: int) -> dict:
        res = {k: statistics.median(v) for k, v in self.parts.items()}
        res["controller_update"] = sum(self.updates) / iterations
        res["flops"] = self.cost.flops
        return res


def measure_pair(base: str, args, device):
    """Vanilla and EWS iterations interleaved, so drifts in machine load hit both alike."""
    runners = [Runner(base, args, device), Runner(f"{base}_EWS", args, device)]
    for i in range(args.warmup + args.iters):
        for r in runners:
            r.step(record=i >= args.warmup)
    return [r.result(args.warmup + args.iters) for r in runners]


def subnet_step_cost(args, device):
    """Seconds and FLOPs of one forward + backward of the model (what the EWS subnet step adds, at most)."""
    torch.manual_seed(0)
    model = workload_model(args, device)
    x = torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    times = []
    for i in range(args.warmup + args.iters):
        _, t = timed(device, lambda: model(x).logsumexp(1).mean().backward())
        if i >= args.warmup:
            times.append(t)
    flops = measure_iteration(model, DEFENSES["Standard"](), Precision("none", device), x, y).flops
    return statistics.median(times), flops


def main() -> None:
    p = workload_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="PGD steps")
    p.add_argument("--interval", type=int, default=10, help="EWS K")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    device = default_device()
    print(f"machine: {machine()}")
    print(f"model {args.arch} {args.options}, batch {args.batch}, {args.channels}x{args.image_size}x{args.image_size}, "
          f"PGD-{args.steps}, EWS K={args.interval} rho=0.9; medians over {args.iters} iterations")
    fb, fb_flops = subnet_step_cost(args, device)
    for base in ("AT", "TRADES"):
        vanilla, ews = measure_pair(base, args, device)
        subnet = ews["train_step"] - vanilla["train_step"] - ews["controller_update"]
        views = 2 if base == "TRADES" else 1
        floor = 1 + views * fb / vanilla["total"]
        flop_floor = 1 + views * fb_flops / vanilla["flops"]
        print(f"\n{base}_EWS vs {base}: {ews['total']:.4f} s vs {vanilla['total']:.4f} s per iteration, "
              f"time ratio {ews['total'] / vanilla['total']:.3f} (analytic floor {floor:.3f})")
        print(f"  FLOPs        {ews['flops'] / 1e9:.4g} vs {vanilla['flops'] / 1e9:.4g} GFLOPs per iteration, "
              f"FLOP ratio {ews['flops'] / vanilla['flops']:.3f} (analytic floor {flop_floor:.3f})")
        print(f"  attack       {vanilla['attack']:.4f} s vs {ews['attack']:.4f} s")
        print(f"  train step   {vanilla['train_step']:.4f} s vs {ews['train_step']:.4f} s "
              f"(of which subnet step ~{max(subnet, 0):.4f} s, controller update {ews['controller_update']:.4f} s amortised)")


if __name__ == "__main__":
    main()
