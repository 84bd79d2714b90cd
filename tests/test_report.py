"""advews-report on run directories written by hand with known numbers: grouping, mean/sd, the paired
difference and its t CI, the three formats, and one-line errors."""

import csv
import io
import json
import math
import subprocess
import sys

import pytest

from advews.cli.report import main as report_main
from advews.evaluation.report import compare_runs, report
from advews.evaluation.stats import t_quantile

# robust PGD-20 accuracy per seed; EWS has a seed the vanilla group lacks
AT_PGD = {0: 0.40, 1: 0.42, 2: 0.47}
EWS_PGD = {0: 0.43, 1: 0.44, 2: 0.52, 3: 0.60}


def make_run(root, name, seed, defense="AT", rho=None, pgd=0.4, clean=0.9, val=(0.8, 0.45), analysis=None):
    """A run directory as advews-train and advews-eval leave it: config.gin, metrics.jsonl, eval JSONs."""
    d = root / name
    d.mkdir()
    lines = ["import my_defense", "", "# Parameters for train:", "# " + "=" * 20, f"train.defense = '{defense}'",
             "train.epochs = 2", f"train.seed = {seed}", "", "# Parameters for model:",
             "model.options = \\", "    {'widths': (16, 32, 64),", "     'depth': 1}",  # as gin wraps values
             f"my_logger.output_dir = '/runs/{name}'"]
    if rho is not None:
        lines += [f"EWS.rho = {rho}", "EWS.interval = 10"]
    (d / "config.gin").write_text("\n".join(lines) + "\n")
    rows = [{"epoch": 1, "val_clean_acc": 0.1, "val_robust_acc": 0.05},
            {"epoch": 2, "val_clean_acc": val[0], "val_robust_acc": val[1]}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pgd_entry = {"robust_acc": pgd, "eps": 0.3, "norm": "Linf", "steps": 20, "step_size": 0.0375, "restarts": 1}
    (d / "pgd20.json").write_text(json.dumps({"checkpoint": str(d / "best.pt"), "attack": "pgd", "clean_acc": clean,
                                              "robust_acc": pgd, "n_examples": 1000, "attacks": {"pgd": pgd_entry}}))
    (d / "aa_state.json").write_text(json.dumps({"format": 1, "stages": []}))  # not an eval: ignored
    if analysis is not None:
        (d / "analysis.json").write_text(json.dumps(analysis))
    return str(d)


def subnet_analysis(median, p10, train_median):
    def summary(m, p):
        return {"mean": m, "p10": p, "median": m, "p90": m + 0.05, "n": 50, "values": [m] * 50}

    return {"rho": 0.7, "n_subnets": 50, "bn_modes": ["eval", "train"],
            "full": {"clean": summary(0.9, 0.9), "robust": summary(0.5, 0.5)},
            "random": {"clean": summary(0.8, 0.7), "robust": summary(median, p10)},
            "bn_train": {"random": {"clean": summary(0.85, 0.8), "robust": summary(train_median, 0.3)}},
            "block_vulnerability": {"full": {"clean": 0.1, "robust": 0.5}, "blocks": []}}


@pytest.fixture
def runs(tmp_path):
    at = [make_run(tmp_path, f"at{s}", s, pgd=v, analysis=subnet_analysis(0.2 + s / 100, 0.1, 0.3))
          for s, v in AT_PGD.items()]
    ews = [make_run(tmp_path, f"ews{s}", s, "AT_EWS", rho=0.9, pgd=v, analysis=subnet_analysis(0.3, 0.2, 0.4))
           for s, v in EWS_PGD.items()]
    return at + ews


def test_t_quantiles_match_tables():
    for df, expected in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (10**6, 1.9600)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    assert t_quantile(0.995, 1) == pytest.approx(63.6567, abs=1e-3)


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 61):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_grouping_ignores_seed_and_outputs_and_splits_on_config(runs, tmp_path):
    rep = compare_runs(runs)
    # EWS.rho is bound by one group only: train.defense already tells the two apart
    assert [g.label for g in rep.groups] == ["train.defense=AT", "train.defense=AT_EWS"]
    assert [[r.seed for r in g.runs] for g in rep.groups] == [[0, 1, 2], [0, 1, 2, 3]]
    assert rep.groups[0].bindings["model.options"] == "{'widths': (16, 32, 64), 'depth': 1}"
    assert "train.seed" not in rep.groups[0].bindings and rep.groups[1].bindings["EWS.rho"] == "0.9"
    other = make_run(tmp_path, "ews_rho07", 5, "AT_EWS", rho=0.7)
    labels = [g.label for g in compare_runs(runs + [other], metrics=["clean"]).groups]
    assert labels == ["train.defense=AT", "train.defense=AT_EWS EWS.rho=0.9", "train.defense=AT_EWS EWS.rho=0.7"]
    merged = compare_runs(runs + [other], group_by=["train.defense"], metrics=["clean"])
    assert [len(g.runs) for g in merged.groups] == [3, 5]
    assert [g.label for g in merged.groups] == ["train.defense=AT", "train.defense=AT_EWS"]


def test_mean_sd_and_paired_difference_by_hand(runs):
    rep = compare_runs(runs)
    at, ews = rep.groups
    assert at.stats["PGD-20"].n == 3 and at.stats["PGD-20"].mean == pytest.approx(0.43)
    assert at.stats["PGD-20"].sd == pytest.approx(math.sqrt(0.0026 / 2))  # deviations -3, -1, +4 points
    assert ews.stats["PGD-20"].n == 4 and ews.stats["PGD-20"].mean == pytest.approx(0.4975)
    assert ews.stats["PGD-20"].sd == pytest.approx(math.sqrt(0.018875 / 3))
    (diff,) = rep.comparisons
    assert (diff.group, diff.baseline, diff.seeds) == (ews.label, at.label, [0, 1, 2])  # seed 3 is unpaired
    d = diff.stats["PGD-20"]  # differences 0.03, 0.02, 0.05
    assert d.n == 3 and d.mean == pytest.approx(0.1 / 3) and d.sd == pytest.approx(math.sqrt(7 / 30000))
    half = 4.302653 * math.sqrt(7 / 30000) / math.sqrt(3)
    assert d.ci == pytest.approx((0.1 / 3 - half, 0.1 / 3 + half), abs=1e-6)
    assert d.ci == pytest.approx((-0.0046125, 0.0712791), abs=1e-6)
    assert diff.stats["clean"].mean == 0 and diff.stats["clean"].sd == 0
    assert at.stats["final_val_robust"].mean == pytest.approx(0.45)  # the last epoch's row, not the first


def test_columns_and_json_layouts(runs):
    rep = compare_runs(runs)
    assert rep.metrics == ["clean", "PGD-20", "final_val_clean", "final_val_robust",
                           "random@0.7_robust_median_bneval", "random@0.7_robust_p10_bneval",
                           "random@0.7_robust_median_bntrain", "random@0.7_robust_p10_bntrain"]
    at = rep.groups[0]
    assert at.stats["random@0.7_robust_median_bneval"].mean == pytest.approx(0.21)
    assert at.stats["random@0.7_robust_median_bntrain"].mean == pytest.approx(0.3)
    assert rep.comparisons[0].stats["random@0.7_robust_p10_bneval"].mean == pytest.approx(0.1)
    chosen = compare_runs(runs, metrics=["full@0.7_robust_bneval", "random@0.7_clean_mean_bntrain"])
    assert chosen.groups[0].stats["full@0.7_robust_bneval"].mean == pytest.approx(0.5)
    assert chosen.groups[0].stats["random@0.7_clean_mean_bntrain"].mean == pytest.approx(0.85)


def test_several_attacks_autoattack_and_worst_case(tmp_path):
    run = make_run(tmp_path, "r", 0)
    entries = {"pgd": {"robust_acc": 0.5, "steps": 10, "restarts": 3, "norm": "Linf"},
               "autoattack": {"robust_acc": 0.44, "version": "standard", "norm": "Linf"}}
    (tmp_path / "r" / "multi.json").write_text(json.dumps({"clean_acc": 0.9, "robust_acc": 0.43, "attacks": entries}))
    rep = compare_runs([run])
    assert rep.metrics[:5] == ["clean", "PGD-10x3", "PGD-20", "AA", "worst(PGD-10x3,AA)"]  # files by name
    assert rep.groups[0].stats["worst(PGD-10x3,AA)"].mean == pytest.approx(0.43)
    assert rep.groups[0].label == "train.defense=AT" and rep.comparisons == []


def test_disagreeing_evaluations_are_refused(tmp_path):
    run = make_run(tmp_path, "r", 0, clean=0.9)
    (tmp_path / "r" / "last.json").write_text(json.dumps({"clean_acc": 0.8, "robust_acc": None, "attacks": {}}))
    with pytest.raises(Exception, match="last.json.*pgd20.json|pgd20.json.*last.json"):
        compare_runs([run])
    assert compare_runs([run], metrics=["PGD-20"]).groups[0].stats["PGD-20"].mean == pytest.approx(0.4)


def test_markdown_table(runs):
    text = report(runs)
    lines = text.splitlines()
    assert lines[0].startswith("| method | seeds | clean | PGD-20 |")
    assert lines[2].startswith("| train.defense=AT | 0,1,2 | 90.00 ± 0.00 | 43.00 ± 3.61 |")
    assert lines[3].startswith("| train.defense=AT_EWS | 0,1,2,3 | 90.00 ± 0.00 | 49.75 ± 7.93 |")
    assert lines[4].startswith("| Δ train.defense=AT_EWS vs train.defense=AT (paired, n=3) | 0,1,2 |")
    assert "+3.33 [-0.46, +7.13]" in lines[4] and "95% CI, Student t" in lines[-1]


def test_one_seed_has_no_sd(tmp_path):
    rows = list(csv.reader(io.StringIO(report([make_run(tmp_path, "r", 5, pgd=0.4)], metrics=["PGD-20"], fmt="csv"))))
    assert rows == [["method", "seeds", "PGD-20"], ["train.defense=AT", "5", "40.00 (n=1)"]]


def test_csv_and_latex(runs):
    rows = list(csv.reader(io.StringIO(report(runs, fmt="csv", metrics=["PGD-20", "final_val_clean"]))))
    assert rows[0] == ["method", "seeds", "PGD-20", "final_val_clean"]
    assert rows[1] == ["train.defense=AT", "0,1,2", "43.00 ± 3.61", "80.00 ± 0.00"]
    assert rows[3][2] == "+3.33 [-0.46, +7.13]" and len(rows) == 4
    tex = report(runs, fmt="latex", metrics=["PGD-20"], labels={"EWS (authors)": "EWS.rho=0.9"})
    assert r"\begin{tabular}{lcc}" in tex and r"\toprule" in tex and tex.rstrip().endswith(r"\end{tabular}")
    assert r"method & seeds & PGD-20 \\" in tex
    assert r"train.defense=AT & 0,1,2 & 43.00 $\pm$ 3.61 \\" in tex
    assert r"$\Delta$ EWS (authors) vs train.defense=AT (paired, n=3) & 0,1,2 & +3.33 [-0.46, +7.13] \\" in tex
    assert "final\\_val" in report(runs, fmt="latex", metrics=["final_val_clean"])


def test_baseline_and_labels(runs, tmp_path):
    other = make_run(tmp_path, "ews_rho07", 1, "AT_EWS", rho=0.7, pgd=0.45)
    rep = compare_runs(runs + [other], metrics=["PGD-20"], baseline="train.defense=AT",
                       labels={"vanilla": "train.defense=AT"})
    assert [c.group for c in rep.comparisons] == ["train.defense=AT_EWS EWS.rho=0.9",
                                                  "train.defense=AT_EWS EWS.rho=0.7"]
    assert {c.baseline for c in rep.comparisons} == {"vanilla"}
    assert rep.comparisons[1].seeds == [1] and rep.comparisons[1].stats["PGD-20"].mean == pytest.approx(0.03)
    assert compare_runs(runs + [other], metrics=["PGD-20"]).comparisons == []  # three groups, no baseline
    assert "Δ" not in report(runs + [other], metrics=["PGD-20"]) and "--baseline" in report(runs + [other])


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (code, err)
    return err


def test_bad_input_is_a_one_line_error(runs, tmp_path, capsys):
    (tmp_path / "no_metrics").mkdir()
    (tmp_path / "no_metrics" / "config.gin").write_text("train.seed = 0\n")
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    for args, needle in [
        ([], "no run directories"),
        ([str(tmp_path / "no_metrics")], "metrics.jsonl"),
        ([str(tmp_path / "no_config")], "config.gin"),
        ([str(tmp_path / "missing")], "missing"),
        ([runs[0], "--format", "html"], "'html'"),
        ([runs[0], "--metrics", "clean,PGD-50"], "'PGD-50'"),
        ([runs[0], "--group-by", "EWS.rhoo"], "'EWS.rhoo'"),
        ([*runs, "--baseline", "train.defense=MART"], "'train.defense=MART'"),
        ([*runs, "--label", "noequals"], "'noequals'"),
        ([runs[0], runs[0]], "twice"),
    ]:
        assert needle in one_line_error(capsys, report_main(args)), args


def test_unpairable_seeds_are_refused(runs, tmp_path, capsys):
    twin = make_run(tmp_path, "at0_again", 0)
    err = one_line_error(capsys, report_main([*runs, twin, "--metrics", "clean"]))
    assert "train.seed = 0" in err and "at0_again" in err


def test_console_script(runs):
    out = subprocess.run([sys.executable, "-m", "advews.cli.report", *runs, "--format", "csv", "--metrics", "PGD-20"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[1] == "train.defense=AT,\"0,1,2\",43.00 ± 3.61"
    bad = subprocess.run([sys.executable, "-m", "advews.cli.report", "--format", "xml"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "advews-report: error: unknown format 'xml'; choose one of md, csv, latex"


def _card(flags):
    rows = [{"indicator": name, "flagged": name in flags, "figures": {}, "finding": "", "meaning": ""}
            for name in ("gradients", "unbounded", "noise")]
    return {"format": "advews-audit/1", "verdict": "x", "indicators": rows, "clean_acc": 0.9, "robust_acc": 0.4}


def test_audit_verdict_column(tmp_path):
    """The verdict of each run's audit card (advews-eval --audit) is a column: pass, or the flags and
    how many of the audited seeds raised them; runs without a card leave the column out."""
    at = [make_run(tmp_path, f"at{s}", s) for s in range(3)]
    ews = [make_run(tmp_path, f"ews{s}", s, "AT_EWS", rho=0.9) for s in range(3)]
    for i, d in enumerate(at):
        (tmp_path / f"at{i}" / "audit.json").write_text(json.dumps(_card([])))
    for i, flags in enumerate([["gradients"], [], ["gradients", "noise"]]):
        (tmp_path / f"ews{i}" / "audit.json").write_text(json.dumps(_card(flags)))
    text = report(at + ews, metrics=["PGD-20"])
    header, _, at_row, ews_row = text.splitlines()[:4]
    assert header.startswith("| method | seeds | audit | PGD-20 |")
    assert "| pass |" in at_row
    assert "FLAG gradients 2/3, noise 1/3" in ews_row
    (tmp_path / "ews2" / "audit.json").unlink()
    assert "FLAG gradients 1/2" in report(at + ews, metrics=["PGD-20"]).splitlines()[3]
    plain = [make_run(tmp_path, f"p{s}", s) for s in range(2)]
    assert "audit" not in report(plain, metrics=["PGD-20"]).splitlines()[0]
    (tmp_path / "p0" / "audit.json").write_text(json.dumps({"format": "advews-audit/1", "indicators": 3}))
    with pytest.raises(Exception, match="audit card whose indicators"):
        report(plain, metrics=["PGD-20"])
