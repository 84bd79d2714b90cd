"""Benchmark 3: advews PGD-20 evaluation vs torchattacks.PGD on the same model and inputs: time and
robust accuracy (no random start, so both compute the same attack and must agree)."""

from __future__ import annotations


import torch
import torchattacks

from advews.attacks import PGD
from advews.data import load_data
from advews.engine.checkpoint import load_checkpoint
from advews.models import build_model
from common import default_device, machine, median_time, workload_model, workload_parser


def main() -> None:
    p = workload_parser(__doc__.splitlines()[0], batch=256)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--checkpoint", help="an advews checkpoint: attack its model on its test split")
    args = p.parse_args()
    device = default_device()
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    if args.checkpoint:  # a trained model on its real test images: accuracies worth comparing
        state = load_checkpoint(args.checkpoint, map_location=device)
        model = build_model(state["model_spec"]).to(device).eval()
        model.load_state_dict(state["model"])
        x, y = next(load_data(**state["data_spec"]).test.batches(args.batch, device=device))
    else:
        model = workload_model(args, device).eval()
        x = torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device)
        y = model(x).argmax(1).detach()  # every point starts correctly classified
    ours = PGD(eps=args.eps, steps=20, step_size=args.eps / 8, random_start=False)
    theirs = torchattacks.PGD(model, eps=args.eps, alpha=args.eps / 8, steps=20, random_start=False)
    t_ours = median_time(lambda: ours(model, x, y), device, args.repeats)
    t_theirs = median_time(lambda: theirs(x, y), device, args.repeats)
    x_ours, x_theirs = ours(model, x, y), theirs(x, y)
    with torch.no_grad():
        acc_ours = (model(x_ours).argmax(1) == y).float().mean().item()
        acc_theirs = (model(x_theirs).argmax(1) == y).float().mean().item()
    print(f"{args.checkpoint or args.arch}, batch {args.batch}, PGD-20: advews {t_ours:.4f} s, torchattacks {t_theirs:.4f} s, "
          f"ratio advews/torchattacks {t_ours / t_theirs:.3f}; robust accuracy {acc_ours:.4f} vs {acc_theirs:.4f}")


if __name__ == "__main__":
    main()
