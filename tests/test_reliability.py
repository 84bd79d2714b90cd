"""Runs survive anything: kill -9 at startup, mid-epoch and mid-save, SIGTERM/SIGUSR1 preemption,
and divergence; every resume ends bit-exactly where an uninterrupted run ends (times aside)."""

import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

from advews.cli.eval import main as eval_main
from advews.cli.train import main as train_main
from advews.engine import checkpoint as ckpt
from advews.engine.checkpoint import load_checkpoint, save_checkpoint
from advews.engine.guard import DIVERGED_EXIT, collapsed
from advews.engine.preemption import PREEMPTED_EXIT
from advews.engine.trainer import Trainer

TINY = [
    "train.epochs = 2", "data.train_limit = 256", "data.val_size = 64", "AT.steps = 1", "train.val_steps = 1",
    "model.options = {'widths': (8, 16, 16)}",
]  # 4 steps per epoch (quickstart batch 64)
EWS = ["train.defense = 'AT_EWS'", "EWS.interval = 2", "EWS.num_samples = 2"]
TIMES = ("train_time", "epoch_time", "device_seconds", "device_seconds_total")
COMPARED = ("epoch", "step", "model", "optimizer", "scheduler", "precision", "defense_state", "rng", "best",
            "guard", "partial")


def args_for(out, *params, resume=False, gin=True):
    args = (["--gin", "quickstart.gin"] if gin else []) + ["--quiet", "--output", str(out)]
    for p in params:
        args += ["--gin-param", p]
    return args + (["--resume"] if resume else [])


def train(out, *params, resume=False, gin=True):
    return train_main(args_for(out, *params, resume=resume, gin=gin))


def train_subprocess(out, *params, kill_at=None, resume=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ADVEWS_TEST_KILL_AT", None)
    if kill_at:
        env["ADVEWS_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "advews.cli.train", *args_for(out, *params, resume=resume)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def metrics(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(run, reference):
    a, b = load_checkpoint(os.path.join(run, "last.pt")), load_checkpoint(os.path.join(reference, "last.pt"))
    for key in COMPARED:
        assert_same(a.get(key), b.get(key), key)
    assert metrics(run) == metrics(reference)
    assert os.path.isfile(os.path.join(run, "config.gin"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs use one intra-op thread, like the OMP_NUM_THREADS=1 subprocesses they are
    compared with bit for bit (2 threads reduce in another order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, AT and AT_EWS, to compare every interrupted one with."""
    root = tmp_path_factory.mktemp("reference")
    assert train(root / "AT", *TINY) == 0
    assert train(root / "AT_EWS", *TINY, *EWS) == 0
    return root


# ----------------------------------------------------------------- kill -9 and resume
def test_kill9_at_startup_mid_epoch_and_mid_save_then_resume_equals_uninterrupted(tmp_path, reference):
    """A cluster script always passes --resume; SIGKILLs land before the first checkpoint (while
    config.gin is written), in a mid-epoch checkpoint's save, and between last.pt and metrics.jsonl."""
    run = tmp_path / "run"
    params = TINY + ["train.checkpoint_every_steps = 1"]
    for kill_at in ("before-rename:config.gin", "before-rename:last.pt:3", "before-rename:metrics.jsonl:2"):
        proc = train_subprocess(run, *params, kill_at=kill_at)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        if kill_at.endswith("config.gin"):
            assert "starting the run from scratch" in proc.stdout
            assert not (run / "config.gin").exists()
        else:
            assert "train.epochs = 2" in (run / "config.gin").read_text()  # never half-written
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in metrics(run)] == []  # killed before the rewrite; the resume restores it
    assert train(run, resume=True, gin=False) == 0  # the config comes from last.pt
    assert_same_run(run, reference / "AT")


def test_killed_before_first_checkpoint_is_not_a_dead_end(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.gin").write_text("")  # what an old version's kill mid-write left
    assert train(run, *TINY, "train.epochs = 1", resume=True) == 0
    assert "starting the run from scratch" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.gin").write_text("train.epochs = 1\n")
    assert train(fresh, *TINY, "train.epochs = 1") == 0  # config.gin alone is not a run
    assert [r["epoch"] for r in metrics(fresh)] == [1]


# ----------------------------------------------------------------- preemption
@pytest.mark.parametrize("defense, signum, at_step", [
    ("AT", signal.SIGTERM, 3), ("AT_EWS", signal.SIGTERM, 2), ("AT", signal.SIGUSR1, 4)])
def test_preemption_saves_mid_epoch_and_resume_is_bit_exact(tmp_path, reference, monkeypatch, capsys,
                                                            defense, signum, at_step):
    params = TINY + (EWS if defense == "AT_EWS" else [])
    original = Trainer._train_step
    seen = []

    def step(self, epoch, i, *rest):
        loss = original(self, epoch, i, *rest)
        seen.append((epoch, i))
        if (epoch, i + 1) == (1, at_step):
            os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(Trainer, "_train_step", step)
    run = tmp_path / "run"
    assert train(run, *params) == PREEMPTED_EXIT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and signal.Signals(signum).name in err
    state = load_checkpoint(run / "last.pt")
    assert (state["epoch"], state["step"]) == (1, at_step)
    assert seen[-1] == (1, at_step - 1)  # stopped at the next step boundary
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert train(run, *params, resume=True) == 0
    assert_same_run(run, reference / defense)


# ----------------------------------------------------------------- divergence
DIVERGE = ["optimizer.name = 'sgd'", "optimizer.lr = 0.05", "schedule.name = 'step'", "schedule.milestones = [1]",
           "schedule.gamma = 1e38", "train.epochs = 3", "data.train_limit = 512", "train.batch_size = 32",
           "data.val_size = 64", "AT.steps = 1", "train.val_steps = 1", "model.options = {'widths': (8, 16, 16)}"]


def all_finite(state):
    return all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())


def test_divergence_stops_and_keeps_the_last_good_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, *DIVERGE) == DIVERGED_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged at epoch 2" in err[0] and "non-finite" in err[0]
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert last["epoch"] == best["epoch"] == 1
    assert all_finite(last) and all_finite(best)
    assert [r["epoch"] for r in metrics(run)] == [1]


def test_skip_policy_skips_up_to_max_then_stops(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, *DIVERGE, "train.nonfinite = 'skip'", "train.max_skipped_steps = 3") == DIVERGED_EXIT
    err = capsys.readouterr().err.strip()
    assert "after 3 skipped steps" in err and len(err.splitlines()) == 1
    assert all_finite(load_checkpoint(run / "last.pt"))


def test_skip_policy_drops_a_single_bad_step(tmp_path, monkeypatch):
    from advews.engine.precision import Precision

    original, calls = Precision.grad_norm, []

    def grad_norm(self, optimizer):
        calls.append(1)
        return torch.tensor(float("inf")) if len(calls) == 3 else original(self, optimizer)

    monkeypatch.setattr(Precision, "grad_norm", grad_norm)
    run = tmp_path / "run"
    assert train(run, *TINY, "train.epochs = 1", "train.nonfinite = 'skip'") == 0
    state = load_checkpoint(run / "last.pt")
    assert state["guard"]["skipped"] == 1 and all_finite(state)
    calls.clear()
    assert train(tmp_path / "stop", *TINY, "train.epochs = 1") == DIVERGED_EXIT  # default: stop


def test_collapsed_model_is_never_best(tmp_path, monkeypatch):
    """A model predicting one class (what a NaN model does) with a higher 'accuracy' is not selected."""
    import advews.engine.trainer as trainer_module

    real, calls = trainer_module.validation_counts, []

    def counts(model, dataset, attack, num_classes, *rest):
        out = real(model, dataset, attack, num_classes, *rest)
        calls.append(1)
        if len(calls) == 2:  # epoch 2: all predictions class 0, "accuracy" 100%
            out[0] = out[1] = out[2]
            out[3:3 + num_classes] = 0
            out[3] = out[2]
        return out

    monkeypatch.setattr(trainer_module, "validation_counts", counts)
    run = tmp_path / "run"
    assert train(run, *TINY, "data.train_limit = 512", "train.batch_size = 32", "optimizer.name = 'sgd'",
                 "optimizer.lr = 0.05") == 0
    first = metrics(run)[0]["val_robust_acc"]
    best = load_checkpoint(run / "best.pt")
    assert metrics(run)[1]["val_robust_acc"] == 1.0 > first
    assert best["epoch"] == 1
    assert collapsed(torch.tensor([5.0, 0, 0]), torch.tensor([2.0, 3, 0]))
    assert not collapsed(torch.tensor([5.0, 0, 0]), torch.tensor([5.0, 0, 0]))


# ----------------------------------------------------------------- resume config
def hashes(run):
    return {f: open(os.path.join(run, f), "rb").read() for f in sorted(os.listdir(run))}


def test_resume_refuses_changed_settings_and_override_applies_them(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, *TINY, "train.epochs = 1") == 0
    capsys.readouterr()
    before = hashes(run)
    assert train(run, "optimizer.lr = 0.5", "train.epochs = 2", resume=True, gin=False) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimizer.lr (0.002 -> 0.5)" in err and "train.epochs" not in err
    assert hashes(run) == before
    assert train(run, "model.arch = 'resnet18'", "optimizer.lr = 0.5", resume=True, gin=False) == 2
    assert "model.arch" in capsys.readouterr().err  # never, not even with --override
    assert train_main(args_for(run, "optimizer.lr = 0.5", "train.epochs = 2", resume=True, gin=False)
                      + ["--override"]) == 0
    assert metrics(run)[1]["lr"] == 0.5  # applied, not silently kept at 0.002
    state = load_checkpoint(run / "last.pt")
    assert state["overrides"] == [{"epoch": 1, "step": 0, "changes": {"optimizer.lr": ["0.002", "0.5"]}}]
    assert "optimizer.lr = 0.5" in state["config"] and "optimizer.lr = 0.5" in (run / "config.gin").read_text()


def test_resume_without_gin_uses_the_checkpoint_config(tmp_path):
    run = tmp_path / "run"
    assert train(run, *TINY, "train.epochs = 1") == 0
    (run / "config.gin").write_text("")  # a damaged config.gin does not matter
    assert train(run, "train.epochs = 2", resume=True, gin=False) == 0
    assert [r["epoch"] for r in metrics(run)] == [1, 2]


# ----------------------------------------------------------------- checkpoint files
def test_checkpoint_hash_detects_flipped_bytes_and_old_checkpoints_load(tmp_path, capsys):
    state = {"model": {"w": torch.arange(4096, dtype=torch.float32)}, "epoch": 1}
    good = tmp_path / "good.pt"
    save_checkpoint(state, str(good))
    assert torch.equal(load_checkpoint(good)["model"]["w"], state["model"]["w"])
    raw = bytearray(good.read_bytes())
    start = raw.find(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[:64])
    for i in range(400):
        raw[start + 40 * i] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="corrupt"):
        load_checkpoint(bad)
    old = tmp_path / "old.pt"
    torch.save(state, old)  # written before checkpoints carried a hash
    assert load_checkpoint(old)["epoch"] == 1


def test_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: events.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    save_checkpoint({"x": torch.zeros(2)}, str(tmp_path / "c.pt"))
    assert events[:2] == ["fsync", "rename"]


def test_bad_checkpoint_files_give_one_clear_line(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))

    files = {"text.pt": b"hello world\n", "empty.pt": b"", "evil.pt": pickle.dumps(Evil())}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    expected = {"text.pt": "not a PyTorch checkpoint", "empty.pt": "empty", "evil.pt": "not a PyTorch checkpoint"}
    for name, needle in expected.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert eval_main(["--checkpoint", str(tmp_path / name)]) == 2
        assert not caught, [str(w.message) for w in caught]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and name in err[0]
    assert eval_main(["--checkpoint", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not (tmp_path / "PWNED").exists()


# ----------------------------------------------------------------- bad settings and the terminal
@pytest.mark.parametrize("binding, needle", [
    ("train.epochs = 'ten'", "train.epochs must be an integer >= 1, got 'ten'"),
    ("train.epochs = 1.5", "train.epochs must be an integer >= 1, got 1.5"),
    ("optimizer.lr = 'fast'", "optimizer.lr must be a finite number > 0, got 'fast'"),
    ("train.checkpoint_every_steps = 0", "train.checkpoint_every_steps must be >= 1, got 0"),
    ("train.nonfinite = 'ignore'", "train.nonfinite must be one of stop, skip, got 'ignore'"),
    ("train.epochs = = 3", "bad --gin-param 'train.epochs = = 3'"),
])
def test_bad_settings_are_one_line_and_leave_no_directory(tmp_path, capsys, binding, needle):
    assert train(tmp_path / "run", *TINY, binding) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert "quickstart.gin" not in err[0]
    assert not (tmp_path / "run").exists()


def test_progress_bars_on_a_terminal_without_warnings(tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    args = [a for a in args_for(tmp_path / "run", *TINY, "train.epochs = 1") if a != "--quiet"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_main(args) == 0
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    assert "validation" in term.getvalue() and "epoch 1/1" in term.getvalue()
