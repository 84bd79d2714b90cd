"""The ``train`` configurable's settings, checked before anything is built or written."""

from __future__ import annotations

from advews.engine.ema import check_ema_settings
from advews.engine.params import require_bool, require_int, require_number


def check_settings(epochs, batch_size, seed, eps_warmup_epochs, val_eps, val_steps, val_step_size,
                   eval_batch_size, channels_last, compile, sync_batchnorm, grad_clip, max_skipped_steps,
                   checkpoint_every_steps, ema_decay, ema_warmup_steps, ema_dynamic_decay, select_on) -> None:
    """The ``train`` settings' types and ranges, each wrong one a one-line AdvewsError."""
    require_int("train.epochs", epochs, minimum=1)
    require_int("train.batch_size", batch_size, minimum=1)
    require_int("train.seed", seed, minimum=0)
    require_number("train.eps_warmup_epochs", eps_warmup_epochs, minimum=0)
    require_number("train.val_eps", val_eps, minimum=0, allow_none=True)
    require_int("train.val_steps", val_steps, minimum=1)
    require_number("train.val_step_size", val_step_size, minimum=0, allow_none=True)
    require_int("train.eval_batch_size", eval_batch_size, minimum=1)
    for name, flag in (("channels_last", channels_last), ("compile", compile), ("sync_batchnorm", sync_batchnorm)):
        require_bool(f"train.{name}", flag)
    require_number("train.grad_clip", grad_clip, positive=True, allow_none=True)
    require_int("train.max_skipped_steps", max_skipped_steps, minimum=0)
    require_int("train.checkpoint_every_steps", checkpoint_every_steps, minimum=1, allow_none=True)
    check_ema_settings(ema_decay, ema_warmup_steps, ema_dynamic_decay, select_on)
