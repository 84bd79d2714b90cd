"""Compare training runs across seeds: the logic behind ``advews-report``.

A run is an advews-train output directory: its operative ``config.gin``, its ``metrics.jsonl`` and the
JSON files that ``advews-eval --output`` wrote into it (attack evaluations and subnet analyses). Runs
whose configs agree up to the seed (``train.seed``) and output paths, or on the ``--group-by`` keys,
form a group; each metric is reported as mean and sample sd over the group's runs, and a group is
compared with a baseline by the paired difference over the seeds both have, with a Student-t 95% CI.
Accuracies and errors are held as fractions and printed in percent; the compute ledger's cost
columns (``evaluation.run_cost``: PFLOPs, device-hours, passes per example, the cost to reach a
validation robust accuracy) are printed in their own units.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from advews.errors import AdvewsError
from advews.evaluation.plots import read_metrics
from advews.evaluation.report_table import FORMATS, Comparison, Group, Report, Run, format_report
from advews.evaluation.run_cost import check_cost_to, is_cost, run_cost
from advews.evaluation.stats import summarize

SEED_KEY = "train.seed"
SUBNET_STATS = ("median", "p10", "mean", "p90")
DEFAULT_SUBNET_STATS = ("median", "p10")
_BINDING = re.compile(r"^([A-Za-z_][\w./@]*)\s*=\s*(.*)$")
_PLAIN_STRING = re.compile(r"'[^'\\]*'|\"[^\"\\]*\"")


def read_config(path: str) -> Dict[str, str]:
    """The bindings of an operative gin config (``key -> value text``, plain strings unquoted)."""
    if not os.path.isfile(path):
        raise AdvewsError(f"no config file {path} (is it an advews-train output directory?)")
    bindings: Dict[str, str] = {}
    last = None
    with open(path) as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#") or text.startswith(("import ", "from ")):
                continue
            match = None if line[0].isspace() else _BINDING.match(text)
            if match:
                last = match.group(1)
                bindings[last] = match.group(2).rstrip("\\").strip()
            elif last is not None:  # gin wraps long values: `key = \` then indented lines
                bindings[last] = (bindings[last] + " " + text.rstrip("\\").strip()).strip()
            else:
                raise AdvewsError(f"{path} line {n} is not a gin binding: {text[:60]!r}")
    if SEED_KEY not in bindings:
        raise AdvewsError(f"{path} has no {SEED_KEY} binding (is it an advews-train config?)")
    return {k: v[1:-1] if _PLAIN_STRING.fullmatch(v) else v for k, v in bindings.items()}


def attack_name(name: str, entry: Mapping) -> str:
    """Column name of one attack of an eval JSON: PGD-20, FGSM, AA, CW-50, APGD-CE-100, PGD-20x5-L2."""
    if name == "autoattack":
        version = entry.get("version", "standard")
        return "AA" if version == "standard" else f"AA-{version}"
    label = name.upper()
    if entry.get("steps") is not None and name != "fgsm":
        label += f"-{entry['steps']}"
    if entry.get("restarts", 1) > 1:
        label += f"x{entry['restarts']}"
    return label + ("-L2" if entry.get("norm") == "L2" else "")


def json_metrics(data: Mapping) -> Dict[str, float]:
    """The metrics of one ``advews-eval --output`` file (an evaluation or a subnet analysis); {} for
    any other JSON (an AutoAttack --state file, a user's own)."""
    if "clean_acc" in data and "attacks" in data:
        out = {"clean": data["clean_acc"]}
        names = [attack_name(k, v) for k, v in data["attacks"].items()]
        out.update({n: v["robust_acc"] for n, v in zip(names, data["attacks"].values())})
        if len(names) > 1:
            out[f"worst({','.join(names)})"] = data["robust_acc"]
        corruptions = data.get("corruptions") or {}
        out.update({name: corruptions[k] for k, name in (("mean_error", "corruption_error"), ("mce", "mCE"))
                    if k in corruptions})
        return out
    if "bn_modes" in data and "full" in data:
        out = {}
        for mode in data["bn_modes"]:
            per_mode = data if mode == "eval" else data.get("bn_train", {})
            for strategy, kinds in per_mode.items():
                if not (isinstance(kinds, dict) and isinstance(kinds.get("robust"), dict)):
                    continue
                for kind in ("robust", "clean"):
                    if strategy == "full":
                        out[f"full@{data['rho']:g}_{kind}_bn{mode}"] = kinds[kind]["mean"]
                        continue
                    for stat in SUBNET_STATS:
                        out[f"{strategy}@{data['rho']:g}_{kind}_{stat}_bn{mode}"] = kinds[kind][stat]
        return out
    return {}


def file_metrics(data: object, where: str) -> Dict[str, float]:
    """``json_metrics`` of one JSON file of a run directory; an advews-eval result with fields of the
    wrong type (edited or damaged) is refused in one line naming the file, rather than skipped: a
    table silently missing one seed's number would look complete."""
    if not isinstance(data, dict):
        return {}
    try:
        metrics = json_metrics(data)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as error:
        raise AdvewsError(f"{where} looks like an advews-eval result but its fields have the wrong types or are "
                          f"missing ({' '.join(str(error).split())}); fix it or move it out of the run directory") from None
    for name, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise AdvewsError(f"{where}: {name} must be a number, got {value!r}; fix the file or move it out of "
                              "the run directory")
    return metrics


AUDIT_FORMAT = "advews-audit/1"


def audit_flags(card: Mapping, where: str) -> List[str]:
    """The indicators an audit card flags (its verdict column in the table)."""
    rows = card.get("indicators")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("indicator"), str)
                                             for r in rows):
        raise AdvewsError(f"{where} is an audit card whose indicators are missing or of the wrong type; rerun "
                          "advews-eval --audit or move it out of the run directory")
    return [r["indicator"] for r in rows if r.get("flagged") is True]


def read_run(path: str, cost_to: Optional[float] = None) -> Run:
    """A run directory's config, seed and metrics: the final metrics.jsonl row's validation accuracies,
    the run's cost (``run_cost``, with the cost to reach ``cost_to`` percent val robust accuracy) and
    the metrics of every JSON file in the directory."""
    if not os.path.exists(path):
        raise AdvewsError(f"run directory {path} does not exist")
    if not os.path.isdir(path):
        raise AdvewsError(f"{path} is a file, not a run directory; give advews-train output directories "
                          "(the folder holding config.gin and metrics.jsonl)")
    bindings = read_config(os.path.join(path, "config.gin"))
    try:
        seed = int(bindings[SEED_KEY])
    except ValueError:
        raise AdvewsError(f"{path}: {SEED_KEY} = {bindings[SEED_KEY]} is not an integer") from None
    rows = read_metrics(os.path.join(path, "metrics.jsonl"))
    last = rows[-1]
    run = Run(path, bindings, seed, {})
    for key, name in (("val_clean_acc", "final_val_clean"), ("val_robust_acc", "final_val_robust")):
        if isinstance(last.get(key), (int, float)):
            run.metrics[name] = last[key]
    cost, run.not_reached = run_cost(rows, cost_to)
    run.metrics.update(cost)
    sources: Dict[str, str] = {}
    for file in sorted(f for f in os.listdir(path) if f.endswith(".json")):
        try:
            with open(os.path.join(path, file)) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise AdvewsError(f"cannot read {os.path.join(path, file)}: {e}") from None
        if isinstance(data, dict) and data.get("format") == AUDIT_FORMAT:
            run.audit = sorted(set(run.audit or []) | set(audit_flags(data, os.path.join(path, file))))
            continue
        for name, value in file_metrics(data, os.path.join(path, file)).items():
            if name in run.metrics and run.metrics[name] != value:
                run.conflicts[name] = (f"{path}: {sources[name]} and {file} disagree on {name} "
                                       f"({run.metrics[name]:.4g} vs {value:.4g}); keep one in the run directory")
            run.metrics.setdefault(name, value)
            sources.setdefault(name, file)
    return run


def _ignored(key: str) -> bool:
    """Bindings that do not make runs different methods: the seed and output locations."""
    return key == SEED_KEY or "output" in key.rsplit(".", 1)[-1]


def _group_runs(runs: Sequence[Run], group_by: Optional[Sequence[str]]) -> List[List[Run]]:
    """Runs grouped by config (minus seed and outputs) or by the ``group_by`` keys, in order of first appearance."""
    for key in group_by or ():
        if not any(key in r.bindings for r in runs):
            raise AdvewsError(f"unknown --group-by key {key!r}: no run's config.gin binds it")
    groups: Dict[Tuple, List[Run]] = {}
    for run in runs:
        if group_by:
            key = tuple(run.bindings.get(k) for k in group_by)
        else:
            key = tuple(sorted((k, v) for k, v in run.bindings.items() if not _ignored(k)))
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def _labels(shared: Sequence[Dict[str, str]], group_by: Optional[Sequence[str]]) -> List[str]:
    """Short labels from the bindings that tell the groups apart: those every group binds, plus those
    that differ among the groups binding them (EWS.rho between EWS runs, not against a vanilla run);
    while two labels coincide, the remaining differing key that separates most groups joins them."""
    if group_by:
        keys = list(group_by)
    else:
        differing = sorted({k for b in shared for k in b if len({b.get(k) for b in shared}) > 1},
                           key=lambda k: (not all(k in b for b in shared), k))
        keys = [k for k in differing if all(k in b for b in shared) or len({b[k] for b in shared if k in b}) > 1]

        def distinct(ks: List[str]) -> int:
            return len({tuple(b.get(k) for k in ks) for b in shared})

        while distinct(keys) < len(shared):
            keys.append(max((k for k in differing if k not in keys), key=lambda k: distinct(keys + [k])))
        if len(shared) == 1:
            keys = ["train.defense"]
    return [" ".join(f"{k}={b[k]}" for k in keys if k in b) or f"({', '.join(keys)} unset)" for b in shared]


def _find_group(groups: Sequence[Group], spec: str, option: str) -> Group:
    """The one group whose label is ``spec`` or whose shared bindings hold every ``key=value`` in it."""
    exact = [g for g in groups if g.label == spec]
    if exact:
        return exact[0]
    pairs = [p.split("=", 1) for p in spec.split()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise AdvewsError(f"{option} {spec!r} is neither a group label nor key=value pairs; groups: "
                          + "; ".join(g.label for g in groups))
    found = [g for g in groups if all(g.bindings.get(k) == v for k, v in pairs)]
    if len(found) != 1:
        raise AdvewsError(f"{option} {spec!r} matches {len(found)} groups, not one; groups: "
                          + "; ".join(g.label for g in groups))
    return found[0]


def _column(name: str) -> int:
    """Column block of a metric: clean, attacks (AutoAttack last), worst case, corruptions, final
    validation accuracies, subnets in BN eval mode, subnets in BN train mode, cost."""
    if is_cost(name):
        return 8
    if "@" in name:
        return 7 if name.endswith("_bntrain") else 6
    for block, prefixes in ((0, ("clean",)), (3, ("worst(",)), (4, ("corruption_error", "mCE")),
                            (5, ("final_val_",)), (2, ("AA",))):
        if name.startswith(prefixes):
            return block
    return 1


def _default_metric(name: str) -> bool:
    """Every metric but the subnet analyses' clean, mean, p90 and full-net numbers."""
    if "@" not in name:
        return True
    return not name.startswith("full@") and "_robust_" in name and name.split("_")[-2] in DEFAULT_SUBNET_STATS


def _paired(group: Group, baseline: Group, metrics: Sequence[str]) -> Comparison:
    by_seed = []
    for g in (group, baseline):
        seeds: Dict[int, Run] = {}
        for run in g.runs:
            if run.seed in seeds:
                raise AdvewsError(f"cannot pair group {g.label!r} by seed: {seeds[run.seed].path} and {run.path} "
                                  f"both have {SEED_KEY} = {run.seed}; group by more keys")
            seeds[run.seed] = run
        by_seed.append(seeds)
    common = sorted(set(by_seed[0]) & set(by_seed[1]))
    stats = {}
    for m in metrics:
        diffs = [by_seed[0][s].metrics[m] - by_seed[1][s].metrics[m] for s in common
                 if m in by_seed[0][s].metrics and m in by_seed[1][s].metrics]
        if diffs:
            stats[m] = summarize(diffs, paired=True)
    return Comparison(group.label, baseline.label, common, stats)


def compare_runs(
    run_dirs: Sequence[str], group_by: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None,
    baseline: Optional[str] = None, labels: Optional[Mapping[str, str]] = None, cost_to: Optional[float] = None,
) -> Report:
    """The numbers behind the table. ``metrics``: column names (default: every accuracy found, subnet
    analyses as robust median and p10, the cost columns); ``cost_to``: also the cost to reach this
    percent val robust accuracy (``evaluation.run_cost``); ``labels``: {new label: group label or 'key=value ...'};
    ``baseline``: the group the others are compared with (default: the first of exactly two)."""
    if not run_dirs:
        raise AdvewsError("no run directories given")
    if len({os.path.realpath(d) for d in run_dirs}) < len(run_dirs):
        raise AdvewsError("a run directory is given twice")
    runs = [read_run(d, cost_to) for d in run_dirs]
    # stable: first seen first; a cost-to-reach column no run reached still shows, as 'not reached'
    found = sorted(dict.fromkeys(m for r in runs for m in [*r.metrics, *r.not_reached]), key=_column)
    if metrics is None:
        metrics = [m for m in found if _default_metric(m)]
    for m in metrics:
        if m not in found:
            raise AdvewsError(f"unknown metric {m!r}; the runs have: {', '.join(found) or 'none'}")
    for run in runs:
        for m in metrics:
            if m in run.conflicts:
                raise AdvewsError(run.conflicts[m])
    grouped = _group_runs(runs, group_by)
    shared = [{k: v for k, v in g[0].bindings.items() if not _ignored(k) and all(r.bindings.get(k) == v for r in g)}
              for g in grouped]
    groups = [Group(label, b, g, {m: summarize([r.metrics[m] for r in g if m in r.metrics])
                                  for m in metrics if any(m in r.metrics for r in g)})
              for label, b, g in zip(_labels(shared, group_by), shared, grouped)]
    for new, spec in (labels or {}).items():
        _find_group(groups, spec, "--label").label = new
    if baseline is not None:
        base = _find_group(groups, baseline, "--baseline")
        comparisons = [_paired(g, base, metrics) for g in groups if g is not base]
    else:
        comparisons = [_paired(groups[1], groups[0], metrics)] if len(groups) == 2 else []
    return Report(list(metrics), groups, comparisons)


def report(
    run_dirs: Sequence[str], group_by: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None,
    fmt: str = "md", baseline: Optional[str] = None, labels: Optional[Mapping[str, str]] = None,
    cost_to: Optional[float] = None,
) -> str:
    """``compare_runs`` formatted as a table; the format and ``cost_to`` are checked before any run is read."""
    if fmt not in FORMATS:
        raise AdvewsError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cost_to = check_cost_to(cost_to)
    return format_report(compare_runs(run_dirs, group_by, metrics, baseline, labels, cost_to), fmt)
