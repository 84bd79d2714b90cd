"""Figures: subnet accuracy boxes (the paper's Fig. 1), per-block vulnerability (Fig. 7), training curves.

Each function draws on its own ``matplotlib.figure.Figure`` (no pyplot: no global backend or figure
state, safe in servers and tests), writes a PNG and returns the numbers read back from the drawn
artists, so a caller can check that a figure shows exactly the analysis' numbers. Accuracies and
errors are drawn, and returned, in percent.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure

from advews.errors import AdvewsError

KINDS = ("clean", "robust")
# search strategy -> (marker, colour, x offset from its checkpoint's box)
STRATEGY_MARKERS = {"controller": ("v", "tab:red", -0.3), "l1": ("D", "tab:green", 0.3)}


def _save(fig: Figure, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def _in_mode(result: Mapping, mode: str) -> Mapping:
    """The per-strategy results of one BN mode: eval at the top level, train under ``bn_train``."""
    return result if mode == "eval" else result.get("bn_train", {})


def _box(summary: Mapping) -> Dict[str, Any]:
    """bxp stats whose median and whiskers (p10, p90) are the analysis' own summary numbers."""
    if not summary.get("values"):
        raise AdvewsError("subnet analysis lacks per-subnet values (older advews-eval?): rerun --analysis subnets")
    v = 100 * np.asarray(summary["values"], dtype=float)
    lo, hi = 100 * summary["p10"], 100 * summary["p90"]
    q1, q3 = np.percentile(v, [25, 75])
    return {"med": 100 * summary["median"], "q1": q1, "q3": q3, "whislo": lo, "whishi": hi,
            "fliers": v[(v < lo) | (v > hi)]}


def plot_subnet_boxes(
    results: Sequence[Tuple[str, Mapping]], path: str, bn_modes: Sequence[str] = ("eval", "train"),
) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Fig. 1: random-subnet accuracy of each checkpoint as a box, the full net as a star.

    ``results``: (label, ``analyze_subnets`` result) per checkpoint, drawn side by side. One row of
    (clean, robust) panels per BN mode present; boxes span the quartiles, whiskers p10 to p90, dots
    beyond. Controller and l1 subnets, where analysed, are markers at their median. The full net is
    only measured with BN in eval mode, so the train-mode row repeats that star as the reference.
    Returns, per mode and kind, the drawn numbers by label: ``random`` {median, q1, q3, p10, p90},
    ``full`` and each strategy's marker.
    """
    labels = [label for label, _ in results]
    if not labels:
        raise AdvewsError("no subnet analysis to plot")
    if len(set(labels)) != len(labels):
        raise AdvewsError(f"checkpoint labels must be distinct, got {labels}")
    modes = [m for m in bn_modes if any("random" in _in_mode(r, m) for _, r in results)]
    if not modes:
        raise AdvewsError("no random-subnet results to plot: run --analysis subnets with random in --search")
    fig = Figure(figsize=(6.5 + 1.6 * len(labels), 3.8 * len(modes)), layout="constrained")
    axes = fig.subplots(len(modes), 2, squeeze=False)
    rhos = sorted({r.get("rho") for _, r in results if r.get("rho") is not None})
    fig.suptitle("random subnets" + (f" at rho {', '.join(map(str, rhos))}" if rhos else ""))
    drawn: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for row, mode in enumerate(modes):
        for col, kind in enumerate(KINDS):
            ax = axes[row, col]
            panel: Dict[str, Any] = {}
            boxed = [(x, label, _box(_in_mode(r, mode)["random"][kind]))
                     for x, (label, r) in enumerate(results, 1) if "random" in _in_mode(r, mode)]
            art = ax.bxp([s for _, _, s in boxed], positions=[x for x, _, _ in boxed], widths=0.45,
                         medianprops={"color": "tab:blue"}, flierprops={"markersize": 3})
            panel["random"] = {
                label: {"median": float(art["medians"][k].get_ydata()[0]),
                        "q1": float(art["boxes"][k].get_ydata()[0]), "q3": float(art["boxes"][k].get_ydata()[2]),
                        "p10": float(art["whiskers"][2 * k].get_ydata()[1]),
                        "p90": float(art["whiskers"][2 * k + 1].get_ydata()[1])}
                for k, (_, label, _) in enumerate(boxed)
            }
            full = [(x, label, 100 * r["full"][kind]["mean"]) for x, (label, r) in enumerate(results, 1) if "full" in r]
            name = "full net" if mode == "eval" else "full net (BN eval)"
            panel["full"] = _scatter(ax, full, 0.0, marker="*", s=160, color="gold", edgecolors="black",
                                     zorder=3, label=name)
            for strategy, (marker, color, dx) in STRATEGY_MARKERS.items():
                pts = [(x, label, 100 * _in_mode(r, mode)[strategy][kind]["median"])
                       for x, (label, r) in enumerate(results, 1) if strategy in _in_mode(r, mode)]
                if pts:
                    panel[strategy] = _scatter(ax, pts, dx, marker=marker, s=45, color=color, zorder=3,
                                               label=f"{strategy} subnets (median)")
            ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20 if len(labels) > 3 else 0)
            ax.set_xlim(0.4, len(labels) + 0.6)
            ax.set_ylabel(f"{kind} accuracy (%)")
            ax.set_title(f"{kind}, BN {mode} mode")
            ax.grid(axis="y", alpha=0.3)
            if col == len(KINDS) - 1:  # one legend per row, outside the data
                ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
            drawn.setdefault(mode, {})[kind] = panel
    _save(fig, path)
    return drawn


def _scatter(ax, points: List[Tuple[int, str, float]], dx: float, **style) -> Dict[str, float]:
    """Draw (x, label, y) points shifted by dx; returns {label: y} read back from the artist."""
    if not points:
        return {}
    art = ax.scatter([x + dx for x, _, _ in points], [y for _, _, y in points], **style)
    return {label: float(xy[1]) for (_, label, _), xy in zip(points, art.get_offsets())}


def plot_block_vulnerability(result: Mapping, path: str) -> Dict[str, Any]:
    """Fig. 7: per block, the mean error with only that block thinned (bars), each sampled subnet's
    error (dots) and the full net's error (dashed line), clean and robust side by side.

    ``result``: a ``block_vulnerability`` result. Returns the drawn numbers: block names and, per
    kind, the bar heights (``mean``) and the full-net line (``full``), in percent.
    """
    blocks = result.get("blocks") or []
    if not blocks:
        raise AdvewsError("block vulnerability result has no blocks to plot")
    kinds = [k for k in KINDS if k in result["full"]]
    names = [b["name"][len("model."):] if b["name"].startswith("model.") else b["name"] for b in blocks]
    x = np.arange(len(blocks))
    width = 0.8 / len(kinds)
    fig = Figure(figsize=(max(4.0, 0.55 * len(blocks) + 1.5) + 3.0, 4.2), layout="constrained")
    ax = fig.subplots()
    drawn: Dict[str, Any] = {"blocks": names}
    for j, (kind, color) in enumerate(zip(kinds, ("tab:blue", "tab:orange"))):
        xk = x + (j - (len(kinds) - 1) / 2) * width
        bars = ax.bar(xk, [100 * b[kind]["mean"] for b in blocks], width, color=color, alpha=0.75,
                      label=f"{kind}: one block thinned (mean)")
        for xi, b in zip(xk, blocks):
            values = b[kind].get("values", [])
            ax.scatter([xi] * len(values), [100 * v for v in values], s=8, color="black", alpha=0.5, zorder=3)
        line = ax.axhline(100 * result["full"][kind], color=color, linestyle="--", label=f"{kind}: full net")
        drawn[kind] = {"mean": [float(p.get_height()) for p in bars], "full": float(line.get_ydata()[0])}
    ax.set_xticks(x, names, rotation=45 if len(blocks) > 6 else 0, ha="right" if len(blocks) > 6 else "center")
    ax.set_ylabel("error (%)")
    ax.set_title(f"error with only one block thinned to rho {result.get('rho')}\n"
                 f"{result.get('n_samples')} random subnets per block (dots), BN {result.get('bn')} mode")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)
    return drawn


# (panel title, y scale, ((metrics.jsonl key, legend label), ...))
CURVE_PANELS = (
    ("accuracy (%)", 100.0, (("train_acc", "train"), ("val_clean_acc", "val clean"), ("val_robust_acc", "val robust"),
                             ("train_ews_subnet_acc", "distilled subnet (train)"),
                             ("train_search_subnet_acc", "searched subnets (train)"))),
    ("training loss", 1.0, (("train_loss", "total loss"),)),
    ("EWS KL term", 1.0, (("train_ews_kl", "KL(full || subnet)"),)),
    ("controller reward", 1.0, (("train_search_reward_mean", "reward = -subnet acc"),
                                ("train_search_baseline", "baseline"))),
    ("learning rate", 1.0, (("lr", "lr at epoch start"),)),
)


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The rows of an advews-train ``metrics.jsonl``; one-line errors for a missing, empty or bad file."""
    if not os.path.isfile(path):
        raise AdvewsError(f"no metrics file {path} (is it an advews-train output directory?)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AdvewsError(f"{path} line {n} is not JSON: {e.msg}") from None
            if not isinstance(row, dict) or "epoch" not in row:
                raise AdvewsError(f"{path} line {n} is not a metrics row (no epoch)")
            rows.append(row)
    if not rows:
        raise AdvewsError(f"{path} is empty: no epoch has finished yet")
    return rows


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str) -> Dict[str, Dict[str, Dict[str, List[float]]]]:
    """Per-epoch curves of a training run: accuracies, loss, EWS KL, controller reward, learning rate.

    Panels and series appear only for metrics the rows hold (a run without EWS has no KL panel).
    Returns {panel title: {metric key: {"epoch": [...], "value": [...]}}} read back from the lines.
    """
    panels = []
    for title, scale, series in CURVE_PANELS:
        present = []
        for key, label in series:
            pts = [(r["epoch"], r[key]) for r in rows if _number(r.get(key))]
            if pts:
                present.append((key, label, pts))
        if present:
            panels.append((title, scale, present))
    if not panels:
        raise AdvewsError("metrics rows hold none of the plotted metrics")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    drawn: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    for ax, (title, scale, present) in zip(axes, panels):
        drawn[title] = {}
        for key, label, pts in present:
            (line,) = ax.plot([e for e, _ in pts], [scale * v for _, v in pts], marker="o", markersize=3, label=label)
            drawn[title][key] = {"epoch": [float(e) for e in line.get_xdata()],
                                 "value": [float(v) for v in line.get_ydata()]}
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(present) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    _save(fig, path)
    return drawn
