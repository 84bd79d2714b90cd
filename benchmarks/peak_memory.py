"""Benchmark 4: peak memory of a training iteration, EWS vs vanilla (AT and TRADES).

Each iteration is the training loop's (``Trainer._train_step``): the defense's ``training_loss`` gets
the loop's ``backward``, so EWS backpropagates the defense's loss before its subnet forward;
``--summed`` instead backpropagates the summed loss once (how EWS ran before, holding both graphs).
On CUDA: torch.cuda.max_memory_allocated. On the CPU: each configuration runs in its own process and
reports its peak resident set size (ru_maxrss), minus the same process's RSS after warm-up imports;
that differs by up to ~15% between identical runs (allocator behaviour), so each configuration runs
``--repeats`` times and the median is reported."""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys

import torch

from common import default_device, machine, workload_model, workload_parser


def one(name: str, args) -> float:
    from advews.defenses import DEFENSES
    from advews.engine.backward import StepBackward
    from advews.engine.precision import Precision

    device = default_device()
    torch.manual_seed(0)
    model = workload_model(args, device)
    extra = {"rho": 0.9, "interval": 1} if name.endswith("_EWS") else {}
    defense = DEFENSES[name](eps=args.eps, step_size=args.eps / 4, steps=10, **extra)
    defense.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    backward = StepBackward(Precision("none", device))
    x = torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        batch = defense.prepare(model, x, y)
        opt.zero_grad(set_to_none=True)
        out = defense.training_loss(model, batch, None if args.summed else backward)
        if not out.backpropagated:
            backward(out.loss)
        opt.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main() -> None:
    p = workload_parser(__doc__.splitlines()[0])
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--summed", action="store_true", help="backpropagate EWS's summed loss once (the old way)")
    p.add_argument("--repeats", type=int, default=5, help="processes per configuration; the median is reported")
    args = p.parse_args()
    if args.only:
        print(one(args.only, args))
        return
    print(f"machine: {machine()}")
    peaks = {}
    for name in ("AT", "AT_EWS", "TRADES", "TRADES_EWS"):
        cmd = [sys.executable, __file__, "--only", name, "--arch", args.arch, "--options", args.options,
               "--channels", str(args.channels),
               "--image-size", str(args.image_size), "--batch", str(args.batch), "--eps", str(args.eps)]
        cmd += ["--summed"] if args.summed else []
        runs = [float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
                for _ in range(args.repeats)]
        peaks[name] = statistics.median(runs)
    unit = "MiB allocated on the GPU" if default_device().type == "cuda" else "MiB RSS growth"
    for base in ("AT", "TRADES"):
        print(f"{base}_EWS vs {base}: {peaks[base + '_EWS']:.1f} vs {peaks[base]:.1f} {unit}, "
              f"ratio {peaks[base + '_EWS'] / max(peaks[base], 1e-9):.3f}")


if __name__ == "__main__":
    main()
