"""``advews.train``: what ``advews-train`` does, as a function (the CLI parses flags and calls it).

``resume`` continues the run in ``output_dir`` with the config stored in its last.pt (gin files and
bindings may add to it); a setting that differs from the checkpoint's is refused unless it may
change within a run (``engine.resume.MAY_CHANGE``: train.epochs, the device, compilation,
checkpoint cadence, data location) or ``override`` is given (never for the model, defense, data or
batch size) nor for the training data, whose fingerprint every checkpoint holds. With no last.pt
yet, ``resume`` starts from scratch; with best.pt or metrics.jsonl but no last.pt it is refused.
One process trains in a run directory at a time (``engine.rundir``: a lock on ``RUN_DIR/.lock``); a
second is refused in one line naming the holder's pid. A run that cannot start removes the
directories it created.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from advews.api.arguments import public, train_arguments
from advews.api.config import parse_gin
from advews.errors import AdvewsError


def configure(gin_files: Sequence[str], bindings: Sequence[str], output_dir: Optional[str], resume: bool,
              override: bool) -> List[Tuple[str, Any, Any]]:
    """Parse the config; on a resume compare it with the checkpoint's and return the changes to apply."""
    from advews.engine import resume as resuming
    from advews.engine.checkpoint import load_checkpoint
    from advews.engine.rundir import CONFIG, LAST, holds_checkpoint

    gin_files = list(gin_files)
    if not (resume and holds_checkpoint(output_dir)):
        config_gin = os.path.join(output_dir or "", CONFIG)
        if resume and not gin_files and os.path.isfile(config_gin) and os.path.getsize(config_gin):
            gin_files = [config_gin]  # killed before its first checkpoint
        if not gin_files and not bindings:
            raise AdvewsError("no configuration: pass --gin FILE (e.g. --gin quickstart.gin)")
        parse_gin(gin_files, bindings)
        return []
    last = os.path.join(output_dir, LAST)
    state = load_checkpoint(last)
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, str):
        raise AdvewsError(f"cannot resume {last}: not an advews training checkpoint (it stores no config)")
    parse_gin([], [], base_config=config)  # imports and registers what the stored config names
    old = resuming.current_bindings()
    parse_gin(gin_files, bindings, base_config=None if gin_files else config)
    return resuming.check_changes(old, resuming.current_bindings(), override, output_dir)


@public
def train(
    gin_files: Sequence[str] = (),
    bindings: Optional[Sequence[str]] = None,
    output_dir: Optional[str] = None,
    resume: bool = False,
    override: bool = False,
    quiet: bool = False,
) -> Dict[str, Any]:
    """Train from gin recipes (paths or shipped names such as ``"quickstart.gin"``) and bindings such
    as ``"train.epochs = 5"``; returns the last metrics row plus ``run_dir``. ``output_dir`` None:
    ``runs/<recipe>-<time>``. Raises ``AdvewsError`` (``exit_code`` 3 when training diverged) and
    ``engine.preemption.Preempted`` after a SIGTERM/SIGUSR1 saved a resumable checkpoint."""
    gin_files, bindings, output_dir = train_arguments(gin_files, bindings, output_dir, resume, override, quiet)
    from advews.engine.preemption import Preempted
    from advews.engine.resume import show_value
    from advews.engine.trainer import Trainer

    bindings = list(bindings or [])
    if resume and not output_dir:
        raise AdvewsError("--resume needs --output DIR naming the run to continue")
    if override and not resume:
        raise AdvewsError("--override only applies to --resume (a new run takes its settings as given)")
    if output_dir is not None:  # in use, a run to resume or not: said before the config is compared
        from advews.engine.rundir import check_output_dir, holds_checkpoint

        check_output_dir(output_dir, resume, resume and holds_checkpoint(output_dir))
    if os.getcwd() not in sys.path:  # a gin file's `import my_defense` finds the user's own file
        sys.path.insert(0, os.getcwd())
    overrides = configure(gin_files, bindings, output_dir, resume, override)
    if output_dir is None:
        stem = os.path.splitext(os.path.basename(gin_files[-1]))[0] if gin_files else "run"
        output_dir = os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    created = _first_missing(output_dir)
    try:
        trainer = Trainer(output_dir=output_dir, resume=resume, quiet=quiet, overrides=overrides)
    except AdvewsError:
        if created is not None:
            _remove_empty(output_dir, created)
        raise
    if not trainer.quiet:  # rank 0 only under torchrun
        print(f"run directory: {output_dir}", flush=True)
        for key, old, new in overrides:
            print(f"override: {key} {show_value(old)} -> {show_value(new)}", flush=True)
    try:
        return {**trainer.run(), "run_dir": output_dir}
    except Preempted as e:
        e.main_rank = trainer.dist.main
        raise


def _first_missing(path: str) -> Optional[str]:
    """The outermost directory of ``path`` that does not exist yet (None if ``path`` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path, missing = os.path.dirname(path), path
    return missing


def _remove_empty(output: str, top: str) -> None:
    """Remove ``output`` and its parents up to ``top`` while they are empty."""
    path = os.path.abspath(output)
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == top:
            return
        path = os.path.dirname(path)
