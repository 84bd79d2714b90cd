"""Bad input to advews-eval's --state and --merge, and to advews-report: one line, exit 2, nothing changed.

Rows of probe 2026-12-05 (M14, M18, M19 of section 2; RP05, RP08 of section 11) and more of the same
kind (ES*): state files edited by hand (flags flipped, fields retyped or missing), of an older format,
or of another evaluation's data, given to --merge or to a resumed shard; an advews-report run
directory holding an eval JSON of the wrong types, or a file given as the run directory. The state
files are made once (module fixture) by real shards in the shared bad-input world, under es/.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict

import pytest
from bad_input_world import snapshot
from test_bad_input import Bad, check_row, ev

from advews.cli.report import main as report_main

SHARD = ("--checkpoint", "run/last.pt", "--n-examples", "20", "--attack", "pgd", "--steps", "1", "--batch-size", "10",
         "--shards", "2")
GOOD = ("es/s.shard0of2.json", "es/s.shard1of2.json")


def _edit(change: Callable[[Dict[str, Any]], None]) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    def edited(state: Dict[str, Any]) -> Dict[str, Any]:
        change(state)
        return state
    return edited


def _set(key: str, value: Any) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    return _edit(lambda s: s.__setitem__(key, value))


def _drop(key: str) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    return _edit(lambda s: s.pop(key, None))


def _flip(s: Dict[str, Any]) -> None:
    s["attacks"]["pgd"]["robust"] = "1" * len(s["attacks"]["pgd"]["robust"])


EDITS = {  # file name -> how shard 1's good state was edited
    "m14": _edit(_flip),
    "m18": _set("shard", "1"),
    "m19": _drop("labels"),
    "seed": _edit(lambda s: s["identity"].__setitem__("seed", "0")),
    "start": _set("start", -3),
    "clean": _set("clean", "10"),
    "robust": _edit(lambda s: s["attacks"]["pgd"].__setitem__("robust", 7)),
    "nohash": _drop("hash"),
    "old": _set("format", "advews-eval-state/1"),
    "progress": _set("progress", []),
    "identity": _set("identity", []),
    "labels": _set("labels", ["a"] * 10),
}


@pytest.fixture(scope="module", autouse=True)
def states(world):
    """es/s.shard{0,1}of2.json from real shards; es/<edit>.json and the resume copy es/r.shard1of2.json."""
    from advews.cli.eval import main as eval_main

    es = os.path.join(world, "es")
    if os.path.isdir(es):
        return
    cwd = os.getcwd()
    os.chdir(world)
    try:
        os.makedirs("es")
        for i in (0, 1):
            assert eval_main([*SHARD, "--shard", str(i), "--state", "es/s.json"]) == 0
        good = json.loads(open(GOOD[1]).read())
        for name, edit in EDITS.items():
            open(f"es/{name}.json", "w").write(json.dumps(edit(json.loads(json.dumps(good)))))
        shutil.copy("es/m14.json", "es/r.shard1of2.json")
        shutil.copy(GOOD[1], "es/d.shard1of2.json")
        bad = os.path.join("es", "rp05")  # RP05: a run directory with an eval JSON of the wrong types
        shutil.copytree("run", bad)
        open(os.path.join(bad, "eval.json"), "w").write(json.dumps({"clean_acc": 0.5, "attacks": 3}))
        bad = os.path.join("es", "rp05b")
        shutil.copytree("run", bad)
        open(os.path.join(bad, "eval.json"), "w").write(json.dumps({"clean_acc": "high", "attacks": {}}))
    finally:
        os.chdir(cwd)


def merge(id: str, name: str, *needles: str) -> Bad:
    return ev(id, ("--merge", GOOD[0], f"es/{name}.json"), *needles)


EVAL = [
    merge("M14", "m14", "es/m14.json", "edited or damaged"),
    merge("M18", "m18", "es/m18.json", "'shard'", "'1'"),
    merge("M19", "m19", "es/m19.json", "'labels'", "missing"),
    merge("ES01", "seed", "identity.seed", "'0'"),
    merge("ES02", "start", "'start'", "-3"),
    merge("ES03", "clean", "'clean'", "10 '0'/'1' flags"),
    merge("ES04", "robust", "attacks.pgd.robust", "7"),
    merge("ES05", "nohash", "'hash'", "missing"),
    merge("ES06", "old", "es/old.json", "older advews", "advews-eval-state/1"),
    merge("ES07", "progress", "'progress'", "[]"),
    merge("ES08", "identity", "'identity'", "an object"),
    merge("ES09", "labels", "'labels'", "integer labels"),
    # the same refusals when a shard resumes from the file
    ev("ES10", SHARD + ("--shard", "1", "--state", "es/r.json"), "es/r.shard1of2.json", "edited or damaged"),
    # shard 1 resumed on other data of the same size: its content, not its name, is the identity
    ev("ES11", SHARD + ("--shard", "1", "--state", "es/d.json", "--data", "npz:ok.npz"), "es/d.shard1of2.json",
       "the evaluated data differs"),
]


@pytest.mark.parametrize("case", EVAL, ids=lambda c: c.id)
def test_bad_state_is_one_line_and_changes_nothing(case: Bad, world: str, monkeypatch, capfd) -> None:
    check_row(case, world, monkeypatch, capfd)


REPORT = [
    ("RP05", ["run", "es/rp05"], ("es/rp05/eval.json", "wrong types")),
    ("RP05b", ["run", "es/rp05b"], ("es/rp05b/eval.json", "clean", "'high'")),
    ("RP08", ["run", "ok.npz"], ("ok.npz is a file, not a run directory",)),
]


@pytest.mark.parametrize("id, argv, needles", REPORT, ids=[r[0] for r in REPORT])
def test_bad_report_input_is_one_line(id, argv, needles, world, monkeypatch, capfd) -> None:
    monkeypatch.chdir(world)
    capfd.readouterr()
    before = snapshot(world)
    assert report_main(argv) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(world) == before
