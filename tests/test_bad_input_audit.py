"""Bad input to ``advews-eval --audit``: one line, exit 2, nothing written (no card, no state), in the
shared bad-input world (tests/conftest.py ``world``), as the other bad-input tables."""

from __future__ import annotations

import pytest
from test_bad_input import G, check_row, ev

A = G + ("--audit",)
ROWS = [
    ev("AU01", A + ("--audit-indicators", "magic"), "'magic'", "--audit-indicators"),
    ev("AU02", A + ("--audit-sweep", "0,1,0.5"), "0, 1, 0.5", "increasing"),
    ev("AU03", A + ("--audit-sweep", "a,b"), "'a,b'"),
    ev("AU04", A + ("--best-of", "0"), "--best-of", "0"),
    ev("AU05", A + ("--eot", "-1"), "--eot", "-1"),
    ev("AU06", A + ("--square-queries", "0"), "--square-queries"),
    ev("AU07", A + ("--surrogate", "nosuch.pt"), "nosuch.pt"),
    ev("AU08", A + ("--surrogate", "text.pt"), "text.pt"),
    ev("AU09", A + ("--bpda", "nosuchmodule"), "nosuchmodule"),
    ev("AU10", A + ("--attack", "pgd"), "--attack"),
    ev("AU11", A + ("--shards", "2", "--shard", "0"), "--state"),
    ev("AU12", A + ("--output", "existing.json"), "existing.json", "--force"),
    ev("AU13", A + ("--audit-sweep", "0,0.5,0.5"), "0, 0.5, 0.5"),
    ev("AU14", A + ("--eps", "0"), "eps", "0"),
    ev("AU15", A + ("--state", "s.json"), "s.json", "not an audit state file"),
    ev("AU16", A + ("--state", "afile/x.json"), "afile/x.json", "--state"),
    ev("AU17", A + ("--output", "afile/card.json"), "afile/card.json", "--output"),
]


@pytest.mark.parametrize("case", ROWS, ids=lambda c: c.id)
def test_bad_audit_input_is_one_line_and_writes_nothing(case, world, monkeypatch, capfd):
    check_row(case, world, monkeypatch, capfd)
