"""Benchmark 2: one advews AT iteration (defense.prepare + training_loss + step) vs a plain,
hand-written PyTorch PGD-AT iteration on the same model and batch. Ratio <= 1 means no overhead.

The plain loop is what a user would write: model.eval(), PGD with delta.requires_grad and
loss.backward() (computing unused weight gradients too), model.train(), CE step.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from advews.defenses import AT
from common import default_device, machine, median_time, workload_model, workload_parser


def plain_iteration(model, opt, x, y, eps, alpha, steps):
    model.eval()
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        delta = (delta + alpha * delta.grad.sign()).clamp(-eps, eps).detach()
        delta = (x + delta).clamp(0, 1) - x
    model.train()
    loss = F.cross_entropy(model(x + delta), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def advews_iteration(defense, model, opt, x, y):
    batch = defense.prepare(model, x, y)
    out = defense.training_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()


def main() -> None:
    p = workload_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    device = default_device()
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    model = workload_model(args, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    alpha = args.eps / 4
    defense = AT(eps=args.eps, step_size=alpha, steps=args.steps)
    results = {}
    for _ in range(2):  # interleave to share any drift in machine load
        results.setdefault("plain", []).append(median_time(
            lambda: plain_iteration(model, opt, x, y, args.eps, alpha, args.steps), device, args.repeats // 2))
        results.setdefault("advews", []).append(median_time(
            lambda: advews_iteration(defense, model, opt, x, y), device, args.repeats // 2))
    plain, ours = min(results["plain"]), min(results["advews"])
    print(f"{args.arch}, batch {args.batch}, PGD-{args.steps}: advews AT {ours:.4f} s/iter, plain loop {plain:.4f} s/iter, "
          f"ratio advews/plain {ours / plain:.3f}")


if __name__ == "__main__":
    main()
