"""Run by tests/test_distributed.py under torchrun: trains through the real Trainer and records, per
step, what must agree across ranks (sampled subnet, controller and model parameters), how many
gradient all-reduces DDP ran, and at the end the EMA's weights and buffers."""

import sys

import torch
from torch import nn

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from advews.cli.common import parse_gin
from advews.defenses.ews import EWSMixin
from advews.engine.trainer import Trainer
from advews.models import ARCHITECTURES


def mlp(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """No BatchNorm: DDP with 2 x B then equals one process with 2B up to float summation order."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, 64), nn.ReLU(), nn.Linear(64, num_classes))


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def main(output: str, trace: str, resume: str, *bindings: str) -> None:
    ARCHITECTURES["test_mlp"] = mlp
    records = []
    original = EWSMixin.training_loss

    def recording(self, model, batch, backward=None):
        sample = self.search.sample

        def traced():
            alpha = sample()
            records.append(("subnet", alpha.to_tensor(self.space)))
            return alpha

        self.search.sample = traced
        try:
            out = original(self, model, batch, backward)
        finally:
            self.search.sample = sample
        records.append(("controller", flat(self.search.controller.parameters())))
        records.append(("model", flat(model.parameters())))
        return out

    EWSMixin.training_loss = recording
    parse_gin([], list(bindings))
    trainer = Trainer(output_dir=output, resume=resume == "resume", quiet=True)
    rank = trainer.dist.rank
    allreduces = []

    def counting(state, bucket):  # DDP's default all-reduce, counted per step
        allreduces.append(1)
        return allreduce_hook(state, bucket)

    trainer.train_model.register_comm_hook(None, counting)
    original_step = Trainer._train_step

    def step(self, *args):
        before = len(allreduces)
        result = original_step(self, *args)
        records.append(("allreduces", torch.tensor(len(allreduces) - before)))
        return result

    Trainer._train_step = step
    measure = Trainer._measure_cost

    def measure_unrecorded(self):  # the compute ledger's counted iteration runs on copies, not a step
        kept = len(records)
        measure(self)
        del records[kept:]

    Trainer._measure_cost = measure_unrecorded
    trainer.run()
    ema = None if trainer.ema is None else torch.cat([flat(trainer.ema.model.parameters()),
                                                      flat(trainer.ema.model.buffers())])
    torch.save({"records": records, "ema": ema}, f"{trace}.rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
