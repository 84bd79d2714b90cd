"""Mixed precision and memory format: autocast (bf16 / fp16 with a GradScaler) and channels_last."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch

from advews.errors import AdvewsError

AMP_MODES = ("none", "bf16", "fp16")


class Precision:
    """What the loop needs: ``autocast()`` for forward passes, ``backward``/``step`` via the scaler.

    Losses are reduced in fp32 by autocast itself (cross-entropy, softmax, KL are on its fp32 list);
    attacks take gradients w.r.t. the fp32 input; the controller never runs under autocast.
    """

    def __init__(self, amp: str, device: torch.device, channels_last: bool = False):
        if amp not in AMP_MODES:
            raise AdvewsError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
        if amp == "fp16" and device.type != "cuda":
            raise AdvewsError("train.amp = 'fp16' needs a CUDA device; use 'bf16' on the CPU")
        self.amp, self.device, self.channels_last = amp, device, channels_last
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    @staticmethod
    def _with_grad(optimizer: torch.optim.Optimizer) -> list:
        return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]

    def grad_norm(self, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
        """The global gradient norm, for the divergence guard; None under fp16, whose scaler itself
        skips steps with non-finite (scaled) gradients."""
        if self.scaler is not None:
            return None
        return torch.nn.utils.get_total_norm([p.grad for p in self._with_grad(optimizer)])

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: Optional[float] = None,
             grad_norm: Optional[torch.Tensor] = None) -> None:
        """Optimizer step; with ``grad_clip``, the global gradient norm is first clipped to it (unscaled).
        ``grad_norm``: that norm when already computed (``grad_norm()``), so it is not computed twice."""
        if grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            params = self._with_grad(optimizer)
            if grad_norm is None or self.scaler is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            else:
                torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
