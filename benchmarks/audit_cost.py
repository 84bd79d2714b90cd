"""Benchmark: the full audit (``advews.audit``: every indicator) vs one standard AutoAttack
(``advews.evaluate(..., attacks='autoattack')``) on the same model, examples, seed and batch size. The
audit's goal is a ratio <= 1: auditing an evaluation costs no more than running it. Wall and CPU time
(this process, all its threads) are printed; on a shared machine trust the CPU time.

Run from the repository root, e.g. ``python benchmarks/audit_cost.py --checkpoint runs/quickstart/best.pt
--n 200``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import advews
from advews.api.audit import audit
from common import machine


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="an advews checkpoint (or export)")
    p.add_argument("--n", type=int, default=200, help="examples audited and attacked")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        card, a_wall, a_cpu = timed(lambda: audit(args.checkpoint, n_examples=args.n, batch_size=args.batch,
                                                         seed=args.seed, output=f"{tmp}/audit.json"))
        aa, aa_wall, aa_cpu = timed(lambda: advews.evaluate(args.checkpoint, attacks="autoattack", n_examples=args.n,
                                                            batch_size=args.batch, seed=args.seed))
    print(f"audit        {a_wall:8.1f} s wall {a_cpu:8.1f} s CPU   verdict: {card['verdict']}")
    print(f"autoattack   {aa_wall:8.1f} s wall {aa_cpu:8.1f} s CPU   robust acc {100 * aa['robust_acc']:.2f}% "
          f"(audit's PGD-{card['settings']['steps']}: {100 * card['robust_acc']:.2f}%)")
    print(f"ratio audit / AutoAttack: {a_wall / aa_wall:.2f} wall, {a_cpu / aa_cpu:.2f} CPU (goal <= 1)")
    for row in card["indicators"]:
        print(f"  {row['indicator']:<14}{'n/a' if row['flagged'] is None else 'FLAG' if row['flagged'] else 'pass':<6}"
              f"{row['finding']}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
