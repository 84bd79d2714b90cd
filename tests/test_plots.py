"""Figures: they are written, and the numbers they draw are the analysis' own numbers."""

import json

import numpy as np
import pytest
import torch

from advews.cli.plot import main as plot_main
from advews.errors import AdvewsError
from advews.evaluation.block_vulnerability import block_vulnerability, full_subnet, thin_block
from advews.evaluation.plots import plot_block_vulnerability, plot_subnet_boxes, plot_training_curves
from advews.evaluation.subnet_analysis import accuracy, analyze_subnets, summarize
from advews.models import build_model
from advews.subnets import keep_count, space_of

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_kb=10):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > min_kb * 1024, (path, len(data))


def synthetic_analysis(seed):
    gen = np.random.default_rng(seed)

    def strategies(center):
        return {s: {kind: summarize(gen.uniform(center - 0.2, center + 0.1, 12).tolist())
                    for kind in ("clean", "robust")}
                for s in ("random", "controller", "l1")}

    result = {"rho": 0.7, "full": {"clean": summarize([0.9]), "robust": summarize([0.5])}, **strategies(0.5)}
    result["bn_train"] = strategies(0.6)
    return json.loads(json.dumps(result))  # as advews-eval writes and the CLI reads it


def tiny_model():
    torch.manual_seed(0)
    return build_model({"arch": "small_preact_resnet", "options": {"widths": (4, 8, 8)},
                        "num_classes": 3, "in_channels": 3}).eval()


def check_boxes(drawn, results):
    for mode in ("eval", "train"):
        for kind in ("clean", "robust"):
            panel = drawn[mode][kind]
            for label, res in results:
                per_mode = res if mode == "eval" else res["bn_train"]
                stats = per_mode["random"][kind]
                box = panel["random"][label]
                for key in ("median", "p10", "p90"):
                    assert box[key] == pytest.approx(100 * stats[key])
                q1, q3 = np.percentile(100 * np.asarray(stats["values"]), [25, 75])
                assert (box["q1"], box["q3"]) == pytest.approx((q1, q3))
                assert panel["full"][label] == pytest.approx(100 * res["full"][kind]["mean"])
                for strategy in ("controller", "l1"):
                    if strategy in per_mode:
                        assert panel[strategy][label] == pytest.approx(100 * per_mode[strategy][kind]["median"])


def test_subnet_boxes_draw_the_analysis_numbers(tmp_path):
    results = [("AT", synthetic_analysis(0)), ("AT+EWS", synthetic_analysis(1))]
    path = tmp_path / "fig1.png"
    drawn = plot_subnet_boxes(results, str(path))
    assert_png(path)
    check_boxes(drawn, results)


def test_subnet_boxes_of_a_real_analysis(tmp_path):
    model = tiny_model()
    x, y = torch.rand(48, 3, 8, 8), torch.randint(0, 3, (48,))
    res = analyze_subnets(model, (x[:16], y[:16]), (x[16:], y[16:]), None, 0.5, n_subnets=4,
                          strategies=("random", "l1"), batch_size=64)
    res = json.loads(json.dumps(res))
    assert len(res["random"]["robust"]["values"]) == 4
    assert res["full"]["clean"]["values"] == [res["full"]["clean"]["mean"]]
    drawn = plot_subnet_boxes([("tiny", res)], str(tmp_path / "fig1.png"))
    check_boxes(drawn, [("tiny", res)])
    assert "controller" not in drawn["eval"]["clean"]


def test_subnet_boxes_need_raw_values(tmp_path):
    res = synthetic_analysis(0)
    del res["random"]["clean"]["values"]
    with pytest.raises(AdvewsError, match="per-subnet values") as err:
        plot_subnet_boxes([("old", res)], str(tmp_path / "x.png"), bn_modes=("eval",))
    assert "\n" not in str(err.value)


def test_thin_block_changes_only_its_block():
    space = space_of(tiny_model())
    full = full_subnet(space)
    for i in range(len(space.blocks)):
        sub = thin_block(space, i, 0.5, torch.Generator().manual_seed(i))
        sub.check(space)
        assert [b for b in range(len(space.blocks)) if sub.channels[b] != full.channels[b]] == [i]
        widths = [[len(layer) for layer in path] for path in sub.channels[i]]
        assert widths == [[keep_count(c, 0.5) for c in space.shape()[i][p]] for p in sub.paths[i]]


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_block_vulnerability_and_its_figure(tmp_path, bn):
    model = tiny_model()
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 3, (32,))
    x_adv = (x + 0.05 * torch.randn_like(x).sign()).clamp(0, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = block_vulnerability(model, x, y, x_adv, rho=0.5, n_samples=3, bn=bn, seed=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BN statistics untouched
    assert not model.training
    res = json.loads(json.dumps(res))
    assert res == json.loads(json.dumps(block_vulnerability(model, x, y, x_adv, 0.5, 3, bn, seed=1)))
    assert [b["name"] for b in res["blocks"]] == [b.name for b in space_of(model).blocks]
    assert all(b[kind]["n"] == 3 for b in res["blocks"] for kind in ("clean", "robust"))
    if bn == "eval":
        assert res["full"]["clean"] == pytest.approx(1 - accuracy(model, x, y))
    path = tmp_path / "fig7.png"
    drawn = plot_block_vulnerability(res, str(path))
    assert_png(path)
    for kind in ("clean", "robust"):
        assert drawn[kind]["mean"] == pytest.approx([100 * b[kind]["mean"] for b in res["blocks"]])
        assert drawn[kind]["full"] == pytest.approx(100 * res["full"][kind])


METRICS = [
    {"epoch": 1, "lr": 0.1, "train_loss": 2.1, "train_acc": 0.3, "val_clean_acc": 0.4, "val_robust_acc": 0.1,
     "train_ews_kl": 0.01, "train_search_reward_mean": -0.2, "train_search_baseline": -0.1},
    {"epoch": 2, "lr": 0.1, "train_loss": 1.5, "train_acc": 0.5, "val_clean_acc": 0.6, "val_robust_acc": 0.3,
     "train_ews_kl": 0.03, "train_ews_subnet_acc": 0.45},
    {"epoch": 3, "lr": 0.01, "train_loss": 1.2, "train_acc": 0.6, "val_clean_acc": 0.7, "val_robust_acc": 0.35,
     "train_ews_kl": 0.02, "train_search_reward_mean": -0.4, "train_search_baseline": -0.15},
]


def write_run(tmp_path, rows=METRICS):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_training_curves_draw_the_metrics(tmp_path):
    drawn = plot_training_curves(METRICS, str(tmp_path / "curves.png"))
    assert drawn["accuracy (%)"]["val_robust_acc"] == {"epoch": [1, 2, 3], "value": pytest.approx([10, 30, 35])}
    assert drawn["EWS KL term"]["train_ews_kl"]["value"] == pytest.approx([0.01, 0.03, 0.02])
    # a metric logged only on some epochs is drawn at those epochs
    assert drawn["controller reward"]["train_search_reward_mean"] == {"epoch": [1, 3], "value": [-0.2, -0.4]}
    assert drawn["accuracy (%)"]["train_ews_subnet_acc"] == {"epoch": [2], "value": [45.0]}


def test_plot_cli_training_curves(tmp_path, capsys):
    run = write_run(tmp_path)
    assert plot_main([str(run)]) == 0
    assert_png(run / "training_curves.png")
    out = tmp_path / "figs"
    assert plot_main([str(run), "--output", str(out)]) == 0
    assert_png(out / "training_curves.png")
    assert "training_curves.png" in capsys.readouterr().out


@pytest.mark.parametrize("case, needle", [("missing", "no run directory"), ("no_metrics", "no metrics file"),
                                          ("empty", "is empty"), ("garbage", "line 2 is not JSON"),
                                          ("nothing", "nothing to plot")])
def test_plot_cli_one_line_errors(tmp_path, capsys, case, needle):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (run / "metrics.jsonl").write_text("\n")
    if case == "garbage":
        (run / "metrics.jsonl").write_text(json.dumps(METRICS[0]) + "\n{oops\n")
    assert plot_main([] if case == "nothing" else [str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_plot_cli_subnet_figures(tmp_path):
    a, b = synthetic_analysis(0), synthetic_analysis(1)
    model = tiny_model()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,))
    b["block_vulnerability"] = block_vulnerability(model, x, y, x, 0.5, n_samples=2)
    for name, res in (("at", a), ("at_ews", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(res))
    out = tmp_path / "figs"
    assert plot_main(["--subnets", str(tmp_path / "at.json"), str(tmp_path / "at_ews.json"),
                      "--output", str(out)]) == 0
    assert_png(out / "subnets.png")
    assert_png(out / "at_ews_block_vulnerability.png")
    assert not (out / "at_block_vulnerability.png").exists()
