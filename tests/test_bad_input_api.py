"""The Python API refuses a wrong argument in one line (issue 17, probe section 6).

Every public function of ``advews`` (train, load_model, evaluate, analyze_subnets) raises
``AdvewsError`` whose ``str`` is exactly one line naming the argument and the bad value, and changes
nothing on disk, where it used to raise a raw TypeError, KeyError or ValueError, or an AdvewsError
carrying gin's "In call to configurable" lines. A single str for ``gin_files`` or ``bindings`` is
read as one file or one binding (it used to be read letter by letter).
"""

from __future__ import annotations


import gin
import pytest
from test_bad_input import Bad, api, check_row

import advews
from advews.errors import AdvewsError

G = "run/last.pt"  # the world's good checkpoint
Q = ["quickstart.gin"]
NAN = float("nan")


def adv(name: str):
    """``advews.<name>`` as a user calls it, looked up when the row runs."""
    return lambda *args, **kwargs: (lambda: getattr(advews, name)(*args, **kwargs))


train, evaluate, load_model, analyze = adv("train"), adv("evaluate"), adv("load_model"), adv("analyze_subnets")

CASES = [
    # the probe's 15 raw exceptions
    api("PY01", evaluate(G, amp="fp8", n_examples=10), "--amp", "'fp8'", "bf16, fp16"),
    api("PY02", train(Q, output_dir=123), "output_dir", "123"),
    api("PY03", train([None]), "gin_files[0]", "None"),
    api("PY04", load_model(123), "path", "123"),
    api("PY05", evaluate(G, eps="abc"), "eps", "'abc'", "number"),
    api("PY06", evaluate(G, attacks=123), "attacks", "123"),
    api("PY07", evaluate(G, n_examples="10"), "n_examples", "'10'", "integer"),
    api("PY08", evaluate(G, steps=2.5), "steps", "2.5", "integer"),
    api("PY09", evaluate(object()), "model", "<object object", "nn.Module"),
    api("PY10", evaluate(G, seed="a"), "seed", "'a'"),
    api("PY11", analyze(G, rho="x"), "rho", "'x'"),
    api("PY12", evaluate(G, state=123), "state", "123"),
    api("PY13", analyze(G, n_subnets="2"), "n_subnets", "'2'"),
    api("PY14", evaluate(G, data=5), "data", "5"),
    api("PY15", evaluate(G, attacks="autoattack", version="custom", aa_attacks=5), "aa_attacks", "5"),
    # messages that were several lines (gin's) or misleading
    api("API01", train("nosuch_recipe.gin"), "'nosuch_recipe.gin'", forbid="'n'"),
    api("API03", train(Q, bindings="train.epochs = 0", output_dir="api03/run"), "train.epochs", "0", forbid="'t'"),
    api("API08", train(Q, bindings=["train.epochs = 'x'"], output_dir="api08/run"), "train.epochs", "'x'"),
    api("API39", train(Q, output_dir="/proc/advews_api39"), "/proc/advews_api39"),
    # bools that are not bools, and more wrong types and names
    api("PY16", train(Q, resume="yes", output_dir="run"), "resume", "'yes'", "True or False"),
    api("PY17", train(Q, quiet=1, output_dir="py17/run"), "quiet", "1"),
    api("PY18", evaluate(G, force="no"), "force", "'no'"),
    api("PY19", evaluate(G, fixed_batches=0), "fixed_batches", "0"),
    api("PY20", load_model(arch="small_preact_resnet", weights="net.pt", num_classes="10", data="dataset:mnist5k"),
        "num_classes", "'10'"),
    api("PY21", analyze(G, search=5), "search", "5"),
    api("PY22", analyze(G, figures=3.5), "figures", "3.5"),
    api("PY23", train(Q, bindings=["train.epochs = 1", 7]), "bindings[1]", "7"),
    api("PY24", train(Q, bindings={"train.epochs": 1}), "bindings", "{'train.epochs': 1}"),
    api("PY25", evaluate(G, batch_size=True), "batch_size", "True"),
]


def _id(case: Bad) -> str:
    return case.id


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_api_refuses_in_one_line_and_changes_nothing(case: Bad, world: str, monkeypatch, capfd) -> None:
    result = check_row(case, world, monkeypatch, capfd)
    assert len(str(result).strip().splitlines()) == 1, f"{case.id}: not one line: {str(result)!r}"


def test_a_single_str_is_one_gin_file_and_one_binding() -> None:
    """train('quickstart.gin', bindings='train.epochs = 1') means a list of one, not of letters."""
    from advews.api.arguments import train_arguments

    assert train_arguments("quickstart.gin", "train.epochs = 1", None, False, False, False) == (
        ["quickstart.gin"], ["train.epochs = 1"], None)


def test_gin_lines_are_removed_and_the_error_is_kept() -> None:
    """An AdvewsError subclass raised inside a configurable keeps its class and attributes (the
    CLI's exit code) but loses gin's lines."""
    from advews.api.arguments import public

    class Diverged(AdvewsError):
        exit_code = 3

    @gin.configurable("advews_test_raiser")
    def raiser(x: int = 0) -> None:
        err = Diverged(f"went non-finite at {x}")
        err.step = 7
        raise err

    with pytest.raises(Diverged) as info:
        public(lambda: raiser())()
    assert str(info.value) == "went non-finite at 0"
    assert info.value.exit_code == 3 and info.value.step == 7
