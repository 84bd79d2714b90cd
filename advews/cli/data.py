"""advews-data: prepare data files; ``convert`` turns a large npz/HDF5 of generated images into the
directory that ``data.extra_data`` streams from disk."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from advews.cli.common import OneLineParser, run_cli
from advews.data.convert import DEFAULT_CHUNK_BYTES, convert


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="advews-data", description="Prepare data for advews-train.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = commands.add_parser(
        "convert", help="npz/HDF5 of images + labels -> DIR/images.npy + DIR/labels.npy, streamed from disk",
        description="Copy the images (N x H x W x C uint8) and labels of FILE (.npz with keys image/label or "
                    "data/extrapolated_targets, stored or compressed; or the same in .h5/.hdf5) into DIR chunk by "
                    "chunk, never holding the whole file; then set data.extra_data = 'DIR'. Both files appear "
                    "only once both are complete; a rerun replaces an incomplete pair.",
        epilog="Exit status: 0 converted; 2 bad input or unusable DIR (one line on stderr); 4 the disk is full "
               "(nothing is left written).")
    c.add_argument("file", help="input .npz, .h5 or .hdf5")
    c.add_argument("dir", help="output directory (created if missing; existing images.npy/labels.npy are refused)")
    c.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / 2**20,
                   help="bytes copied per step, in MiB (default: %(default)g)")
    return p


def _main(args: argparse.Namespace) -> int:
    shape = convert(args.file, args.dir, chunk_bytes=int(args.chunk_mb * 2**20))
    print(f"wrote {args.dir}/images.npy ({' x '.join(map(str, shape))} uint8) and {args.dir}/labels.npy; "
          f"train with data.extra_data = '{args.dir}'")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.chunk_mb * 2**20 >= 1:
        parser.error(f"--chunk-mb must be positive, got {args.chunk_mb:g}")
    return run_cli("advews-data", lambda: _main(args))


if __name__ == "__main__":
    sys.exit(main())
