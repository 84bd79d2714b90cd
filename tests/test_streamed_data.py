"""Generated data streamed from disk: the advews-data converter, streamed vs in-memory batches,
each rank reading only its rows, bad directories, resident memory independent of N."""

import os

import h5py
import numpy as np
import pytest
import torch

import advews.data.streamed as streamed
from advews.cli.data import main as data_main
from advews.cli.train import main as train_main
from advews.data import MixedDataset, RandomCropFlip, StreamedDataset, load_data, load_extra
from advews.data.convert import convert
from advews.errors import AdvewsError


def _arrays(n=300, size=28, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.mark.parametrize("kind", ["stored", "compressed", "hdf5"])
def test_converter_streams_multi_chunk_files_unchanged(tmp_path, kind):
    images, labels = _arrays(size=32, channels=3)  # 921 KB of images, in 1 KB chunks
    keys = ("data", "extrapolated_targets") if kind == "compressed" else ("image", "label")
    path = tmp_path / ("in.h5" if kind == "hdf5" else "in.npz")
    if kind == "hdf5":
        with h5py.File(path, "w") as f:
            f[keys[0]], f[keys[1]] = images, labels
    else:
        (np.savez_compressed if kind == "compressed" else np.savez)(path, **dict(zip(keys, (images, labels))))
    assert convert(str(path), str(tmp_path / "out"), chunk_bytes=1000) == images.shape
    assert sorted(os.listdir(tmp_path / "out")) == ["images.npy", "labels.npy"]
    assert np.array_equal(np.load(tmp_path / "out" / "images.npy"), images)
    out_labels = np.load(tmp_path / "out" / "labels.npy")
    assert out_labels.dtype == labels.dtype and np.array_equal(out_labels, labels)


def test_converter_cli_and_its_one_line_errors(tmp_path, capsys):
    images, labels = _arrays(n=20)
    np.savez(tmp_path / "ok.npz", image=images[..., 0], label=labels)  # N x H x W: one channel
    assert data_main(["convert", str(tmp_path / "ok.npz"), str(tmp_path / "out"), "--chunk-mb", "0.001"]) == 0
    assert np.array_equal(np.load(tmp_path / "out" / "images.npy"), images)
    np.savez(tmp_path / "float.npz", image=images.astype(np.float32), label=labels)
    np.savez(tmp_path / "short.npz", image=images, label=labels[:-1])
    np.savez(tmp_path / "negative.npz", image=images, label=labels - 5)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:5000])
    cases = {
        "ok.npz": "already exists",
        "float.npz": "images must be N x H x W x C uint8",
        "short.npz": "20 images but 19 labels",
        "negative.npz": "is negative",
        "cut.npz": "cannot convert",
    }
    for name, expected in cases.items():
        capsys.readouterr()
        out = tmp_path / ("out" if name == "ok.npz" else "bad")
        assert data_main(["convert", str(tmp_path / name), str(out)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, (name, err)
    assert not (tmp_path / "bad").exists()  # no partial files, nor the directory a failed convert created


def _npz_and_dir(tmp_path, n=50):
    images, labels = _arrays(n=n)
    np.savez(tmp_path / "extra.npz", image=images, label=labels)
    convert(str(tmp_path / "extra.npz"), str(tmp_path / "extra"))
    return str(tmp_path / "extra.npz"), str(tmp_path / "extra")


def _epoch(data, seed):
    gen = torch.Generator().manual_seed(seed)
    return list(data.batches(64, shuffle=True, drop_last=True, generator=gen, augment=RandomCropFlip(2)))


def test_streamed_training_batches_equal_the_in_memory_ones(tmp_path):
    npz, directory = _npz_and_dir(tmp_path)
    in_ram, on_disk = (load_data("mnist5k", extra_data=p, extra_fraction=0.7, train_limit=300).train for p in (npz, directory))
    assert isinstance(on_disk.extra, StreamedDataset) and not isinstance(in_ram.extra, StreamedDataset)
    a, b = _epoch(in_ram, 3), _epoch(on_disk, 3)
    assert len(a) == len(b) == 15  # 19 labeled per batch: the extra part cycles past its 50 rows
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_each_rank_reads_only_its_slice(tmp_path, monkeypatch):
    _, directory = _npz_and_dir(tmp_path)
    labeled = load_data("mnist5k", train_limit=300).train
    extra = load_extra(directory, image_shape=(1, 28, 28), num_classes=10)
    whole = _epoch(MixedDataset(labeled, extra, 0.7), 5)
    reads = []
    real = os.preadv
    monkeypatch.setattr(streamed.os, "preadv", lambda fd, buffers, offset: reads.append(offset) or real(fd, buffers, offset))
    for rank in range(4):  # 16 rows a rank: rank 0 holds labeled rows only, 1 straddles, 2 and 3 extra only
        reads.clear()
        part = _epoch(MixedDataset(labeled, extra, 0.7, rank=rank, world=4), 5)
        rows = slice(16 * rank, 16 * (rank + 1))
        for (xw, yw), (xr, yr) in zip(whole, part):
            assert torch.equal(xw[rows], xr[rows]) and torch.equal(yw, yr)
        assert len(reads) == len(whole) * [0, 16 - 19 % 16, 16, 16][rank]


def test_bad_directories_are_one_line_errors(tmp_path):
    images, labels = _arrays(n=20)
    good = {"images.npy": images, "labels.npy": labels}
    cases = {
        "dtype": ({"images.npy": images.astype(np.int16)}, "images must be N x H x W x C uint8"),
        "shape": ({"images.npy": np.zeros((20, 32, 32, 3), np.uint8)}, "images are (3, 32, 32) (C, H, W), the labeled data's are (1, 28, 28)"),
        "range": ({"labels.npy": labels + 5}, "allowed [0, 10)"),
        "count": ({"labels.npy": labels[:-1]}, "20 images but 19 labels"),
        "floats": ({"labels.npy": labels.astype(np.float32)}, "labels must be a 1-D integer array"),
        "missing": ({"labels.npy": None}, "lacks labels.npy; write it with: advews-data convert"),
        "truncated": ({}, "shorter than its header says (truncated?)"),
    }
    for name, (change, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, array in {**good, **change}.items():
            if array is not None:
                np.save(folder / file, array)
        if name == "truncated":
            (folder / "images.npy").write_bytes((folder / "images.npy").read_bytes()[:-100])
        with pytest.raises(AdvewsError) as info:
            load_data("mnist5k", extra_data=str(folder), train_limit=100)
        message = str(info.value).splitlines()[0] if "In call to" in str(info.value) else str(info.value)
        assert "\n" not in message and expected in message, (name, message)


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_resident_memory_does_not_grow_with_n(tmp_path):
    n = 1_000_000  # 2.35 GB of images as a sparse file: no disk used, reads return zeros
    folder = tmp_path / "big"
    folder.mkdir()
    with open(folder / "images.npy", "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, 28, 28, 1)})
        f.truncate(f.tell() + n * 784)
    np.save(folder / "labels.npy", np.arange(n, dtype=np.int64) % 10)
    before = _rss_mb()
    extra = load_extra(str(folder), image_shape=(1, 28, 28), num_classes=10)
    for index in torch.randint(n, (20, 512)):
        assert extra.images[index].shape == (512, 1, 28, 28)
    assert extra.labels.dtype == torch.uint8  # 1 MB for a million labels
    assert _rss_mb() - before < 40


def test_training_run_on_a_streamed_directory(tmp_path):
    _, directory = _npz_and_dir(tmp_path, n=64)
    params = [
        "data.dataset = 'mnist5k'", "data.train_limit = 64", "data.val_size = 16", "data.test_limit = 16",
        f"data.extra_data = '{directory}'", "data.extra_fraction = 0.7", "model.arch = 'small_preact_resnet'",
        "optimizer.name = 'adam'", "schedule.name = 'constant'", "train.epochs = 1", "train.batch_size = 32",
        "train.defense = 'Standard'", "train.val_steps = 1", "train.val_eps = 0.1",
    ]
    args = ["--quiet", "--output", str(tmp_path / "run")]
    for p in params:
        args += ["--gin-param", p]
    assert train_main(args) == 0
