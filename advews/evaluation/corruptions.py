"""Common-corruption benchmarks behind one entry point (``run_corruption_benchmark``) and the
scoring they share.

Three sources: the official CIFAR-10/100-C arrays (``cifar_c``), the ImageNet-C folders with
AlexNet-normalised mCE (``imagenet_c``), and corruptions generated for any dataset and cached
(``generated_corruptions``). Errors are fractions in [0, 1]: per (corruption, severity), per
corruption averaged over the severities evaluated, and ``mean_error`` over every evaluated pair,
unnormalised (the CIFAR-C metric).
"""

from __future__ import annotations

import os
from typing import Optional

from torch import nn

from advews.data.arrays import ArrayDataset
from advews.errors import AdvewsError
from advews.evaluation.corruption_scoring import (  # noqa: F401  (re-exported: the names users import)
    CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, SPEC_FORMS, Device, check_limit,
)

def run_corruption_benchmark(
    model: nn.Module,
    spec: str,
    *,
    default_dataset: Optional[ArrayDataset] = None,
    cache_dir: Optional[str] = None,
    batch_size: int = 256,
    device: Device = None,
    n_examples: Optional[int] = None,
    num_workers: int = 0,
    seed: int = 0,
) -> dict:
    """The benchmark ``spec`` names (``SPEC_FORMS``), for the CLI's ``--corruptions``.

    ``n_examples`` limits each (corruption, severity) to its first N images (generated: the first
    N of ``default_dataset``, the checkpoint dataset's test split). Generated corruptions are
    cached in ``cache_dir`` under a name derived from the source images and ``seed``, so another
    dataset or limit gets its own file and a rerun reads instead of recomputing. Each benchmark's
    module is imported only when named, so CIFAR-C never loads numba, OpenCV or h5py.
    """
    check_limit(n_examples, "n_examples")
    kind, _, arg = spec.partition(":")
    if kind in ("cifar10-c", "cifar100-c", "imagenet-c") and arg:
        if kind == "imagenet-c":
            from advews.evaluation.imagenet_c import evaluate_imagenet_c

            return evaluate_imagenet_c(model, arg, batch_size=batch_size, device=device,
                                       num_workers=num_workers, n_per_severity=n_examples)
        from advews.evaluation.cifar_c import evaluate_cifar_c

        result = evaluate_cifar_c(model, arg, n_per_severity=n_examples, batch_size=batch_size, device=device)
        return {**result, "benchmark": kind}
    if kind == "generated" and (arg or ":" not in spec):
        if not isinstance(default_dataset, ArrayDataset) or cache_dir is None:
            raise AdvewsError("generated corruptions need an in-memory test split (default_dataset) and a "
                              "cache_dir; for ImageNet use imagenet-c:DIR")
        from advews.evaluation.generated_corruptions import (
            cache_name,
            evaluate_generated,
            generate_corruptions,
        )

        data = default_dataset
        if n_examples is not None:
            data = data.subset(range(min(n_examples, len(data))))
        corruptions = arg.split(",") if arg else None
        cache = generate_corruptions(data, os.path.join(cache_dir, cache_name(data, seed)),
                                     corruptions=corruptions, seed=seed)
        return evaluate_generated(model, cache, batch_size=batch_size, device=device)
    raise AdvewsError(f"bad corruption benchmark {spec!r}; use {SPEC_FORMS}")


def format_table(result: dict) -> str:
    """A corruption x severity table of errors in %, with means (and CE / mCE for ImageNet-C)."""
    severities = result["severities"]
    has_ce = "mce" in result
    lines = [f"{result['benchmark']} from {result['source']}: {result['n_examples']} images evaluated"]
    header = f"{'corruption':<18}" + "".join(f"{'s' + str(s):>8}" for s in severities) + f"{'mean':>8}"
    lines.append(header + (f"{'CE':>8}" if has_ce else ""))
    for name, row in result["corruptions"].items():
        cells = "".join(f"{100 * row['errors'][s]:>7.2f}%" for s in severities)
        line = f"{name:<18}{cells}{100 * row['mean_error']:>7.2f}%"
        lines.append(line + (f"{100 * row['ce']:>7.2f}%" if has_ce else ""))
    pairs = len(result["corruptions"]) * len(severities)
    lines.append(f"mean error {100 * result['mean_error']:.2f}% (unnormalised, over {pairs} corruption-severity pairs)")
    if has_ce:
        lines.append(f"mCE {100 * result['mce']:.2f}% (CE normalised by AlexNet's errors, averaged over corruptions)")
    return "\n".join(lines)
