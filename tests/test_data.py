"""Data: embedded MNIST-5k, CIFAR from its real on-disk format, batching and augmentation."""

from __future__ import annotations

import os
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advews.data import DATASETS, ArrayDataset, RandomCropFlip, load_data, split_validation
from advews.data.cifar import load_cifar10, load_cifar100
from advews.data.mnist5k import load_mnist5k
from advews.errors import AdvewsError


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


def _ids(n: int) -> ArrayDataset:
    """A dataset whose label is the example's index, to track where each example went."""
    return ArrayDataset(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n))


# ---- MNIST-5k -----------------------------------------------------------------------------------


def test_mnist5k_shapes_split_and_balance(mnist):
    train, test = mnist
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert test.labels[:10].tolist() == list(range(10))  # classes interleaved: prefixes stay balanced
    assert int(train.images.max()) == 255 and float(train.images.float().mean()) > 20  # real ink
    train_rows = {bytes(im.numpy()) for im in train.images}
    assert not any(bytes(im.numpy()) in train_rows for im in test.images)


def test_load_data_mnist5k_validation_split(mnist):
    bundle = load_data("mnist5k", split_seed=3)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (3500, 500, 1000)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert bundle.mean == (0.0,) and bundle.std == (1.0,) and bundle.train_augment is None
    assert set(bundle.val.labels.tolist()) == set(range(10))
    train_rows = {bytes(im.numpy()) for im in bundle.train.images}
    assert not any(bytes(im.numpy()) in train_rows for im in bundle.val.images)
    again = load_data("mnist5k", split_seed=3)
    assert torch.equal(again.val.images, bundle.val.images)
    other = load_data("mnist5k", split_seed=4)
    assert not torch.equal(other.val.images, bundle.val.images)


def test_split_validation_is_a_seeded_partition():
    data = _ids(100)
    train, val = split_validation(data, 30, seed=7)
    assert len(val) == 30 and len(train) == 70
    assert sorted(train.labels.tolist() + val.labels.tolist()) == list(range(100))
    assert train.labels.tolist() == sorted(train.labels.tolist())  # original order kept
    assert torch.equal(split_validation(data, 30, seed=7)[1].labels, val.labels)
    assert not torch.equal(split_validation(data, 30, seed=8)[1].labels, val.labels)
    assert split_validation(data, 0, seed=7) == (data, None)
    with pytest.raises(AdvewsError):
        split_validation(data, 100, seed=7)


def test_limits_and_unknown_dataset():
    bundle = load_data("mnist5k", val_size=0, train_limit=50, test_limit=20)
    assert (len(bundle.train), bundle.val, len(bundle.test)) == (50, None, 20)
    with pytest.raises(AdvewsError, match="cifar10, cifar100, imagenet, mnist5k"):
        load_data("svhn")
    assert {"mnist5k", "cifar10", "cifar100"} <= set(DATASETS)


# ---- CIFAR in torchvision's on-disk format ------------------------------------------------------


def _write_batch(path, images: np.ndarray, labels, label_key: bytes) -> None:
    """One batch file as in the official archive: a dict with bytes keys, rows in CHW-planar order."""
    entry = {
        b"batch_label": b"testing batch",
        b"data": images.reshape(len(images), 3 * 32 * 32),
        label_key: list(labels),
        b"filenames": [b"img_%d.png" % i for i in range(len(images))],
    }
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _fake_cifar10(root, per_file: int = 4):
    """Random images; file k's labels are k, and image 0 of data_batch_2 is one marked pixel."""
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    written = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images = rng.integers(0, 256, size=(per_file, 3, 32, 32), dtype=np.uint8)
        if name == "data_batch_2":
            images[0] = 0
            images[0].reshape(-1)[2 * 1024 + 5 * 32 + 17] = 255  # planar offset of (c=2, h=5, w=17)
        _write_batch(os.path.join(folder, name), images, [k] * per_file, b"labels")
        written[name] = images
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"class%d" % i for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return written


def test_cifar10_round_trip(tmp_path):
    written = _fake_cifar10(tmp_path)
    train, test = load_cifar10(str(tmp_path))
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert test.labels.tolist() == [5] * 4
    marked = train.images[4]
    assert marked.nonzero().tolist() == [[2, 5, 17]]
    expected = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)])
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert torch.equal(test.images, torch.from_numpy(written["test_batch"]))


def test_load_data_cifar10_bundle(tmp_path):
    _fake_cifar10(tmp_path)
    bundle = load_data("cifar10", root=str(tmp_path), val_size=5, test_limit=3)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 5, 3)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 3, 32)
    assert bundle.mean[0] == pytest.approx(0.4914) and isinstance(bundle.train_augment, RandomCropFlip)
    plain = load_data("cifar10", root=str(tmp_path), val_size=0, augment=False, normalize=False)
    assert plain.train_augment is None and plain.mean == (0.0,) * 3 and plain.std == (1.0,) * 3


def test_cifar100_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_images = rng.integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    _write_batch(folder / "train", train_images, [99, 0, 42, 7, 7, 1], b"fine_labels")
    _write_batch(folder / "test", test_images, [3, 64, 98], b"fine_labels")
    train, test = load_cifar100(str(tmp_path))
    assert torch.equal(train.images, torch.from_numpy(train_images))
    assert train.labels.tolist() == [99, 0, 42, 7, 7, 1] and test.labels.tolist() == [3, 64, 98]
    assert int(train.images[0, 1, 30, 2]) == int(train_images.reshape(6, -1)[0, 1024 + 30 * 32 + 2])
    assert load_data("cifar100", root=str(tmp_path), val_size=2).num_classes == 100


def test_missing_cifar_is_one_line(tmp_path):
    with pytest.raises(AdvewsError) as info:
        load_cifar10(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and os.path.join(str(tmp_path), "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message and "data.download = True" in message
    with pytest.raises(AdvewsError) as info:  # gin appends "In call to configurable" lines
        load_data("cifar10", root=str(tmp_path))
    assert str(info.value).splitlines()[0] == message


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(AdvewsError, match="could not download CIFAR-100") as info:
        load_cifar100(str(tmp_path), download=True)
    assert "\n" not in str(info.value) and "Temporary failure in name resolution" in str(info.value)


def test_refuses_pickled_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": os.system}, f, protocol=2)
    with pytest.raises(AdvewsError, match="refusing to unpickle") as info:
        load_cifar100(str(tmp_path))
    assert str(folder / "train") in str(info.value)


def test_truncated_or_foreign_cifar_batches_are_one_line(tmp_path):
    """A download cut short must say which file and what to do, not end in an UnpicklingError."""
    _fake_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(AdvewsError) as info:
        load_cifar10(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and str(batch) in message and "truncated or corrupt" in message
    assert "cifar-10-python.tar.gz" in message
    with open(batch, "wb") as f:
        pickle.dump([1, 2, 3], f, protocol=2)
    with pytest.raises(AdvewsError, match="is not a CIFAR-10 batch"):
        load_cifar10(str(tmp_path))


# ---- batches ------------------------------------------------------------------------------------


def test_batches_cover_each_example_once():
    data = _ids(10)
    seen = [y for _, y in data.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert [len(y) for y in seen] == [3, 3, 3, 1] and data.num_batches(3) == 4
    assert sorted(torch.cat(seen).tolist()) == list(range(10))
    assert torch.cat(seen).tolist() != list(range(10))  # shuffled
    kept = [y for _, y in data.batches(3, shuffle=True, drop_last=True, generator=torch.Generator())]
    assert [len(y) for y in kept] == [3, 3, 3] and data.num_batches(3, drop_last=True) == 3
    assert torch.cat([y for _, y in data.batches(4)]).tolist() == list(range(10))


def test_batches_reproducible_and_scaled(mnist):
    train, _ = mnist
    augment = RandomCropFlip(2)

    def epoch(seed):
        generator = torch.Generator().manual_seed(seed)
        return list(train.batches(256, shuffle=True, generator=generator, augment=augment))

    first, again, other = epoch(5), epoch(5), epoch(6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])
    x, y = first[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (256, 1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    plain, _ = next(train.batches(2, device="cpu"))
    assert torch.equal(plain, train.images[:2].float() / 255)


def test_array_dataset_checks_inputs():
    with pytest.raises(AdvewsError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(AdvewsError, match="int64"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(AdvewsError, match="2 images but 3 labels"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(AdvewsError, match="batch_size"):
        _ids(3).num_batches(0)


# ---- RandomCropFlip -----------------------------------------------------------------------------


def _candidates(image: torch.Tensor, padding: int) -> list:
    """Every crop (and its mirror) RandomCropFlip may produce from one image."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (padding,) * 4)
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * padding + 1) for j in range(2 * padding + 1)]
    return crops + [torch.flip(c, dims=[-1]) for c in crops]


def test_random_crop_flip_identity_and_shape():
    x = torch.rand(5, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(x, generator), x)
    assert RandomCropFlip()(x, generator).shape == x.shape


def test_random_crop_flip_flips_some_examples():
    x = torch.rand(16, 3, 8, 8)
    out = RandomCropFlip(padding=0, flip=True)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, torch.flip(i, dims=[-1])) for o, i in zip(out, x)]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert any(flipped) and any(kept) and all(f or k for f, k in zip(flipped, kept))


def test_random_crop_flip_per_example_crops():
    image = torch.rand(1, 3, 8, 8)
    x = image.expand(32, -1, -1, -1)
    out = RandomCropFlip(padding=2)(x, torch.Generator().manual_seed(1))
    assert len({bytes(o.numpy()) for o in out}) > 10  # offsets differ between examples
    candidates = _candidates(image[0], 2)
    assert all(any(torch.equal(o, c) for c in candidates) for o in out)
    again = RandomCropFlip(padding=2)(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_batches_crop_the_uint8_pixels_exactly_as_the_float_pixels():
    """to_batch crops before the float conversion (uint8_exact): the batch a run trains on is unchanged."""
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ArrayDataset(images, torch.arange(64) % 10)
    augment = RandomCropFlip(2)
    got = list(data.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3), augment=augment))
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(64, generator=gen)
    for b, (x, y) in enumerate(got):
        index = order[b * 16:(b + 1) * 16]
        assert x.dtype == torch.float32 and torch.equal(y, data.labels[index])
        assert torch.equal(x, augment(images[index].float().div_(255), gen))


def test_crop_fill_pads_with_the_authors_grey_on_uint8_and_float_pixels(tmp_path):
    """data.crop_fill = 128 is torchvision's RandomCrop(32, padding=4, fill=128) of the EWS AT/TRADES
    pipeline: every crop is one of the grey-padded candidates, and the float path pads with 128/255."""
    image = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = image.expand(32, -1, -1, -1)
    grey = RandomCropFlip(padding=2, fill=128)
    out = grey(x, torch.Generator().manual_seed(1))
    padded = F.pad(image[0], (2,) * 4, value=128)
    candidates = [padded[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    candidates += [torch.flip(c, dims=[-1]) for c in candidates]
    assert all(any(torch.equal(o, c) for c in candidates) for o in out)
    assert (out == 128).sum() > (x == 128).sum()  # some crops reach into the border
    as_float = grey(x.float() / 255, torch.Generator().manual_seed(1))
    assert torch.equal(as_float, out.float() / 255)
    black = RandomCropFlip(padding=2)(x, torch.Generator().manual_seed(1))
    assert not torch.equal(black, out)
    _fake_cifar10(tmp_path)
    assert load_data("cifar10", root=str(tmp_path), val_size=0, crop_fill=128).train_augment.fill == 128
    with pytest.raises(AdvewsError, match="crop_fill"):
        load_data("cifar10", root=str(tmp_path), val_size=0, crop_fill=300)
    with pytest.raises(AdvewsError, match="crop_fill needs a dataset with a crop"):
        load_data("mnist5k", crop_fill=128)
