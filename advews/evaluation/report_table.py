"""The table of ``advews-report``: the data it is made of (runs, groups, paired comparisons) and its
cells and formats (markdown, CSV, LaTeX). Accuracies print in percent, cost columns
(``evaluation.run_cost``) in their own units."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from advews.evaluation.run_cost import NOTE, format_cost, is_cost
from advews.evaluation.stats import Stat

FORMATS = ("md", "csv", "latex")


@dataclass
class Run:
    path: str
    bindings: Dict[str, str]
    seed: int
    metrics: Dict[str, float]
    conflicts: Dict[str, str] = field(default_factory=dict)  # metric -> why two files disagree on it
    audit: Optional[List[str]] = None  # the flags of its audit card (advews-eval --audit); [] = none raised
    not_reached: List[str] = field(default_factory=list)  # cost-to-reach columns the run never reached


@dataclass
class Group:
    label: str
    bindings: Dict[str, str]  # those every run of the group shares
    runs: List[Run]
    stats: Dict[str, Stat]


@dataclass
class Comparison:
    """``group`` minus ``baseline``, paired by seed."""
    group: str
    baseline: str
    seeds: List[int]
    stats: Dict[str, Stat]


@dataclass
class Report:
    metrics: List[str]
    groups: List[Group]
    comparisons: List[Comparison]


def _audit_cell(runs: Sequence[Run]) -> str:
    """'pass' when every audited run raised no indicator, else the flags and how many runs raised them."""
    audited = [r for r in runs if r.audit is not None]
    if not audited:
        return "-"
    counted = "" if len(audited) == len(runs) else f" (n={len(audited)})"
    flags = sorted({f for r in audited for f in r.audit or []})
    if not flags:
        return "pass" + counted
    return "FLAG " + ", ".join(f"{f} {sum(f in (r.audit or []) for r in audited)}/{len(audited)}" for f in flags)


def _cell(stat: Optional[Stat], n_runs: int, signed: bool = False, cost: bool = False) -> str:
    """``mean ± sd`` of a group, ``+diff [CI]`` of a comparison; (n=k) when one value or fewer than n_runs;
    ``cost``: a cost column, in its own unit."""
    if stat is None:
        return "-"
    if cost:
        text = format_cost(stat.mean, stat.sd, stat.ci, signed)
        return text if stat.n == n_runs and stat.n > 1 else f"{text} (n={stat.n})"
    text = f"{100 * stat.mean:+.2f}" if signed else f"{100 * stat.mean:.2f}"
    if stat.ci is not None:
        text += f" [{100 * stat.ci[0]:+.2f}, {100 * stat.ci[1]:+.2f}]"
    elif stat.sd is not None:
        text += f" ± {100 * stat.sd:.2f}"
    return text if stat.n == n_runs and stat.n > 1 else f"{text} (n={stat.n})"


def _group_cell(g: Group, metric: str) -> str:
    """A group's cell; a cost-to-reach column says how many of its runs never reached it."""
    missed = sum(metric in r.not_reached for r in g.runs)
    if missed and metric not in g.stats:
        return "not reached" + ("" if missed == len(g.runs) else f" (n={missed})")
    text = _cell(g.stats.get(metric), len(g.runs), cost=is_cost(metric))
    return text + (f"; {missed} not reached" if missed else "")


def table_rows(rep: Report) -> List[List[str]]:
    """Header, one row per group, then one per paired comparison; cells in percent."""
    audit = any(r.audit is not None for g in rep.groups for r in g.runs)  # the verdict column, when audited
    rows = [["method", "seeds", *(["audit"] if audit else []), *rep.metrics]]
    for g in rep.groups:
        rows.append([g.label, ",".join(str(r.seed) for r in g.runs), *([_audit_cell(g.runs)] if audit else []),
                     *(_group_cell(g, m) for m in rep.metrics)])
    for c in rep.comparisons:
        rows.append([f"Δ {c.group} vs {c.baseline} (paired, n={len(c.seeds)})", ",".join(map(str, c.seeds)),
                     *([""] if audit else []),
                     *(_cell(c.stats.get(m), len(c.seeds), signed=True, cost=is_cost(m)) for m in rep.metrics)])
    return rows


def _note(rep: Report) -> str:
    note = "Percent; mean ± sample sd over seeds, (n=k) where only k runs have the value."
    if any(is_cost(m) for m in rep.metrics):
        note += NOTE
    if rep.comparisons:
        return note + " Δ rows: paired difference over the seeds both groups have, [95% CI, Student t]."
    return note + (" Pass --baseline GROUP for paired differences." if len(rep.groups) > 2 else "")


def _latex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def format_report(rep: Report, fmt: str = "md") -> str:
    """The table as markdown, CSV or LaTeX (booktabs)."""
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(table_rows(rep))
        return buf.getvalue()
    if fmt == "latex":
        rows = [[_latex_escape(c).replace("±", r"$\pm$").replace("Δ", r"$\Delta$") for c in row]
                for row in table_rows(rep)]
        body = [" & ".join(row) + r" \\" for row in rows]
        lines = [f"% {_note(rep)} Needs \\usepackage{{booktabs}}.",
                 r"\begin{tabular}{l" + "c" * (len(rows[0]) - 1) + "}", r"\toprule", body[0], r"\midrule",
                 *body[1:len(rep.groups) + 1]]
        if rep.comparisons:
            lines += [r"\midrule", *body[len(rep.groups) + 1:]]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
    rows = table_rows(rep)
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join(["---"] * (len(rows[0]) - len(rep.metrics)) + ["---:"] * len(rep.metrics)) + "|")
    return "\n".join(lines) + "\n\n" + _note(rep) + "\n"
