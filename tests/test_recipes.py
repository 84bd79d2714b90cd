"""Every shipped recipe parses and trains two steps on tiny stand-in data in the real on-disk formats."""

import json
import os
import pickle

import gin
import numpy as np
import pytest
from PIL import Image

from advews.cli.common import available_recipes, parse_gin, recipe_dir
from advews.engine.trainer import Trainer

RECIPES = available_recipes()
# The timm recipes train a tiny model of their own family (and keep its ConvStem where they set one).
TINY_TIMM = {
    "timm:deit_small_patch16_224": "{'img_size': 32, 'patch_size': 8, 'depth': 1, 'embed_dim': 16, 'num_heads': 2, "
                                   "'conv_stem': True, 'conv_stem_width': 4}",
    "timm:convnext_tiny": "{'depths': (1, 1, 1, 1), 'dims': (8, 8, 8, 8), 'conv_stem': True}",
    "timm:vit_tiny_patch16_224": "{'img_size': IMG, 'patch_size': 4, 'depth': 1, 'embed_dim': 16, 'num_heads': 2}",
}


def write_cifar10(root, n_train=24, n_test=8):
    """torchvision's CIFAR-10 layout: five training pickles, a test pickle, rows of 3072 CHW bytes."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else n_train // 5 + 1
        blob = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(base / name, "wb") as f:
            pickle.dump(blob, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [str(i).encode() for i in range(10)]}, f)


def write_imagenet(root, classes=3, per_class=6, splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            d = (root / split if len(splits) > 1 else root) / f"n{c:08d}"
            d.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / f"{k}.JPEG")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root)
    write_imagenet(root / "imagenet")
    for copy in ("EDSR", "CAE"):  # DeepAugment's distorted copies mirror train/'s class folders
        write_imagenet(root / copy, splits=("train",))
    rng = np.random.default_rng(1)
    np.savez(root / "extra.npz", image=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
             label=rng.integers(0, 10, 32))
    (root / "gen").mkdir()  # generated data in the streamed format (advews-data convert's output)
    np.save(root / "gen" / "images.npy", rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8))
    np.save(root / "gen" / "labels.npy", rng.integers(0, 10, 32))
    return root


def test_recipe_list_covers_the_paper_rows():
    rows = ["standard", "standard_dropout", "autoaugment", "augmix", "at", "at_awp", "trades", "trades_awp",
            "trades_awp_unlabeled", "standard_imagenet", "augmix_imagenet", "deepaugment_imagenet",
            "deepaugment_augmix_imagenet", "trades_dm", "quickstart", "at_vit_imagenet", "at_convnext_imagenet",
            "at_vit_cifar", "quickstart_vit"]
    for row in rows:
        assert row in RECIPES and f"{row}_ews" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_two_steps(recipe, stand_in, tmp_path):
    text = open(os.path.join(recipe_dir(), recipe + ".gin")).read()
    assert text.startswith("#"), "every recipe opens with a header comment saying what it reproduces"
    parse_gin([recipe + ".gin"], [])
    arch = gin.query_parameter("model.arch")
    if arch in TINY_TIMM:
        model = [f"model.options = {TINY_TIMM[arch].replace('IMG', '28' if 'quickstart' in recipe else '32')}"]
    else:
        model = ["model.arch = 'small_preact_resnet'", "model.options = {'widths': (8, 16, 16)}"]
    tiny = model + [
        "train.epochs = 1", "train.batch_size = 8", "train.val_steps = 1", "train.eval_batch_size = 8",
        "data.val_size = 8", "data.train_limit = 16", "data.test_limit = 8",
        "AT.steps = 1", "TRADES.steps = 1", "MART.steps = 1", "AWP.warmup_epochs = 0",
    ]
    if "imagenet" in recipe:
        tiny += [f"data.root = '{stand_in / 'imagenet'}'", "data.image_size = 32", "data.num_workers = 0",
                 "data.pin_memory = False", "data.val_size = 3"]
        if "deepaugment" in recipe:
            tiny += [f"data.extra_folders = ['{stand_in / 'EDSR'}', '{stand_in / 'CAE'}']"]
    elif "quickstart" not in recipe:
        tiny += [f"data.root = '{stand_in}'"]
    if "unlabeled" in recipe:
        tiny += [f"data.extra_data = '{stand_in / 'extra.npz'}'"]
    if "trades_dm" in recipe:
        tiny += [f"data.extra_data = '{stand_in / 'gen'}'"]
    parse_gin([recipe + ".gin"], tiny)
    out = tmp_path / "run"
    Trainer(output_dir=str(out), quiet=True).run()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["epoch"] == 1 and np.isfinite(row["train_loss"])
    if recipe.endswith("_ews"):
        assert row["train_ews_kl"] > 0


ADVERSARIAL = ["AT", "TRADES", "MART", "AT_AWP", "TRADES_AWP", "AT_EWS", "TRADES_EWS", "MART_EWS",
               "AT_AWP_EWS", "TRADES_AWP_EWS"]


@pytest.mark.parametrize("defense", ADVERSARIAL)
def test_quickstart_switches_defense_with_one_binding(defense, tmp_path):
    parse_gin(["quickstart.gin"], [f"train.defense = '{defense}'",
                                   # tiny budget for the test only; the switch itself is the first binding
                                   "train.epochs = 1", "data.train_limit = 128", "data.val_size = 32",
                                   "AT.steps = 1", "TRADES.steps = 1", "MART.steps = 1", "train.val_steps = 1"])
    trainer = Trainer(output_dir=str(tmp_path / "run"), quiet=True)
    assert trainer.defense.attack.eps == 0.3  # the MNIST threat model, not a CIFAR default
    trainer.run()
