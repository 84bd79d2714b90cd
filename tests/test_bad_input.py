"""Bad input never ends in a traceback or a changed disk.

A table of bad inputs to advews-train, advews-eval and the Python API (the rows of the probe table
shared/probes/bad-input-2026-12.md, under their ids, plus more). Each must give exit code 2 (an
AdvewsError for the API) with exactly one line on stderr that names the bad value, no traceback, no
warning, and must leave every file in the working directory as it was: nothing created, changed or
removed (a run directory that could not start is not left behind, a malicious pickle runs no code).
The CLIs run in-process through ``main(argv)``; a few rows also run as real processes.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Tuple, Union

import pytest
import torch
from bad_input_world import snapshot

from advews.cli.data import main as data_main
from advews.cli.eval import main as eval_main
from advews.cli.export import main as export_main
from advews.cli.train import main as train_main
from advews.data import ArrayDataset
from advews.errors import AdvewsError

Q = ("--gin", "quickstart.gin", "--gin-param", "train.epochs = 1", "--gin-param", "data.train_limit = 256",
     "--gin-param", "data.val_size = 64")
QE = ("--gin", "quickstart_ews.gin") + Q[2:]
G = ("--checkpoint", "run/last.pt", "--n-examples", "20")  # a good checkpoint, as the probes' $G
ARCH = ("--arch", "small_preact_resnet", "--data", "dataset:mnist5k", "--eps", "0.3", "--n-examples", "20")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@dataclass(frozen=True)
class Bad:
    """One bad input: ``args`` of the tool (a callable for the API), the texts the error line must
    hold (the bad value), and a text a clear message must not hold (a known misleading one)."""

    id: str
    tool: str
    args: Union[Tuple[str, ...], Callable[[], object]]
    needles: Tuple[str, ...]
    forbid: str = ""


def gp(binding: str) -> Tuple[str, ...]:
    return ("--gin-param", binding)


def train(id: str, args: Tuple[str, ...], *needles: str, forbid: str = "") -> Bad:
    return Bad(id, "train", tuple(args), needles, forbid)


def ev(id: str, args: Tuple[str, ...], *needles: str, forbid: str = "") -> Bad:
    return Bad(id, "eval", tuple(args), needles, forbid)


def api(id: str, call: Callable[[], object], *needles: str, forbid: str = "") -> Bad:
    return Bad(id, "api", call, needles, forbid)


def out(id: str) -> Tuple[str, ...]:
    """A run directory of its own, in a folder of its own: a failed start must leave neither behind."""
    return ("--output", f"{id.lower()}/run")


TRAIN = [
    train("T01", ("--gin", "nosuch.gin") + out("T01"), "nosuch.gin"),
    train("T02", ("--gin", "syntax.gin") + out("T02"), "syntax.gin"),
    train("T03", Q + gp("train.epochs = = 3") + out("T03"), "train.epochs", forbid="quickstart.gin"),
    train("T04", ("--gin", "unknown_binding.gin") + out("T04"), "no_such_arg"),
    train("T05", Q + gp("nosuchthing.x = 1") + out("T05"), "nosuchthing", forbid="quickstart.gin"),
    train("T06", Q + gp("train.defense = 'Magic'") + out("T06"), "'Magic'"),
    train("T07", Q + gp("model.arch = 'resnet9000'") + out("T07"), "resnet9000"),
    train("T08", Q + gp("AT.eps = -0.1") + out("T08"), "eps", "-0.1"),
    train("T09", Q + gp("AT.steps = 0") + out("T09"), "steps", "0"),
    train("T10", Q + gp("AT.steps = -3") + out("T10"), "steps", "-3"),
    train("T11", Q + gp("AT.step_size = -0.05") + out("T11"), "step_size", "-0.05"),
    train("T12", QE + gp("EWS.rho = 0.0") + out("T12"), "rho", "0.0"),
    train("T13", QE + gp("EWS.rho = 1.5") + out("T13"), "rho", "1.5"),
    train("T14", QE + gp("EWS.lam = -1.0") + out("T14"), "lam", "-1.0"),
    train("T15", QE + gp("EWS.interval = 0") + out("T15"), "interval", "0"),
    train("T16", QE + gp("EWS.search = 'magic'") + out("T16"), "magic"),
    train("T17", Q + gp("train.batch_size = 0") + out("T17"), "batch_size", "0"),
    train("T18", Q + gp("train.batch_size = -64") + out("T18"), "batch_size", "-64"),
    train("T19", Q + gp("train.batch_size = 100000") + out("T19"), "100000"),
    train("T20", Q + gp("train.epochs = 0") + out("T20"), "epochs", "0"),
    train("T21", Q + gp("train.epochs = 'ten'") + out("T21"), "epochs", "ten"),
    train("T22", Q + gp("train.epochs = 1.5") + out("T22"), "epochs", "1.5"),
    train("T23", Q + gp("optimizer.lr = 0.0") + out("T23"), "lr", "0.0"),
    train("T24", Q + gp("optimizer.lr = float('nan')") + out("T24"), "optimizer.lr", forbid="quickstart.gin"),
    train("T25", Q + gp("optimizer.name = 'rmsprop'") + out("T25"), "rmsprop"),
    train("T26", Q + gp("schedule.name = 'linear'") + out("T26"), "linear"),
    train("T27", Q + ("--output", "precious_run"), "precious_run"),
    train("T28", Q + ("--output", "afile/run"), "afile/run"),
    train("T29", Q + ("--output", "/proc/advews_run"), "/proc/advews_run"),
    train("T31", Q + ("--resume",), "--output"),
    train("T32", (), "--gin"),
    train("T33", Q + gp("data.dataset = 'cifar10'") + gp("data.root = '/nonexistent'") + out("T33"), "/nonexistent"),
    train("T34", Q + gp("data.dataset = 'cifar10'") + gp("data.root = 'cifar_evil'") + out("T34"), "cifar_evil"),
    train("T35", Q + gp("data.dataset = 'cifar10'") + gp("data.root = 'cifar_trunc'") + out("T35"), "cifar_trunc"),
    train("T36", Q + gp("data.dataset = 'mnist'") + out("T36"), "'mnist'"),
    train("T37", Q + gp("data.extra_data = 'extra_evil.pickle'") + out("T37"), "extra_evil.pickle"),
    train("T38", Q + gp("data.extra_data = 'extra_float.npz'") + out("T38"), "extra_float.npz", "float32"),
    train("T39", Q + gp("data.extra_data = 'extra_oor.npz'") + out("T39"), "extra_oor.npz", "99"),
    train("T40", Q + gp("data.extra_data = 'extra_shape.npz'") + out("T40"), "extra_shape.npz", "(3, 32, 32)"),
    train("T41", Q + gp("data.extra_data = 'extra_keys.npz'") + out("T41"), "extra_keys.npz"),
    train("T42", Q + gp("data.train_limit = 0") + out("T42"), "train_limit", "0"),
    train("T43", Q + gp("data.val_size = 100000") + out("T43"), "val_size", "100000"),
    pytest.param(train("T44", Q + gp("train.device = 'cuda'") + out("T44"), "cuda"), marks=NO_GPU),
    train("T45", Q + gp("train.amp = 'fp8'") + out("T45"), "fp8"),
    train("T46", Q + gp("AT.norm = 'L3'") + out("T46"), "L3"),
    train("T47", ("--gin", "empty.gin") + out("T47"), "CIFAR-10"),
    train("T48", Q + gp("data.extra_data = 'extra_ok.npz'") + gp("data.extra_fraction = 1.5") + out("T48"),
          "extra_fraction", "1.5"),
    train("T49", Q + gp("data.extra_data = 'corrupt.npz'") + out("T49"), "corrupt.npz"),
    train("T50", ("--output", "r50", "--resume"), "r50/last.pt"),
    train("T51", ("--output", "r51", "--resume"), "r51/last.pt"),
    train("T53", ("--gin", "quickstart_ews.gin", "--output", "r53", "--resume"), "AT_EWS"),
    train("T55", ("--output", "r55", "--resume"), "r55/last.pt"),
    train("T56", Q + gp("train.epochs = __import__('os').system('touch PWNED')") + out("T56"), "train.epochs",
          forbid="quickstart.gin"),
    # checkpoints a resume cannot use: each message must say what is wrong with the file
    train("T59", ("--output", "r_text", "--resume"), "r_text/last.pt", forbid=": 101"),
    train("T60", ("--output", "r_empty", "--resume"), "r_empty/last.pt", forbid="EOFError"),
    train("T61", ("--output", "r_dir", "--resume"), "r_dir/last.pt", forbid="not found"),
    train("T62", ("--output", "r_flip", "--resume"), "r_flip/last.pt"),
    train("T63", ("--bogus",), "--bogus"),
    train("T64", Q + gp("data.crop_fill = 300") + out("T64"), "crop_fill", "300"),
    train("T65", Q + gp("data.crop_fill = 128") + out("T65"), "crop_fill", "mnist5k"),
    train("T66", QE + gp("ControllerSearch.objective = 'approx'") + out("T66"), "objective", "'approx'"),
    train("T67", QE + gp("ControllerSearch.baseline = 'mean'") + out("T67"), "baseline", "'mean'"),
    train("T68", QE + gp("EWS.interval_each_epoch = 'yes'") + out("T68"), "interval_each_epoch", "'yes'"),
    train("T69", Q + gp("AT.final_forward = 1") + out("T69"), "final_forward", "1"),
]

EVAL = [
    ev("E01", ("--checkpoint", "nosuch.pt"), "nosuch.pt"),
    ev("E02", ("--checkpoint", "trunc.pt", "--n-examples", "20"), "trunc.pt"),
    ev("E03", ("--checkpoint", "bitflip.pt", "--n-examples", "20"), "bitflip.pt"),
    ev("E04", ("--checkpoint", "text.pt", "--n-examples", "20"), "text.pt", forbid=": 101"),
    ev("E05", ("--checkpoint", "empty.pt", "--n-examples", "20"), "empty.pt", forbid="EOFError"),
    ev("E06", ("--checkpoint", "evil_plain.pt", "--n-examples", "20"), "evil_plain.pt"),
    ev("E07", ("--checkpoint", "evil_torch.pt", "--n-examples", "20"), "evil_torch.pt"),
    ev("E08", ARCH + ("--weights", "evil_torch.pt"), "evil_torch.pt"),
    ev("E09", ("--checkpoint", "run", "--n-examples", "20"), "run", forbid="not found"),
    ev("E10", ("--checkpoint", "plain_state_dict.pt", "--n-examples", "20"), "plain_state_dict.pt"),
    ev("E11", ("--checkpoint", "bad_spec.pt", "--n-examples", "20"), "resnet9000"),
    ev("E12", G + ("--attack", "pgdx"), "pgdx"),
    ev("E13", G + ("--eps", "-0.1"), "eps", "-0.1"),
    ev("E14", G + ("--eps", "nan"), "--eps", "nan"),
    ev("E15", G + ("--eps", "inf"), "--eps", "inf"),
    ev("E16", ("--checkpoint", "run/last.pt", "--n-examples", "0"), "--n-examples", "0"),
    ev("E17", ("--checkpoint", "run/last.pt", "--n-examples", "-5"), "--n-examples", "-5"),
    ev("E18", G + ("--steps", "0"), "steps", "0"),
    ev("E19", G + ("--steps", "-1"), "steps", "-1"),
    ev("E20", G + ("--step-size", "-1"), "step", "-1"),
    ev("E21", G + ("--restarts", "0"), "restarts", "0"),
    ev("E22", G + ("--batch-size", "0"), "--batch-size", "0"),
    ev("E23", G + ("--norm", "L3"), "--norm", "L3"),
    ev("E24", G + ("--eps", "abc"), "--eps", "abc"),
    ev("E25", ("--attack", "pgd"), "--checkpoint"),
    ev("E26", G + ("--output", "existing.json"), "existing.json"),
    ev("E27", G + ("--output", "afile/r.json"), "afile/r.json"),
    ev("E28", G + ("--data", "foo:bar"), "foo:bar"),
    ev("E29", G + ("--data", "dataset:nosuch"), "nosuch"),
    ev("E30", G + ("--data", "npz:nosuch.npz"), "nosuch.npz"),
    ev("E31", G + ("--data", "npz:missing_y.npz"), "missing_y.npz", "'y'"),
    ev("E32", G + ("--data", "npz:float_x.npz"), "float_x.npz", "float32"),
    ev("E33", G + ("--data", "npz:nan_float.npz"), "nan_float.npz", "float32"),
    ev("E34", G + ("--data", "npz:x3d.npz"), "x3d.npz", "(20, 28, 28)"),
    ev("E35", G + ("--data", "npz:wrong_hw.npz"), "wrong_hw.npz", "3 x 32 x 32"),
    ev("E36", G + ("--data", "npz:nchw.npz"), "nchw.npz", "(20, 1, 28, 28)"),
    ev("E37", G + ("--data", "npz:labels_oor.npz"), "labels_oor.npz", "42"),
    ev("E38", G + ("--data", "npz:labels_oor.npz", "--attack", "none"), "labels_oor.npz", "42"),
    ev("E39", G + ("--data", "npz:labels_neg.npz"), "labels_neg.npz", "-1"),
    ev("E40", G + ("--data", "npz:labels_float.npz"), "labels_float.npz", "float64"),
    ev("E41", G + ("--data", "npz:len_mismatch.npz"), "len_mismatch.npz", "(5,)"),
    ev("E42", ("--checkpoint", "run/last.pt", "--data", "npz:empty_n.npz"), "empty_n.npz", "N = 0"),
    ev("E43", G + ("--data", "npz:corrupt.npz"), "corrupt.npz"),
    ev("E44", G + ("--data", "npz:text.npz"), "text.npz", forbid="allow_pickle"),
    ev("E45", G + ("--data", "npz:obj.npz"), "obj.npz", "object"),
    ev("E46", G + ("--analysis", "subnets", "--rho", "0"), "--rho", "0"),
    ev("E47", G + ("--analysis", "subnets", "--rho", "1.5"), "--rho", "1.5"),
    ev("E48", G + ("--analysis", "subnets", "--n-subnets", "0"), "--n-subnets", "0"),
    ev("E49", G + ("--analysis", "subnets", "--search", "magic"), "magic"),
    ev("E50", G + ("--attack", "pgd,pgd"), "pgd,pgd"),
    pytest.param(ev("E51", G + ("--device", "cuda"), "cuda"), marks=NO_GPU),
    ev("E52", G + ("--state", "s.json"), "--state"),
    ev("E53", G + ("--attack", "autoattack", "--version", "custom", "--aa-attacks", "apgd-ce", "--state", "text.pt"),
       "text.pt"),
    ev("E54", G + ("--corruptions", "foo:bar"), "foo:bar"),
    ev("E55", G + ("--corruptions", "cifar10-c:/nonexistent"), "/nonexistent"),
    ev("E56", G + ("--hdf5", "afile/x.h5"), "afile/x.h5"),
    ev("E57", G + ("--analysis", "subnets", "--search-updates", "-1", "--search", "random"), "--search-updates", "-1"),
    ev("E58", G + ("--attack", "autoattack", "--version", "custom", "--aa-attacks", "magic"), "magic"),
    ev("E59", ARCH + ("--weights", "plain_state_dict.pt", "--num-classes", "0"), "--num-classes", "0"),
    ev("E60", ARCH + ("--weights", "text.pt"), "text.pt"),
    ev("E61", ("--model", "nosuchmodule:fn", "--data", "dataset:mnist5k", "--eps", "0.3", "--n-examples", "20"),
       "nosuchmodule"),
    # beyond the probe table
    ev("E62", G + ("--step-size", "nan"), "--step-size", "nan"),
    ev("E63", G + ("--attack", "fgsm", "--eps", "inf"), "--eps", "inf"),
    ev("E64", G + ("--analysis", "subnets", "--search-lr", "nan"), "--search-lr", "nan"),
    ev("E65", G + ("--analysis", "subnets", "--eps", "nan"), "--eps", "nan"),
    ev("E66", G + ("--analysis", "subnets", "--bn-modes", "eval,magic"), "eval,magic"),
    ev("E67", G + ("--analysis", "subnets", "--eval-batch-size", "0"), "--eval-batch-size", "0"),
    ev("E68", ARCH[:2] + ("--weights", "net.pt", "--data", "npz:ok.npz", "--normalization", "none",
                          "--analysis", "subnets"), "npz"),
    ev("E69", ARCH + ("--weights", "net.pt", "--num-classes", "1"), "--num-classes", "1"),
    ev("E70", ARCH[:2] + ("--weights", "net.pt", "--data", "npz:labels_oor.npz", "--normalization", "none",
                          "--eps", "0.3"), "labels_oor.npz", "42"),
    ev("E71", G + ("--output", "adir", "--force"), "adir", "directory"),
    ev("E72", G + ("--output", "same.out", "--hdf5", "same.out"), "same.out"),
    ev("E73", G + ("--hdf5", "/proc/advews.h5"), "/proc/advews.h5"),
    ev("E74", G + ("--output", "/proc/advews.json"), "/proc/advews.json"),
    ev("E75", G + ("--data", "npz:single.npz"), "single.npz", ".npy"),
    ev("E76", G + ("--data", "npz:zero.npz"), "zero.npz", "empty"),
    ev("E77", G + ("--data", "npz:text.npz", "--attack", "none"), "text.npz"),
    ev("E78", G + ("--attack", "autoattack", "--version", "custom", "--aa-attacks", "apgd-ce", "--state", "adir"),
       "adir"),
    ev("E79", G + ("--analysis", "subnets", "--search-updates", "2", "--n-subnets", "2", "--output",
                   "afile/a.json"), "afile/a.json"),
    ev("E80", G + ("--restarts", "-2", "--attack", "apgd-ce"), "--restarts", "-2"),
    ev("E81", G + ("--bogus",), "--bogus"),
    ev("E82", G + ("--corruptions", "cifar10-c:cifar10c"), "3 x 32 x 32"),
    ev("E83", G + ("--fixed-batches", "--batch-size", "10", "--shards", "3", "--shard", "0", "--state", "s.json"),
       "3 shards for 2 batches of 10"),
    ev("E84", G + ("--fixed-batches", "--corruptions", "cifar10-c:cifar10c"), "--corruptions", "--fixed-batches"),
]


def call(target: str, *args, **kwargs) -> Callable[[], object]:
    """A deferred call of ``module:function``, imported when the row runs."""
    module, _, name = target.partition(":")
    return lambda: getattr(importlib.import_module(module), name)(*args, **kwargs)


def images(n: int, labels=None) -> ArrayDataset:
    return ArrayDataset(torch.zeros(n, 1, 28, 28, dtype=torch.uint8),
                        torch.zeros(n, dtype=torch.int64) if labels is None else torch.tensor(labels))


NAN, INF = float("nan"), float("inf")
PGD = dict(eps=0.3, steps=2, step_size=0.1)
LINEAR = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))

API = [
    api("A01", call("advews.attacks:PGD", **{**PGD, "eps": NAN}), "nan"),
    api("A02", call("advews.attacks:PGD", **{**PGD, "eps": INF}), "inf"),
    api("A03", call("advews.attacks:PGD", **{**PGD, "eps": -1.0}), "-1.0"),
    api("A04", call("advews.attacks:PGD", **{**PGD, "steps": 0}), "steps", "0"),
    api("A05", call("advews.attacks:PGD", **{**PGD, "step_size": NAN}), "step_size", "nan"),
    api("A06", call("advews.attacks:PGD", **PGD, restarts=0), "restarts", "0"),
    api("A07", call("advews.attacks:FGSM", eps=0.3, norm="L3"), "L3"),
    api("A08", call("advews.attacks:FGSM", eps=-INF), "-inf"),
    api("A09", call("advews.defenses.registry:build_defense", "Magic"), "Magic"),
    api("A10", call("advews.defenses.registry:build_defense", ""), "''"),
    api("A11", call("advews.data:load_data", dataset="mnist"), "mnist"),
    api("A12", call("advews.data:load_data", dataset="mnist5k", train_limit=0), "train_limit", "0"),
    api("A13", call("advews.data:load_data", dataset="mnist5k", image_size=32), "image_size", "32"),
    api("A14", call("advews.data.cifar:load_cifar10", "cifar_trunc"), "cifar_trunc"),
    api("A15", call("advews.data.cifar:load_cifar10", "cifar_evil"), "cifar_evil", "posix.system"),
    api("A16", call("advews.data.cifar:load_cifar10", "cifar_notdict"), "cifar_notdict"),
    api("A17", call("advews.data:load_extra", "corrupt.npz"), "corrupt.npz"),
    api("A18", call("advews.data:load_extra", "text.npz"), "text.npz"),
    api("A19", call("advews.data:load_extra", "extra_obj.npz"), "extra_obj.npz", "object"),
    api("A20", call("advews.data:load_extra", "extra_evil.pickle"), "extra_evil.pickle"),
    api("A21", call("advews.data:load_extra", "trunc.pickle", allow_pickle=True), "trunc.pickle"),
    api("A22", call("advews.data:load_extra", "extra_oor.npz", num_classes=10), "extra_oor.npz", "99"),
    api("A23", call("advews.data:load_extra", "extra.txt"), "extra.txt", ".txt"),
    api("A24", call("advews.data:load_extra", "zero.npz"), "zero.npz"),
    api("A25", call("advews.data:ArrayDataset", torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64)), "float32"),
    api("A26", call("advews.data:split_validation", images(10), 1000000, 0), "1000000"),
    api("A27", call("advews.data:MixedDataset", images(10), images(10), fraction=1.5), "1.5"),
    api("A28", call("advews.models:build_model", {"arch": "resnet9000", "num_classes": 10, "in_channels": 1}),
        "resnet9000"),
    api("A29", call("advews.evaluation.checks:check_eval_data", LINEAR, images(0), "npz:empty"), "npz:empty", "N = 0"),
    api("A30", call("advews.evaluation.checks:check_eval_data", LINEAR, images(4, [0, 1, 2, 17]), "npz:labels17"),
        "npz:labels17", "17"),
    api("A31", call("advews.engine.checkpoint:load_checkpoint", "text.pt"), "text.pt", forbid=": 101"),
    api("A32", call("advews.engine.checkpoint:load_checkpoint", "empty.pt"), "empty.pt", forbid="EOFError"),
    api("A33", call("advews.engine.checkpoint:load_checkpoint", "bitflip.pt"), "bitflip.pt"),
    api("A34", call("advews.engine.checkpoint:load_checkpoint", "evil_plain.pt"), "evil_plain.pt"),
]

CASES = TRAIN + EVAL + API
SUBPROCESS = ("E14", "E43", "E59", "T35", "E06")  # the same rows end to end, as a user's shell runs them


def _id(case) -> str:
    return (case.values[0] if hasattr(case, "values") else case).id


MAINS = {"train": train_main, "eval": eval_main, "export": export_main, "data": data_main}
QUIET_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_case(case: Bad, capfd) -> Tuple[object, str]:
    """(exit code or AdvewsError, stderr as a user would see it, warnings included)."""
    extra = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in QUIET_BY_DEFAULT:
            warnings.simplefilter("ignore", category)
        try:
            if case.tool == "api":
                case.args()
                result = "no error"
            else:
                result = MAINS[case.tool](list(case.args))
        except SystemExit as e:  # argparse
            result = e.code
        except AdvewsError as e:
            result = e if case.tool == "api" else "AdvewsError escaped main"
        except Exception:  # noqa: BLE001 - a traceback is exactly what the table looks for
            result = "exception"
            extra = traceback.format_exc().splitlines()
    err = capfd.readouterr().err.splitlines() + extra
    for w in caught:
        err += warnings.formatwarning(w.message, w.category, w.filename, w.lineno).splitlines()
    return result, "\n".join(err)


def check_outcome(case: Bad, result: object, err: str) -> None:
    assert "Traceback" not in err, err
    if case.tool == "api":  # nothing on stderr; the message's first line (gin may add a second) names the value
        assert isinstance(result, AdvewsError), f"{case.id}: got {result!r}, stderr {err}"
        assert not err.strip(), f"{case.id}: stderr {err}"
        err = str(result)
    else:
        assert result == 2, f"{case.id}: exit code {result!r}, stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    if case.tool != "api":
        assert len(lines) == 1, f"{case.id}: {len(lines)} lines on stderr:\n{err}"
    for needle in case.needles:
        assert needle in lines[0], f"{case.id}: {needle!r} not in {lines[0]!r}"
    if case.forbid:
        assert case.forbid not in lines[0], f"{case.id}: unclear message {lines[0]!r}"


def check_row(case: Bad, where: str, monkeypatch, capfd) -> object:
    """Run one row in the directory ``where`` and assert its outcome and that nothing there changed;
    returns the result (exit code or AdvewsError)."""
    monkeypatch.chdir(where)
    monkeypatch.setattr(sys, "path", list(sys.path))  # --model and gin imports add the working directory
    capfd.readouterr()
    before = snapshot(where)
    result, err = run_case(case, capfd)
    after = snapshot(where)
    check_outcome(case, result, err)
    assert after == before, f"{case.id} changed files: " + ", ".join(
        sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)))
    return result


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bad_input_is_one_line_and_changes_nothing(case: Bad, world: str, monkeypatch, capfd) -> None:
    check_row(case, world, monkeypatch, capfd)


@pytest.mark.parametrize("case_id", SUBPROCESS)
def test_bad_input_end_to_end(case_id: str, world: str) -> None:
    case = next(c for c in CASES if not hasattr(c, "values") and c.id == case_id)
    module = "advews.cli.train" if case.tool == "train" else "advews.cli.eval"
    before = snapshot(world)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *case.args], cwd=world, env=env,
                          capture_output=True, text=True, timeout=300)
    assert snapshot(world) == before
    assert proc.stdout == ""
    check_outcome(case, proc.returncode, proc.stderr)


def test_table_covers_at_least_60_bad_inputs() -> None:
    assert len({_id(c) for c in CASES}) == len(CASES) >= 60
