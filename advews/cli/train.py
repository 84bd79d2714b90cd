"""advews-train: train a model from gin recipes.

Exit codes: 0 done; 2 bad input (one line on stderr, nothing on disk changed); 3 the training
diverged (non-finite loss, gradient or weights; the last good last.pt and best.pt are kept);
143 preempted: SIGTERM or SIGUSR1 saved a resumable last.pt at the next step boundary (run the
same command with --resume to continue, bit-exactly); 130 Ctrl-C (nothing saved beyond the last
checkpoint).

``--resume`` continues the run in ``--output`` with the config stored in its last.pt (``--gin``
and ``--gin-param`` may add to it); a setting that differs from the checkpoint's is refused unless
it may change within a run (``engine.resume.MAY_CHANGE``: train.epochs, the device, compilation,
checkpoint cadence, data location) or ``--override`` is given (never for the model, defense, data or
batch size). With no last.pt yet, ``--resume`` starts from scratch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from advews.cli.common import OneLineParser, parse_gin, run_cli

EPILOG = ("exit codes: 0 done, 2 bad input, 3 training diverged (last good checkpoints kept), "
          "143 preempted by SIGTERM/SIGUSR1 after saving a resumable last.pt (rerun with --resume), "
          "130 interrupted (Ctrl-C)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="advews-train", description="Train a robust model from gin recipes.",
                                epilog=EPILOG)
    p.add_argument("--gin", action="append", default=[], metavar="FILE",
                   help="gin file: a path or a shipped recipe name (repeatable, later files override)")
    p.add_argument("--gin-param", action="append", default=[], metavar="BINDING",
                   help="a gin binding such as 'train.epochs = 5' (repeatable, applied last)")
    p.add_argument("--output", metavar="DIR", help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last.pt, with the config stored in it "
                        "(starts from scratch when there is no last.pt yet)")
    p.add_argument("--override", action="store_true",
                   help="with --resume: apply settings that differ from the checkpoint's (e.g. optimizer.lr) "
                        "from here on and record them, instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def _configure(args: argparse.Namespace) -> list:
    """Parse the config; on a resume compare it with the checkpoint's and return the changes to apply."""
    from advews.engine import resume
    from advews.engine.checkpoint import load_checkpoint
    from advews.engine.rundir import CONFIG, LAST, holds_checkpoint
    from advews.errors import AdvewsError

    gin_files = list(args.gin)
    if not (args.resume and holds_checkpoint(args.output)):
        config_gin = os.path.join(args.output or "", CONFIG)
        if args.resume and not gin_files and os.path.isfile(config_gin) and os.path.getsize(config_gin):
            gin_files = [config_gin]  # killed before its first checkpoint
        if not gin_files and not args.gin_param:
            raise AdvewsError("no configuration: pass --gin FILE (e.g. --gin quickstart.gin)")
        parse_gin(gin_files, args.gin_param)
        return []
    last = os.path.join(args.output, LAST)
    state = load_checkpoint(last)
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, str):
        raise AdvewsError(f"cannot resume {last}: not an advews training checkpoint (it stores no config)")
    parse_gin([], [], base_config=config)  # imports and registers what the stored config names
    old = resume.current_bindings()
    parse_gin(gin_files, args.gin_param, base_config=None if gin_files else config)
    return resume.check_changes(old, resume.current_bindings(), args.override, args.output)


def _main(args: argparse.Namespace) -> int:
    from advews.engine.preemption import PREEMPTED_EXIT, Preempted
    from advews.engine.resume import show_value
    from advews.engine.trainer import Trainer
    from advews.errors import AdvewsError

    if args.resume and not args.output:
        raise AdvewsError("--resume needs --output DIR naming the run to continue")
    if args.override and not args.resume:
        raise AdvewsError("--override only applies to --resume (a new run takes its settings as given)")
    if os.getcwd() not in sys.path:  # a gin file's `import my_defense` finds the user's own file
        sys.path.insert(0, os.getcwd())
    overrides = _configure(args)
    output = args.output
    if output is None:
        stem = os.path.splitext(os.path.basename(args.gin[-1]))[0] if args.gin else "run"
        output = os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    created = _first_missing(output)
    try:
        trainer = Trainer(output_dir=output, resume=args.resume, quiet=args.quiet, overrides=overrides)
    except AdvewsError:
        if created is not None:  # a run that could not start leaves no empty directories behind
            _remove_empty(output, created)
        raise
    if not trainer.quiet:  # rank 0 only under torchrun
        print(f"run directory: {output}", flush=True)
        for key, old, new in overrides:
            print(f"override: {key} {show_value(old)} -> {show_value(new)}", flush=True)
    try:
        trainer.run()
    except Preempted as e:
        if trainer.dist.main:
            print(f"advews-train: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    return 0


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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-train", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
