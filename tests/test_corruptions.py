"""Corruption benchmarks on data the tests write, scored by models whose mistakes the tests choose."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from advews.data import load_data
from advews.errors import AdvewsError
from advews.evaluation import generated_corruptions
from advews.evaluation.cifar_c import evaluate_cifar_c
from advews.evaluation.corruptions import CORRUPTIONS, format_table, run_corruption_benchmark
from advews.evaluation.generated_corruptions import (
    SMALL_IMAGE_CORRUPTIONS,
    default_corruptions,
    evaluate_generated,
    generate_corruptions,
)
from advews.evaluation.imagenet_c import evaluate_imagenet_c


class PixelClassifier(nn.Module):
    """Predicts class v // 10 from the top-left pixel value v (0-255) of channel 0."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        value = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot((value // 10).clamp(max=self.num_classes - 1), self.num_classes).float()


class BrightnessClassifier(nn.Module):
    """Class 1 for bright images (mean above 0.5), else class 0: survives JPEG."""

    def forward(self, x):
        bright = (x.mean(dim=(1, 2, 3)) > 0.5).long()
        return nn.functional.one_hot(bright, 2).float()


class ConstantClassifier(nn.Module):
    def forward(self, x):
        return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([0]), 1.0)


PER_SEVERITY = 20


def wrong_count(ci: int, severity: int) -> int:
    """How many of a severity's images (the first ones) the test makes the model get wrong."""
    return ci % 5 + 2 * severity


@pytest.fixture(scope="module")
def cifar_c_dir(tmp_path_factory):
    """The official layout: <c>.npy of 5 x 20 images (severity-major) for the 15, and labels.npy."""
    root = tmp_path_factory.mktemp("cifar_c")
    rng = np.random.default_rng(0)
    labels = np.tile(rng.integers(0, 10, PER_SEVERITY), 5).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    for ci, name in enumerate(CORRUPTIONS):
        images = rng.integers(0, 256, (5 * PER_SEVERITY, 32, 32, 3), dtype=np.uint8)
        predicted = labels.astype(np.int64).copy()
        for s in range(1, 6):
            start = (s - 1) * PER_SEVERITY
            wrong = slice(start, start + wrong_count(ci, s))
            predicted[wrong] = (predicted[wrong] + 1) % 10
        images[:, 0, 0, 0] = 10 * predicted + 5
        np.save(root / f"{name}.npy", images)
    return root


def test_cifar_c_errors_per_severity_and_mean(cifar_c_dir):
    res = evaluate_cifar_c(PixelClassifier(), str(cifar_c_dir), batch_size=7)
    expected = {name: {s: wrong_count(ci, s) / PER_SEVERITY for s in range(1, 6)}
                for ci, name in enumerate(CORRUPTIONS)}
    assert list(res["corruptions"]) == list(CORRUPTIONS) and res["severities"] == [1, 2, 3, 4, 5]
    for name in CORRUPTIONS:
        assert res["corruptions"][name]["errors"] == pytest.approx(expected[name])
        assert res["corruptions"][name]["mean_error"] == pytest.approx(np.mean(list(expected[name].values())))
    assert res["mean_error"] == pytest.approx(np.mean([e for per in expected.values() for e in per.values()]))
    assert res["n_examples"] == 15 * 5 * PER_SEVERITY
    json.dumps(res)  # what the CLI will write

    # a limit keeps each severity's first images; a subset of severities is averaged alone
    quick = evaluate_cifar_c(PixelClassifier(), str(cifar_c_dir), corruptions=("gaussian_noise", "fog"),
                             severities=(1, 3), n_per_severity=8)
    # gaussian_noise (corruption 0) gets 2s images wrong, fog (corruption 9) 4 + 2s
    assert quick["corruptions"]["gaussian_noise"]["errors"] == pytest.approx({1: 2 / 8, 3: 6 / 8})
    assert quick["corruptions"]["fog"]["errors"] == pytest.approx({1: 6 / 8, 3: 8 / 8})
    assert quick["mean_error"] == pytest.approx((2 + 6 + 6 + 8) / 32)
    assert quick["n_examples"] == 2 * 2 * 8

    # the CLI's entry point gives the same numbers and prints them
    via_spec = run_corruption_benchmark(PixelClassifier(), f"cifar10-c:{cifar_c_dir}", batch_size=64)
    assert via_spec == {**res, "benchmark": "cifar10-c"}
    table = format_table(via_spec)
    assert "jpeg_compression" in table and f"{100 * res['mean_error']:.2f}%" in table


def test_cifar_c_missing_file_and_bad_input_are_one_line_errors(cifar_c_dir, tmp_path):
    with pytest.raises(AdvewsError, match="spatter.npy") as err:
        evaluate_cifar_c(PixelClassifier(), str(cifar_c_dir), corruptions=("fog", "spatter"))
    assert "\n" not in str(err.value)
    with pytest.raises(AdvewsError, match="labels.npy"):
        evaluate_cifar_c(PixelClassifier(), str(tmp_path), corruptions=("fog",))
    with pytest.raises(AdvewsError, match="unknown corruption 'rain'"):
        evaluate_cifar_c(PixelClassifier(), str(cifar_c_dir), corruptions=("rain",))
    with pytest.raises(AdvewsError, match="severities"):
        evaluate_cifar_c(PixelClassifier(), str(cifar_c_dir), corruptions=("fog",), severities=(0, 6))
    # all 15 by default: the first missing file is named before anything is evaluated
    (tmp_path / "labels.npy").write_bytes((cifar_c_dir / "labels.npy").read_bytes())
    with pytest.raises(AdvewsError, match="gaussian_noise.npy"):
        run_corruption_benchmark(PixelClassifier(), f"cifar100-c:{tmp_path}")
    # labels beyond the model's classes: the wrong benchmark for this model
    with pytest.raises(AdvewsError, match="outputs"):
        evaluate_cifar_c(PixelClassifier(num_classes=2), str(cifar_c_dir), corruptions=("fog",))


# ImageNet-C: 2 corruptions x 2 severities x 2 classes x 2 JPEGs; (corruption, severity) -> images wrong
IMAGENET_WRONG = {("gaussian_noise", 1): 0, ("gaussian_noise", 2): 1, ("fog", 1): 3, ("fog", 2): 4}
# AlexNet's published errors for these pairs (hendrycks/robustness, via AugMix / timm tables)
ALEXNET = {("gaussian_noise", 1): 0.69528, ("gaussian_noise", 2): 0.82542, ("fog", 1): 0.67474, ("fog", 2): 0.7605}


@pytest.fixture(scope="module")
def imagenet_c_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_c")
    for (name, s), wrong in IMAGENET_WRONG.items():
        k = 0
        for label, wnid in enumerate(("n01440764", "n01443537")):
            folder = root / name / str(s) / wnid
            folder.mkdir(parents=True)
            for j in range(2):
                bright = label if k >= wrong else 1 - label
                value = 220 if bright else 30
                Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(folder / f"img_{j}.JPEG")
                k += 1
    return root


def test_imagenet_c_mce_matches_hand_computation(imagenet_c_dir):
    res = evaluate_imagenet_c(BrightnessClassifier(), str(imagenet_c_dir), corruptions=("gaussian_noise", "fog"),
                              severities=(1, 2), image_size=32, batch_size=3)
    err = {pair: wrong / 4 for pair, wrong in IMAGENET_WRONG.items()}
    ce = {name: (err[name, 1] + err[name, 2]) / (ALEXNET[name, 1] + ALEXNET[name, 2])
          for name in ("gaussian_noise", "fog")}
    for name in ce:
        assert res["corruptions"][name]["errors"] == pytest.approx({1: err[name, 1], 2: err[name, 2]})
        assert res["corruptions"][name]["ce"] == pytest.approx(ce[name])
    assert res["mce"] == pytest.approx((ce["gaussian_noise"] + ce["fog"]) / 2)
    assert res["mean_error"] == pytest.approx(8 / 16)
    assert res["n_examples"] == 16
    table = format_table(res)
    assert "mCE" in table and "fog" in table

    # n_per_severity keeps the first images, interleaved by class (class 0's first, class 1's first)
    quick = evaluate_imagenet_c(BrightnessClassifier(), str(imagenet_c_dir), corruptions=("fog",),
                                severities=(1,), image_size=32, n_per_severity=2)
    assert quick["corruptions"]["fog"]["errors"] == {1: 1.0}
    with pytest.raises(AdvewsError, match=os.path.join("fog", "3")):
        evaluate_imagenet_c(BrightnessClassifier(), str(imagenet_c_dir), corruptions=("fog",), severities=(3,))


def test_generated_corruptions_are_cached_reproducible_and_guarded(tmp_path, monkeypatch):
    data = load_data(dataset="mnist5k").test.subset(range(8))
    assert default_corruptions(data.image_shape) == SMALL_IMAGE_CORRUPTIONS
    names = ("gaussian_noise", "impulse_noise", "zoom_blur")
    path = str(tmp_path / "cache.h5")
    cache = generate_corruptions(data, path, corruptions=names, severities=(1, 5), seed=0)
    first = {(c, s): cache.dataset(c, s) for c in names for s in (1, 5)}
    for ds in first.values():
        assert ds.images.shape == (8, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert torch.equal(ds.labels, data.labels)
        assert not torch.equal(ds.images, data.images)

    # a second call reads: it never corrupts anything and returns the same arrays
    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a cached corruption")

    with monkeypatch.context() as m:
        version = generated_corruptions._imagecorruptions()[1]
        m.setattr(generated_corruptions, "_imagecorruptions", lambda: (refuse, version))
        again = generate_corruptions(data, path, corruptions=names, severities=(1, 5), seed=0)
        for (c, s), ds in first.items():
            assert torch.equal(again.dataset(c, s).images, ds.images)

    # the same seed in a fresh file gives the same images, also when generated alone
    alone = generate_corruptions(data, str(tmp_path / "alone.h5"), corruptions=("impulse_noise",), severities=(5,))
    assert torch.equal(alone.dataset("impulse_noise", 5).images, first["impulse_noise", 5].images)
    other_seed = generate_corruptions(data, str(tmp_path / "seed1.h5"), corruptions=("gaussian_noise",),
                                      severities=(1,), seed=1)
    assert not torch.equal(other_seed.dataset("gaussian_noise", 1).images, first["gaussian_noise", 1].images)

    # a cache of other images is refused in one line and left as it was
    before = os.path.getmtime(path), os.path.getsize(path)
    with pytest.raises(AdvewsError, match="another source") as err:
        generate_corruptions(load_data(dataset="mnist5k").test.subset(range(8, 16)), path, corruptions=names,
                             severities=(1, 5))
    assert "\n" not in str(err.value) and path in str(err.value)
    assert (os.path.getmtime(path), os.path.getsize(path)) == before
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(AdvewsError, match="junk.h5"):
        generate_corruptions(data, str(tmp_path / "junk.h5"), corruptions=names)

    # labels 0..7 against a model that always says 0: 7/8 wrong on every pair
    res = evaluate_generated(ConstantClassifier(), cache, batch_size=3)
    assert res["corruptions"]["zoom_blur"]["errors"] == {1: 7 / 8, 5: 7 / 8}
    assert res["mean_error"] == pytest.approx(7 / 8) and res["n_examples"] == 8 * 6


def test_generated_spec_caches_by_source_and_bad_specs(tmp_path, monkeypatch):
    data = load_data(dataset="mnist5k").test
    kwargs = dict(default_dataset=data, cache_dir=str(tmp_path), n_examples=4)
    res = run_corruption_benchmark(ConstantClassifier(), "generated:contrast,pixelate", **kwargs)
    assert list(res["corruptions"]) == ["contrast", "pixelate"] and res["severities"] == [1, 2, 3, 4, 5]
    assert len(os.listdir(tmp_path)) == 1
    version = generated_corruptions._imagecorruptions()[1]
    monkeypatch.setattr(generated_corruptions, "_imagecorruptions",
                        lambda: (lambda *a, **k: pytest.fail("recomputed"), version))
    assert run_corruption_benchmark(ConstantClassifier(), "generated:contrast,pixelate", **kwargs) == res
    assert "contrast" in format_table(res)
    for bad in ("cifar10-c", "cifar10-c:", "svhn-c:/data", "generated:", "imagenet-c"):
        with pytest.raises(AdvewsError, match="cifar10-c:DIR, cifar100-c:DIR, imagenet-c:DIR or generated"):
            run_corruption_benchmark(ConstantClassifier(), bad, **kwargs)
    with pytest.raises(AdvewsError, match="unknown corruption 'rain'"):
        run_corruption_benchmark(ConstantClassifier(), "generated:rain", **kwargs)


def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    """imagecorruptions-imaug is the optional extra 'corruptions': without it, one line saying how to get it."""
    import sys

    monkeypatch.setitem(sys.modules, "imagecorruptions", None)
    data = load_data("mnist5k").test.subset(range(4))
    with pytest.raises(AdvewsError) as info:
        generate_corruptions(data, str(tmp_path / "c.h5"), corruptions=["contrast"], seed=0)
    assert str(info.value) == ("generated corruptions need the imagecorruptions-imaug package: "
                               "pip install 'advews[corruptions]'")
    assert not (tmp_path / "c.h5").exists()
