"""Malformed gin is one line, exit 2, and nothing created (issue 17, probe section 7).

Include cycles and values nested thousands deep used to print RecursionError tracebacks thousands
of lines long; an undefined macro dumped the whole config; an unterminated string, a negative model
width (which also left an empty run directory) and a string where a defense expects a number
crashed. Each row writes its gin files into a fresh directory, runs ``advews-train --gin FILE
--output out/x`` there in-process, and checks exit 2, one line on stderr naming the problem, no
traceback, and that the directory is exactly as before. One row also runs as a real process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, Tuple

import pytest
from bad_input_world import snapshot
from test_bad_input import Bad, check_outcome, run_case

from advews.api.config import parse_gin

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("--gin-param", "data.train_limit = 128", "--gin-param", "data.val_size = 64", "--gin-param",
        "train.epochs = 1", "--quiet", "--output", "out/x")
DEEP = "[" * 5000 + "]" * 5000


@dataclass(frozen=True)
class GinCase:
    """``files`` written into the working directory, then ``advews-train ARGS`` run there."""

    id: str
    args: Tuple[str, ...]
    needles: Tuple[str, ...]
    files: Dict[str, str] = field(default_factory=dict)


def gp(*bindings: str) -> Tuple[str, ...]:
    return tuple(a for b in bindings for a in ("--gin-param", b))


QS = ("--gin", "quickstart.gin")
QE = ("--gin", "quickstart_ews.gin")

CASES = [
    GinCase("MG01", ("--gin", "self_a.gin", "--output", "out/x"), ("include cycle: self_a.gin includes itself",),
            {"self_a.gin": "include 'self_a.gin'\n"}),
    GinCase("MG02", ("--gin", "a.gin", "--output", "out/x"), ("include cycle: a.gin -> b.gin -> a.gin",),
            {"a.gin": "include 'b.gin'\n", "b.gin": "train.epochs = 1\ninclude 'a.gin'\n"}),
    GinCase("BG01", QS + gp("include 'c1.gin'") + TINY, ("include cycle: c1.gin -> c2.gin -> c3.gin -> c1.gin",),
            {"c1.gin": "include 'c2.gin'\n", "c2.gin": "include \"c3.gin\"\n", "c3.gin": "include 'c1.gin'\n"}),
    GinCase("MG15", ("--gin", "deep.gin", "--output", "out/x"), ("deep.gin", "nested too deeply"),
            {"deep.gin": f"train.epochs = {DEEP}\n"}),
    GinCase("BG02", QS + gp(f"train.epochs = {DEEP}") + TINY, ("--gin-param", "nested too deeply")),
    GinCase("MG08", QS + gp("train.seed = %UNDEFINED") + TINY,
            ("undefined macro %UNDEFINED", "train.seed = %UNDEFINED")),
    GinCase("BG03", ("--gin", "macro.gin") + TINY, ("undefined macro %SEED", "macro.gin"),
            {"macro.gin": "include 'quickstart.gin'\ntrain.seed = %SEED\n"}),
    GinCase("MG20", QS + gp('train.epochs = """x') + TINY, ("train.epochs", "unterminated")),
    GinCase("BG04", ("--gin", "open.gin") + TINY, ("open.gin",), {"open.gin": "train.epochs = [1, 2\n"}),
    GinCase("MG17", QS + gp("model.options = {'widths': (16, -1, 64)}") + TINY,
            ("model.options widths must be positive integers, got (16, -1, 64)",)),
    GinCase("BG06", QS + gp("model.options = {'dropout': 1.5}") + TINY, ("dropout", "1.5")),
    GinCase("BG08", QS + gp("model.options = {'blocks_per_stage': 0}") + TINY, ("blocks_per_stage", "0")),
    GinCase("BG09", QS + gp("model.options = [16, 32]") + TINY, ("model.options", "[16, 32]")),
    GinCase("MG35", QE + gp("EWS.rho = 'a'") + TINY, ("EWS.rho must be a number in (0, 1], got 'a'",)),
    GinCase("BG10", QE + gp("EWS.lam = 'x'") + TINY, ("EWS.lam", "'x'")),
    GinCase("BG11", QE + gp("EWS.interval = 2.5") + TINY, ("EWS.interval", "2.5")),
    GinCase("BG12", QE + gp("EWS.controller_lr = -1.0") + TINY, ("EWS.controller_lr", "-1.0")),
    GinCase("BG14", QS + gp("AT.eps = 'a'") + TINY, ("AT.eps", "'a'")),
    GinCase("BG15", QS + gp("AT.steps = '3'") + TINY, ("AT.steps", "'3'")),
    GinCase("BG16", QS + gp("AT.mix_alpha = 'a'") + TINY, ("mix_alpha", "'a'")),
    GinCase("BG17", QS + gp("AT.label_smoothing = 'a'") + TINY, ("label_smoothing", "'a'")),
    GinCase("BG18", QS + gp("train.defense = 'TRADES'", "TRADES.beta = 'b'") + TINY, ("TRADES.beta", "'b'")),
    GinCase("BG19", QS + gp("train.defense = 'MART'", "MART.beta = -1.0") + TINY, ("MART.beta", "-1.0")),
    GinCase("BG20", QS + gp("train.defense = 'AT_AWP'", "AWP.gamma = 'g'") + TINY, ("AWP.gamma", "'g'")),
    GinCase("BG21", QS + gp("train.defense = 'AugMix'", "AugMix.severity = 's'") + TINY, ("AugMix.severity", "'s'")),
]


def _run(case: GinCase, root: str, capfd) -> Tuple[object, str]:
    return run_case(Bad(case.id, "train", case.args, case.needles), capfd)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_gin_is_one_line_and_creates_nothing(case: GinCase, tmp_path, monkeypatch, capfd) -> None:
    for name, text in case.files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    capfd.readouterr()
    before = snapshot(str(tmp_path))
    result, err = _run(case, str(tmp_path), capfd)
    check_outcome(Bad(case.id, "train", case.args, case.needles), result, err)
    assert snapshot(str(tmp_path)) == before


def test_bad_gin_end_to_end(tmp_path) -> None:
    """A real process: stderr holds one line, not 3,271 lines of RecursionError."""
    case = next(c for c in CASES if c.id == "MG01")
    for name, text in case.files.items():
        (tmp_path / name).write_text(text)
    before = snapshot(str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "advews.cli.train", *case.args], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert snapshot(str(tmp_path)) == before
    check_outcome(Bad(case.id, "train", case.args, case.needles), proc.returncode, proc.stderr)


def test_a_file_included_twice_is_not_a_cycle(tmp_path, monkeypatch) -> None:
    """A diamond (top includes left and right, both include base) parses: only a loop is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.gin").write_text("train.epochs = 3\n")
    (tmp_path / "left.gin").write_text("include 'base.gin'\n")
    (tmp_path / "right.gin").write_text("include 'base.gin'\ntrain.batch_size = 32\n")
    (tmp_path / "top.gin").write_text("include 'left.gin'\ninclude 'right.gin'\n")
    parse_gin(["top.gin"], [])
    import gin

    assert gin.query_parameter("train.epochs") == 3 and gin.query_parameter("train.batch_size") == 32
