"""Benchmark 6: generated data streamed from disk (data.extra_data = DIR) vs an in-RAM npz.

Writes synthetic CIFAR-sized generated data (uint8 noise, random labels) as an uncompressed npz of
``--small`` (20k) and of ``--big`` (2M, 6 GB) images, streamed into the zip so that writing it
never holds it whole, converts each with advews.data.convert (``advews-data convert``), and deletes
the npz. Each configuration then runs in its own process, as a training run's data side does:
50k labeled CIFAR-sized images in memory, the extra data mixed in at ``--fraction`` 0.7, batches
of ``--batch`` 512. The data is first read once sequentially (a warm page cache); one untimed
pass of ``--batches`` warms the process, then two are timed: the float batches as the trainer
receives them when the crop/flip runs on the training device (a GPU), and with the CIFAR
crop/flip on the CPU as well. Reported: the process's peak RSS
(VmHWM) and the images/s of each pass; the in-RAM row loads the 20k npz whole with np.load.
Everything written is deleted at the end.

    OMP_NUM_THREADS=1 python benchmarks/generated_data.py                 # 20k and 2M (6 GB of disk)
    OMP_NUM_THREADS=1 python benchmarks/generated_data.py --big 200000    # a quick check
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch

from common import machine

SHAPE = (32, 32, 3)
LABELED = 50_000


def write_npz(path: str, n: int, chunk: int = 1 << 16) -> None:
    """An npz {image, label} of n noise images, written member by member in chunks of rows."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (chunk, *SHAPE), dtype=np.uint8)  # repeated: content does not matter
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("image.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, *SHAPE)})
            for start in range(0, n, chunk):
                f.write(block[: min(chunk, n - start)].tobytes())
        with archive.open("label.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "<i8", "fortran_order": False, "shape": (n,)})
            f.write(rng.integers(0, 10, n).tobytes())


def measure(extra: str, fraction: float, batch: int, batches: int) -> str:
    """Peak RSS (MiB) and mixed images/s of the data side of a training run on ``extra``."""
    from advews.data import ArrayDataset, MixedDataset, RandomCropFlip, load_extra

    rng = np.random.default_rng(0)
    labeled = ArrayDataset(torch.from_numpy(rng.integers(0, 256, (LABELED, 3, 32, 32), dtype=np.uint8)),
                           torch.from_numpy(rng.integers(0, 10, LABELED)))
    data = MixedDataset(labeled, load_extra(extra, image_shape=(3, 32, 32), num_classes=10), fraction)
    rates = []
    for seed, augment in enumerate([None, None, RandomCropFlip(4)]):  # the first pass is untimed
        gen = torch.Generator().manual_seed(seed)
        epoch = data.batches(batch, shuffle=True, drop_last=True, generator=gen, augment=augment)
        start = time.perf_counter()
        count = sum(len(y) for _, y in (next(epoch) for _ in range(batches)))
        rates.append(count / (time.perf_counter() - start))
    return f"{peak_rss_mib():.0f} {rates[1]:.0f} {rates[2]:.0f}"


def peak_rss_mib() -> float:
    """This process's peak resident set: VmHWM, not ru_maxrss, which Linux carries over from the
    parent through fork and exec (the parent's RSS would set the floor)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def warm(path: str) -> None:
    """Read the data once sequentially (plain reads, in this process), so it sits in the page cache."""
    files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
    for file in files:
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=20_000)
    p.add_argument("--big", type=int, default=2_000_000)
    p.add_argument("--fraction", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--batches", type=int, default=60, help="batches per pass (below one epoch of the labeled 50k)")
    p.add_argument("--work-dir", default=None, help="where the data is written (default: a temporary dir)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(measure(args.measure, args.fraction, args.batch, args.batches))
        return
    from advews.data.convert import convert

    print(f"machine: {machine()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    work = tempfile.mkdtemp(prefix="advews-generated-", dir=args.work_dir)
    try:
        runs = []
        for n in (args.small, args.big):
            npz, directory = os.path.join(work, f"gen{n}.npz"), os.path.join(work, f"gen{n}")
            start = time.perf_counter()
            write_npz(npz, n)
            written = time.perf_counter() - start
            start = time.perf_counter()
            convert(npz, directory)
            converted = time.perf_counter() - start
            gb = n * np.prod(SHAPE) / 1e9
            print(f"{n} images ({gb:.2f} GB): npz written in {written:.1f} s, converted in {converted:.1f} s "
                  f"({gb / converted:.2f} GB/s)")
            if n == args.small:
                runs.append((f"{n} in RAM (npz)", npz))
            else:
                os.remove(npz)
            runs.append((f"{n} streamed (dir)", directory))
        results = {}
        for name, path in runs:
            warm(path)
            cmd = [sys.executable, __file__, "--measure", path, "--fraction", str(args.fraction),
                   "--batch", str(args.batch), "--batches", str(args.batches)]
            rss, plain, cropped = map(float, subprocess.run(cmd, capture_output=True, text=True,
                                                            check=True).stdout.split()[-3:])
            results[name] = rss
            print(f"{name:>24}: peak RSS {rss:6.0f} MiB; mixed images/s {plain:7.0f} (crop/flip on the device), "
                  f"{cropped:7.0f} (crop/flip on the CPU); batch {args.batch}, fraction {args.fraction}")
        small, big = results[f"{args.small} streamed (dir)"], results[f"{args.big} streamed (dir)"]
        print(f"RSS({args.big}) - RSS({args.small}) streamed: {big - small:.0f} MiB (goal < 100 MB)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
