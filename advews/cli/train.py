"""advews-train: train a model from gin recipes."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from advews.cli.common import parse_gin, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advews-train", description="Train a robust model from gin recipes.")
    p.add_argument("--gin", action="append", default=[], metavar="FILE",
                   help="gin file: a path or a shipped recipe name (repeatable, later files override)")
    p.add_argument("--gin-param", action="append", default=[], metavar="BINDING",
                   help="a gin binding such as 'train.epochs = 5' (repeatable, applied last)")
    p.add_argument("--output", metavar="DIR", help="run directory (default runs/<recipe>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def _main(args: argparse.Namespace) -> int:
    from advews.engine.trainer import Trainer
    from advews.errors import AdvewsError

    if args.resume and not args.output:
        raise AdvewsError("--resume needs --output DIR naming the run to continue")
    gin_files = list(args.gin)
    if args.resume and not gin_files and os.path.isfile(os.path.join(args.output, "config.gin")):
        gin_files = [os.path.join(args.output, "config.gin")]
    if not gin_files and not args.gin_param:
        raise AdvewsError("no configuration: pass --gin FILE (e.g. --gin quickstart.gin)")
    if os.getcwd() not in sys.path:  # a gin file's `import my_defense` finds the user's own file
        sys.path.insert(0, os.getcwd())
    parse_gin(gin_files, args.gin_param)
    output = args.output
    if output is None:
        stem = os.path.splitext(os.path.basename(gin_files[-1]))[0] if gin_files else "run"
        output = os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    existed = os.path.exists(output)
    try:
        trainer = Trainer(output_dir=output, resume=args.resume, quiet=args.quiet)
    except AdvewsError:
        if not existed and os.path.isdir(output) and not os.listdir(output):
            os.rmdir(output)  # a run that could not start leaves no empty directory behind
        raise
    if not trainer.quiet:  # rank 0 only under torchrun
        print(f"run directory: {output}", flush=True)
    trainer.run()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-train", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
