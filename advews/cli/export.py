"""advews-export: a checkpoint's model as model.safetensors + config.json (no pickle to load it)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from advews.cli.common import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advews-export",
        description="Export an advews checkpoint's model as DIR/model.safetensors and DIR/config.json "
                    "(architecture, options, normalisation, dataset, classes, training threat model, defense). "
                    "config.json also carries the SHA-256 of model.safetensors: advews-eval --checkpoint DIR and "
                    "advews.load_model(DIR) load it and refuse it if its bytes changed. The model is built and its "
                    "weights checked before anything is written.",
        epilog="Exit status: 0 exported; 2 bad input (one line on stderr); 4 the disk is full (nothing is left "
               "written).")
    p.add_argument("checkpoint", help="a best.pt or last.pt of advews-train")
    p.add_argument("dir", help="output directory (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite an existing export in DIR")
    return p


def _main(args: argparse.Namespace) -> int:
    from advews.engine.export import export_model

    config = export_model(args.checkpoint, args.dir, force=args.force)
    print(f"exported {config['model_spec']['arch']} (epoch {config.get('epoch')}) from {args.checkpoint} to {args.dir}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-export", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
