"""torchrun with 2 processes on the CPU (gloo): EWS stays in lockstep across ranks, DDP matches one
process with the global batch, only rank 0 writes, resume works, and every process exits 0."""

import os
import subprocess
import sys

import pytest
import torch

from advews.cli.common import parse_gin
from advews.engine.checkpoint import load_checkpoint
from advews.engine.trainer import Trainer
from advews.models import ARCHITECTURES

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = ["data.dataset = 'mnist5k'", "data.train_limit = 256", "data.val_size = 64", "train.batch_size = 32",
         "optimizer.name = 'adam'", "optimizer.lr = 2e-3", "optimizer.weight_decay = 0.0",
         "schedule.name = 'constant'", "train.device = 'cpu'"]
EWS = QUICK + ["model.arch = 'small_preact_resnet'", "model.options = {'widths': (8, 16, 16)}",
               "train.defense = 'AT_EWS'", "AT.eps = 0.3", "AT.step_size = 0.1", "AT.steps = 2",
               "train.val_steps = 2", "EWS.rho = 0.7", "EWS.interval = 2", "EWS.num_samples = 2"]
STANDARD = QUICK + ["model.arch = 'test_mlp'", "train.defense = 'Standard'", "train.epochs = 2"]


def torchrun(output, trace, *bindings, resume=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "ddp_worker.py"), str(output), str(trace), "resume" if resume else "fresh", *bindings]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{trace}.rank{r}.pt", weights_only=True)["records"] for r in (0, 1)]


def emas(trace):
    return [torch.load(f"{trace}.rank{r}.pt", weights_only=True)["ema"] for r in (0, 1)]


def test_ews_ranks_stay_in_lockstep(tmp_path):
    """Also: EWS's staged backward all-reduces the gradients once per step, and the EMA is identical
    on both ranks (weights and BN buffers)."""
    rank0, rank1 = torchrun(tmp_path / "run", tmp_path / "trace", *EWS, "train.epochs = 1", "train.ema_decay = 0.9")
    kinds = [k for k, _ in rank0]
    assert kinds.count("subnet") == 8 and kinds.count("controller") == 8  # 256 / 32 steps
    assert [int(v) for k, v in rank0 if k == "allreduces"] == [1] * 8  # one bucket, one all-reduce per step
    ema0, ema1 = emas(tmp_path / "trace")
    assert ema0 is not None and torch.equal(ema0, ema1)
    for (k0, v0), (k1, v1) in zip(rank0, rank1):
        assert k0 == k1 and torch.equal(v0, v1), k0
    controllers = [v for k, v in rank0 if k == "controller"]
    assert not torch.equal(controllers[0], controllers[-1])  # the controller did learn
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "best.pt", "config.gin", "last.pt", "metrics.jsonl"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_ddp_matches_single_process_with_global_batch(tmp_path):
    torchrun(tmp_path / "ddp", tmp_path / "trace", *STANDARD)
    from ddp_worker import mlp  # noqa: E402  (the worker's BN-free model)

    ARCHITECTURES["test_mlp"] = mlp
    try:
        parse_gin([], STANDARD)
        Trainer(output_dir=str(tmp_path / "single"), quiet=True).run()
    finally:
        del ARCHITECTURES["test_mlp"]
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")["model"]
    single = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    for k in single:
        assert torch.allclose(ddp[k], single[k], atol=1e-5), k


def test_resume_under_ddp(tmp_path):
    torchrun(tmp_path / "straight", tmp_path / "a", *EWS, "train.epochs = 2")
    torchrun(tmp_path / "split", tmp_path / "b", *EWS, "train.epochs = 1")
    torchrun(tmp_path / "split", tmp_path / "c", *EWS, "train.epochs = 2", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert len(b["rng"]) == 2
