"""advews-train: train a model from gin recipes.

Exit codes: 0 done; 2 bad input (one line on stderr, nothing on disk changed), including an
--output another advews-train is using (the line names its pid); 3 the training diverged
(non-finite loss, gradient or weights; the last good last.pt and best.pt are kept); 4 the disk
(or quota) is full: the line names the file that could not be written and the checkpoints that
are kept, the partial file is removed (free space, rerun with --resume); 143 preempted: SIGTERM or
SIGUSR1 saved a resumable last.pt at the next step boundary (run the same command with --resume to
continue, bit-exactly; if that save failed for a full disk, still 143, and the line says which
checkpoint survives); 130 Ctrl-C (nothing saved beyond the last checkpoint). Under torchrun only
rank 0 prints; the other ranks exit with the same code silently.

``--resume`` continues the run in ``--output`` with the config stored in its last.pt (``--gin``
and ``--gin-param`` may add to it); a setting that differs from the checkpoint's is refused unless
it may change within a run (``engine.resume.MAY_CHANGE``: train.epochs, the device, compilation,
checkpoint cadence, data location) or ``--override`` is given (never for the model, defense, data or
batch size; nor for the training data's content, checked against the checkpoint's fingerprint).
With no last.pt yet, ``--resume`` starts from scratch.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from advews.cli.common import OneLineParser, available_recipes, run_cli

EPILOG = ("exit codes: 0 done, 2 bad input (or --output in use by another advews-train), "
          "3 training diverged (last good checkpoints kept), 4 disk full (the kept checkpoint is named; "
          "free space and rerun with --resume), 143 preempted by SIGTERM/SIGUSR1 after saving a resumable "
          "last.pt (rerun with --resume), 130 interrupted (Ctrl-C)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="advews-train", description="Train a robust model from gin recipes.",
                      epilog=f"shipped recipes: {', '.join(available_recipes())}. {EPILOG}")
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


def _main(args: argparse.Namespace) -> int:
    from advews.api.train import train
    from advews.engine.distributed import main_process
    from advews.engine.preemption import PREEMPTED_EXIT, Preempted
    from advews.errors import AdvewsError

    try:
        train(args.gin, args.gin_param, args.output, resume=args.resume, override=args.override, quiet=args.quiet)
    except Preempted as e:
        if e.main_rank:  # every rank stops; one says so
            print(f"advews-train: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except AdvewsError as e:
        if not main_process():  # under torchrun every rank refuses; rank 0 says so, once
            return getattr(e, "exit_code", 2)
        raise
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-train", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
