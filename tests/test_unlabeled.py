"""Extra pseudo-labeled data (RST): npz / HDF5 / opt-in pickle files, mixed batches, a training run."""

import pickle

import h5py
import numpy as np
import pytest
import torch

from advews.cli.train import main as train_main
from advews.data import ArrayDataset, MixedDataset, load_data, load_extra
from advews.errors import AdvewsError

PAIRS = [("image", "label"), ("data", "extrapolated_targets")]


def _extra_arrays(n=6, size=28, channels=1, seed=0):
    """N x H x W x C uint8 images with one marked pixel per image, and labels 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 200, size=(n, size, size, channels), dtype=np.uint8)
    images[:, 3, 5, channels - 1] = 255  # (h=3, w=5, last channel) after the transpose
    return images, (np.arange(n) % 10).astype(np.uint8)


def _check(dataset, images, labels):
    assert isinstance(dataset, ArrayDataset)
    assert dataset.images.shape == (len(images), images.shape[3], images.shape[1], images.shape[2])
    assert torch.equal(dataset.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert bool((dataset.images[:, -1, 3, 5] == 255).all())
    assert dataset.labels.dtype == torch.int64 and dataset.labels.tolist() == labels.tolist()


def _one_line(info):
    return str(info.value).splitlines()[0] if "In call to configurable" in str(info.value) else str(info.value)


@pytest.mark.parametrize("pair", PAIRS)
def test_npz_and_hdf5_key_pairs(tmp_path, pair):
    images, labels = _extra_arrays(channels=3, size=8)
    np.savez(tmp_path / "extra.npz", **{pair[0]: images, pair[1]: labels})
    _check(load_extra(str(tmp_path / "extra.npz"), image_shape=(3, 8, 8), num_classes=10), images, labels)
    with h5py.File(tmp_path / "extra.h5", "w") as f:
        f[pair[0]] = images
        f[pair[1]] = labels.astype(np.int64)
    _check(load_extra(str(tmp_path / "extra.h5")), images, labels)


def test_pickle_needs_opt_in(tmp_path):
    images, labels = _extra_arrays(channels=3, size=32)
    path = tmp_path / "ti_500K_pseudo_labeled.pickle"
    with open(path, "wb") as f:
        pickle.dump({"data": images, "extrapolated_targets": labels.tolist()}, f)
    with pytest.raises(AdvewsError) as info:
        load_extra(str(path))
    message = str(info.value)
    assert "\n" not in message and "allow_pickle" in message and "arbitrary code" in message
    _check(load_extra(str(path), allow_pickle=True), images, labels)


def test_bad_files_are_one_line_errors(tmp_path):
    images, labels = _extra_arrays()
    np.savez(tmp_path / "ok.npz", image=images, label=labels)
    np.savez(tmp_path / "keys.npz", x=images, y=labels)
    np.savez(tmp_path / "float.npz", image=images.astype(np.float32), label=labels)
    np.savez(tmp_path / "labels.npz", image=images, label=labels + 5)
    np.savez(tmp_path / "objects.npz", image=np.array([images], dtype=object), label=labels)
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:2000])
    (tmp_path / "text.npz").write_text("image,label\n")
    (tmp_path / "truncated.pickle").write_bytes(pickle.dumps({"image": images, "label": labels})[:500])
    cases = {
        "ok.npz": ("(1, 28, 28) (C, H, W), the labeled data's are (3, 32, 32)", {"image_shape": (3, 32, 32)}),
        "keys.npz": ("must hold arrays image/label or data/extrapolated_targets, found x, y", {}),
        "float.npz": ("N x H x W x C uint8", {}),
        "labels.npz": ("labels span [5, 10], allowed [0, 10)", {"num_classes": 10}),
        "objects.npz": ("holds object arrays, which need unpickling", {}),
        "truncated.npz": ("cannot read", {}),
        "text.npz": ("is not an npz archive", {}),
        "truncated.pickle": ("cannot unpickle", {"allow_pickle": True}),
        "missing.npz": ("not found", {}),
        "ok.txt": ("unknown suffix '.txt'", {}),
    }
    (tmp_path / "ok.txt").write_text("x")
    for name, (expected, kwargs) in cases.items():
        with pytest.raises(AdvewsError) as info:
            load_extra(str(tmp_path / name), **kwargs)
        assert expected in str(info.value) and "\n" not in str(info.value), name


def _mixed(n_labeled=100, n_extra=20, fraction=0.3):
    """Labeled images are 0 with labels 0..n-1; extra images are 255 with labels 1000 + index."""
    labeled = ArrayDataset(torch.zeros(n_labeled, 1, 2, 2, dtype=torch.uint8), torch.arange(n_labeled))
    extra = ArrayDataset(torch.full((n_extra, 1, 2, 2), 255, dtype=torch.uint8), 1000 + torch.arange(n_extra))
    return MixedDataset(labeled, extra, fraction)


def _epoch(data, batch_size, seed, drop_last=False):
    generator = torch.Generator().manual_seed(seed)
    return list(data.batches(batch_size, shuffle=True, drop_last=drop_last, generator=generator))


def test_mixed_batches_hold_the_fraction_and_follow_the_labeled_epoch():
    data = _mixed()
    assert len(data) == 100 and data.extra_per_batch(10) == 3  # 7 labeled per batch
    batches = _epoch(data, 10, seed=0)
    assert len(batches) == data.num_batches(10) == 15  # ceil(100 / 7)
    assert len(_epoch(data, 10, seed=0, drop_last=True)) == data.num_batches(10, drop_last=True) == 14
    for x, y in batches:
        is_extra = x.flatten(1).eq(1.0).all(1)
        assert torch.equal(is_extra, y >= 1000) and int(is_extra.sum()) == 3
        assert not is_extra[: len(y) - 3].any()  # labeled first
    assert [len(y) for _, y in batches] == [10] * 14 + [5]  # 2 labeled left + 3 extra
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels[labels < 1000].tolist()) == list(range(100))  # each labeled example once
    extra = (labels[labels >= 1000] - 1000).tolist()
    assert sorted(extra[:20]) == list(range(20)) and sorted(extra[20:40]) == list(range(20))  # cycling
    assert extra[:20] != list(range(20))  # shuffled


def test_mixed_batches_are_reproducible_and_augmented():
    data = _mixed()
    first, again, other = _epoch(data, 10, 5), _epoch(data, 10, 5), _epoch(data, 10, 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))
    seen = []
    list(data.batches(10, augment=lambda x, g: seen.append(x.clone()) or 1 - x))
    assert int(seen[0].flatten(1).eq(1.0).all(1).sum()) == 3  # the augmentation saw the extra part
    mixed_only = _mixed(fraction=0.0)
    assert mixed_only.num_batches(10) == 10 and all(bool((y < 1000).all()) for _, y in _epoch(mixed_only, 10, 0))


def test_mixed_rejects_bad_fractions():
    for fraction in (1.0, -0.1):
        with pytest.raises(AdvewsError, match=r"in \[0, 1\)"):
            _mixed(fraction=fraction)
    with pytest.raises(AdvewsError, match="leaves no labeled example"):
        _mixed(fraction=0.9).num_batches(4)


def test_load_data_mixes_after_the_validation_split(tmp_path):
    images, labels = _extra_arrays(n=30)
    np.savez(tmp_path / "extra.npz", image=images, label=labels)
    bundle = load_data("mnist5k", extra_data=str(tmp_path / "extra.npz"), extra_fraction=0.25, train_limit=256)
    assert isinstance(bundle.train, MixedDataset) and len(bundle.train) == 256 and len(bundle.val) == 500
    assert len(bundle.train.extra) == 30 and bundle.train.fraction == 0.25
    assert (bundle.in_channels, bundle.image_size) == (1, 28)
    assert bundle.train.num_batches(64, drop_last=True) == 5  # 256 labeled at 48 per batch
    with pytest.raises(AdvewsError) as info:
        load_data("mnist5k", extra_data=str(tmp_path / "extra.npz"), extra_fraction=1.0)
    assert _one_line(info) == "data.extra_fraction must be in [0, 1), got 1.0"


def test_training_run_with_extra_data(tmp_path):
    images, labels = _extra_arrays(n=64)
    np.savez(tmp_path / "extra.npz", image=images, label=labels)
    params = [
        "data.dataset = 'mnist5k'", "data.train_limit = 256", "data.val_size = 64", "data.test_limit = 64",
        f"data.extra_data = '{tmp_path / 'extra.npz'}'", "model.arch = 'small_preact_resnet'",
        "optimizer.name = 'adam'", "schedule.name = 'constant'", "train.epochs = 1", "train.batch_size = 64",
        "train.defense = 'AT'", "AT.eps = 0.3", "AT.steps = 1", "AT.step_size = 0.3", "train.val_steps = 1",
    ]
    args = ["--quiet", "--output", str(tmp_path / "run")]
    for p in params:
        args += ["--gin-param", p]
    assert train_main(args) == 0
    assert (tmp_path / "run" / "last.pt").is_file()
