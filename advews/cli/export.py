"""advews-export: a checkpoint's model as a model repository (model.safetensors + config.json, the
model card README.md with its evaluations, the training recipe), loadable with no pickle."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from advews.cli.common import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="advews-export",
        description="Export an advews checkpoint's model as a model repository in the hubs' layout: DIR/model.safetensors, "
                    "DIR/config.json (architecture, options, normalisation, dataset, classes, training threat model, "
                    "defense, and the SHA-256 of model.safetensors: advews-eval --checkpoint DIR and "
                    "advews.load_model(DIR) load it and refuse it if its bytes changed), DIR/README.md (a model card: "
                    "YAML metadata and model-index results from the advews-eval JSONs and audit cards next to the "
                    "checkpoint, each with its command and SHA-256), those JSONs under DIR/evaluations/, and "
                    "DIR/config.gin (the training recipe). The model is built, its weights checked and the card "
                    "parsed back before anything is written. Share it with: hf upload USER/NAME DIR",
        epilog="Exit status: 0 exported; 2 bad input or a refused --robustbench (one line on stderr); 4 the disk is "
               "full (nothing is left written).")
    p.add_argument("checkpoint", help="a best.pt or last.pt of advews-train")
    p.add_argument("dir", help="output directory (created if missing)")
    p.add_argument("--name", help="the model's name in the card and model_info.json (default: DIR's name)")
    p.add_argument("--robustbench", action="store_true",
                   help="also write DIR/model_info.json, RobustBench's model entry, from a standard AutoAttack "
                        "evaluation next to the checkpoint (advews-eval --attack autoattack on the full test set at "
                        "the model's eps); refused when there is none")
    p.add_argument("--force", action="store_true", help="replace an existing export in DIR")
    return p


def _main(args: argparse.Namespace) -> int:
    from advews.engine.export import export_model

    config = export_model(args.checkpoint, args.dir, force=args.force, name=args.name, robustbench=args.robustbench)
    print(f"exported {config['model_spec']['arch']} (epoch {config.get('epoch')}) from {args.checkpoint} to {args.dir}")
    print(f"share it with: hf upload USER/NAME {args.dir}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("advews-export", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
