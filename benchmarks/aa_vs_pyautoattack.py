"""Benchmark 5: advews-eval's AutoAttack (``advews.evaluate``: checks, clean pass, the cascade one stage
at a time, JSON) vs pyautoattack's ``run_standard_evaluation`` called directly, on the same model,
images, seed and batch size: time ratio (goal <= 1.05) and identical robust accuracy. CPU time is
printed next to wall time: on a shared machine the wall time measures the neighbours, CPU time
(this process, all its threads) the work.

Run from the repository root (a checkpoint's data root is relative to it), e.g.
``python benchmarks/aa_vs_pyautoattack.py --checkpoint runs/quickstart/best.pt --n 64
--version custom --aa-attacks apgd-ce,apgd-t``. Without --checkpoint a random --arch attacks random
images labelled by its own predictions (timing only; its accuracies mean nothing).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch
from pyautoattack import AutoAttack

import advews
from advews.data import load_data
from common import default_device, machine, workload_model, workload_parser


def images(args, device):
    """(model, uint8 NHWC images, labels): the checkpoint's first --n test images, else random ones."""
    if args.checkpoint:
        model = advews.load_model(args.checkpoint, device=str(device))
        data = load_data(**model.data_spec).test.subset(torch.arange(args.n))
        return model, data.images.permute(0, 2, 3, 1).numpy(), data.labels.numpy()
    torch.manual_seed(0)
    model = workload_model(args, device).eval()
    u8 = torch.randint(0, 256, (args.n, args.image_size, args.image_size, args.channels), dtype=torch.uint8)
    with torch.no_grad():
        y = model(u8.permute(0, 3, 1, 2).float().div(255).to(device)).argmax(1).cpu()
    return model, u8.numpy(), y.numpy()


def main() -> None:
    p = workload_parser(__doc__.splitlines()[0], batch=256)
    p.add_argument("--checkpoint", help="an advews checkpoint: its model on its first --n test images")
    p.add_argument("--n", type=int, default=64, help="examples attacked")
    p.add_argument("--version", default="custom", help="AutoAttack version (standard, fast, custom, ...)")
    p.add_argument("--aa-attacks", default="apgd-ce,apgd-t", help="cascade of --version custom")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="alternating timed runs of each; medians are compared")
    args = p.parse_args()
    device = default_device()
    print(f"machine: {machine()}")
    model, x_u8, y_np = images(args, device)
    eps = args.eps
    cascade = args.aa_attacks.split(",") if args.version == "custom" else None
    x = torch.from_numpy(x_u8).permute(0, 3, 1, 2).float().div(255)
    y = torch.from_numpy(y_np).long()
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "data.npz")
        np.savez(npz, x=x_u8, y=y_np)

        def ours() -> float:
            result = advews.evaluate(model, data=f"npz:{npz}", attacks="autoattack", eps=eps, version=args.version,
                                     aa_attacks=cascade, seed=args.seed, batch_size=args.batch, device=str(device))
            return result["robust_acc"]

        def theirs() -> float:
            library = "standard" if args.version == "fast" else args.version
            aa = AutoAttack(model, norm="Linf", eps=eps, version=library, seed=args.seed, device=device,
                            attacks=cascade)
            if args.version == "fast":
                aa.attacks_to_run = ["apgd-ce", "apgd-t"]
            _, y_adv = aa.run_standard_evaluation(x, y, batch_size=args.batch)
            return (y_adv.cpu() == y).sum().item() / len(y)

        times = {"advews": [], "pyautoattack": []}
        cpu = {"advews": [], "pyautoattack": []}
        accs = {}
        for _ in range(args.repeats):
            for name, fn in (("advews", ours), ("pyautoattack", theirs)):
                start, start_cpu = time.perf_counter(), time.process_time()
                accs[name] = fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    t_ours, t_theirs = (statistics.median(times[k]) for k in ("advews", "pyautoattack"))
    c_ours, c_theirs = (statistics.median(cpu[k]) for k in ("advews", "pyautoattack"))
    what = f"version {args.version}" + (f" ({args.aa_attacks})" if cascade else "")
    print(f"{args.checkpoint or args.arch}, {args.n} examples, batch {args.batch}, eps {eps:g}, AutoAttack {what}: "
          f"wall advews {t_ours:.2f} s, pyautoattack {t_theirs:.2f} s, ratio {t_ours / t_theirs:.3f}; "
          f"CPU advews {c_ours:.2f} s, pyautoattack {c_theirs:.2f} s, ratio {c_ours / c_theirs:.3f}; "
          f"robust accuracy {accs['advews']:.4f} vs {accs['pyautoattack']:.4f} "
          f"({'identical' if accs['advews'] == accs['pyautoattack'] else 'DIFFERENT'})")


if __name__ == "__main__":
    main()
