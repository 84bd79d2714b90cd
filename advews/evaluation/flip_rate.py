"""Perturbation stability (Hendrycks & Dietterich, 2019, Table 3): flip probability and top-5
distance on CIFAR-P / ImageNet-P sequences (read by ``advews.data.perturbation_sets``).

Both metrics compare each frame after the first with a reference frame: the previous one, or for
the noise sequences (not temporally related) the first, clean one. Per sequence they are averaged
over its T - 1 comparisons, then over the sequences, exactly as ``flip_prob`` and ``ranking_dist``
of hendrycks/robustness ImageNet-P/test.py and cifar-p-eval.py compute them at difficulty 1 (the
default of both scripts and the only difficulty evaluated here):

- flip probability: the fraction of comparisons whose top-1 prediction differs;
- top-5 distance: with sigma(i) the rank, in the compared frame, of the class ranked i in the
  reference frame (ranks from 1, ties broken by class index as scipy's ``rankdata(..., 'ordinal')``
  does), the sum over i = 1..5 of |i - min(sigma(i), 6)|: 0 when the top-5 list is unchanged,
  15 when it is replaced.

mFR / mT5D divide each perturbation's value by a baseline's and average the ratios. The paper's
baseline is AlexNet, but hendrycks/robustness holds no per-perturbation AlexNet values (neither
its tree nor its history; ImageNet-P/test.py computes them for torchvision's AlexNet weights
``alexnet-owt-4df8aa71.pth`` and prints them), so the baseline is an argument: the
``"perturbations"`` of an earlier result, e.g. torchvision's AlexNet run through this function on
the same data. Values are fractions / raw distances; x100 gives the % the paper quotes.
"""

from __future__ import annotations

import itertools
import sys
from collections import deque
from typing import Deque, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from advews.data.perturbation_sets import PERTURBATIONS, PerturbationSet, is_noise
from advews.errors import AdvewsError
from advews.evaluation.corruption_scoring import Device, check_limit, eval_mode

TOP = 5


def reference_frames(n_frames: int, noise: bool) -> Tensor:
    """The frame each of frames 1..T-1 is compared with: the first for noise, else the previous."""
    if noise:
        return torch.zeros(n_frames - 1, dtype=torch.long)
    return torch.arange(n_frames - 1)


def top5_distances(reference: Tensor, compared: Tensor) -> Tensor:
    """Top-5 distance between the class rankings of the score rows ``reference`` and ``compared``
    (both (..., C), C >= 5), one value per row: see the module docstring."""
    top = reference.sort(dim=-1, descending=True, stable=True).indices[..., :TOP]
    order = compared.sort(dim=-1, descending=True, stable=True).indices
    positions = torch.arange(1, compared.shape[-1] + 1, device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    sigma = ranks.gather(-1, top).clamp(max=TOP + 1)
    return (torch.arange(1, TOP + 1, device=sigma.device) - sigma).abs().sum(-1)


def sequence_metrics(scores: Tensor, noise: bool) -> Tuple[float, float]:
    """(flip probability, top-5 distance) of one sequence's class scores (T, C), averaged over
    its T - 1 comparisons."""
    reference = reference_frames(len(scores), noise).to(scores.device)
    predictions = scores.argmax(1)
    flips = (predictions[1:] != predictions[reference]).float().mean()
    distance = top5_distances(scores[reference], scores[1:]).float().mean()
    return float(flips), float(distance)


def evaluate_flip_rates(
    model: nn.Module,
    data: PerturbationSet,
    *,
    batch_size: int = 256,
    device: Device = None,
    baseline: Optional[Mapping[str, Mapping[str, float]]] = None,
) -> dict:
    """Flip probability and top-5 distance of ``model`` (fed [0, 1] NCHW floats) on each
    perturbation of ``data``, their means, and with a ``baseline`` (an earlier result's
    ``"perturbations"``) the normalised rates and their means mFR / mT5D.

    Frames of consecutive sequences are batched together up to ``batch_size``; the model runs in
    eval mode without gradients. A progress bar per perturbation shows on a terminal only.
    """
    check_limit(batch_size, "batch_size")
    if baseline is not None:
        _check_baseline(baseline, data.perturbations)
    results = {}
    with eval_mode(model), torch.no_grad():
        for name in data.perturbations:
            noise = is_noise(name)
            flips, distances = [], []
            sequences = _progress(data.sequences(name), name, data.n_sequences(name))
            for scores in _scores(model, sequences, batch_size, device):
                flip, distance = sequence_metrics(scores, noise)
                flips.append(flip)
                distances.append(distance)
            results[name] = {
                "flip_probability": float(np.mean(flips)),
                "top5_distance": float(np.mean(distances)),
                "n_sequences": len(flips),
                "compared_with": "first frame" if noise else "previous frame",
            }
            if baseline is not None:
                results[name]["flip_rate"] = results[name]["flip_probability"] / baseline[name]["flip_probability"]
                results[name]["top5_rate"] = results[name]["top5_distance"] / baseline[name]["top5_distance"]
    rows = results.values()
    return {
        "benchmark": data.benchmark,
        "source": data.root,
        "n_sequences": sum(r["n_sequences"] for r in rows),
        "standard_set": set(results) == set(PERTURBATIONS),
        "perturbations": results,
        "mean_flip_probability": float(np.mean([r["flip_probability"] for r in rows])),
        "mean_top5_distance": float(np.mean([r["top5_distance"] for r in rows])),
        "mfr": float(np.mean([r["flip_rate"] for r in rows])) if baseline is not None else None,
        "mt5d": float(np.mean([r["top5_rate"] for r in rows])) if baseline is not None else None,
    }


def format_flip_table(result: dict) -> str:
    """A perturbation table in % (flip probability, normalised rates when there are any) and T5D."""
    normalised = result["mfr"] is not None
    lines = [f"{result['benchmark']} from {result['source']}: {result['n_sequences']} sequences evaluated",
             f"{'perturbation':<16}{'FP':>9}{'T5D':>9}" + (f"{'FR':>9}{'T5D/base':>10}" if normalised else "")]
    for name, row in result["perturbations"].items():
        line = f"{name:<16}{100 * row['flip_probability']:>8.2f}%{row['top5_distance']:>9.3f}"
        lines.append(line + (f"{100 * row['flip_rate']:>8.2f}%{100 * row['top5_rate']:>9.2f}%" if normalised else ""))
    lines.append(f"mean flip probability {100 * result['mean_flip_probability']:.2f}%, "
                 f"mean top-5 distance {result['mean_top5_distance']:.3f}")
    if normalised:
        lines.append(f"mFR {100 * result['mfr']:.2f}%, mT5D {100 * result['mt5d']:.2f}% (normalised by the baseline)")
    if not result["standard_set"]:
        lines.append(f"not the paper's Table 3 set ({', '.join(PERTURBATIONS)}): means are not comparable to it")
    return "\n".join(lines)


def _scores(model: nn.Module, sequences: Iterable[np.ndarray], batch_size: int, device: Device) -> Iterator[Tensor]:
    """Each sequence's class scores (T, C) on the CPU. Frames run in full batches that may span
    sequences (31-frame videos would otherwise leave a part batch every few calls)."""
    waiting: List[np.ndarray] = []  # frames not run yet
    lengths: Deque[int] = deque()  # frame counts of the sequences not returned yet
    parts: List[Tensor] = []  # scores of their frames run so far
    for sequence in itertools.chain(sequences, [None]):
        if sequence is not None:
            waiting.append(sequence)
            lengths.append(len(sequence))
        n_waiting = sum(map(len, waiting))
        if n_waiting >= batch_size or (sequence is None and n_waiting):
            frames = np.concatenate(waiting)
            n_run = n_waiting if sequence is None else n_waiting - n_waiting % batch_size
            parts += [_forward(model, frames[i:i + batch_size], device) for i in range(0, n_run, batch_size)]
            waiting = [frames[n_run:]]
        while lengths and sum(map(len, parts)) >= lengths[0]:
            scored, n = torch.cat(parts), lengths.popleft()
            yield scored[:n]
            parts = [scored[n:]]


def _forward(model: nn.Module, frames: np.ndarray, device: Device) -> Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    if device is not None:
        x = x.to(device, non_blocking=True)  # moved as uint8, a quarter of the bytes
    scores = model(x.float().div_(255)).float().cpu()
    if scores.ndim != 2 or scores.shape[1] < TOP:
        raise AdvewsError(f"flip rates need class scores (frames, classes >= {TOP}) for the top-5 distance; "
                          f"the model returned shape {tuple(scores.shape)}")
    return scores


def _progress(sequences: Iterator[np.ndarray], name: str, total: int) -> Iterable[np.ndarray]:
    if not sys.stderr.isatty():
        return sequences
    from tqdm import tqdm

    return tqdm(sequences, desc=name, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


def _check_baseline(baseline: Mapping[str, Mapping[str, float]], names: Tuple[str, ...]) -> None:
    for name in names:
        row = baseline.get(name, {})
        values = [row.get("flip_probability"), row.get("top5_distance")]
        if not all(isinstance(v, (int, float)) and v > 0 for v in values):
            raise AdvewsError(f"the baseline needs positive 'flip_probability' and 'top5_distance' for {name!r}, "
                              f"got {dict(row) or 'nothing'}; pass an earlier result's 'perturbations'")
