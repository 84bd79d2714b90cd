"""DeepAugment: ImageNet's train/ plus distorted copies (EDSR/, CAE/) as one uniformly shuffled dataset."""

import os

import pytest
import torch
from PIL import Image

from advews.data import load_data
from advews.errors import AdvewsError

CLASSES = ["n01440764", "n01443537"]
SIZES = {"imagenet/train": 4, "imagenet/val": 1, "EDSR": 6, "CAE": 2}  # images a class
COLOUR = {"imagenet/train": 0, "EDSR": 1, "CAE": 2}  # each folder's images are pure red, green or blue


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("deepaugment")
    for folder, count in SIZES.items():
        for name in CLASSES:
            os.makedirs(base / folder / name)
            for i in range(count):
                colour = [0, 0, 0]
                colour[COLOUR.get(folder, 0)] = 250
                suffix = ".JPEG" if folder.startswith("imagenet") else ".png"  # DeepAugment copies may be PNG
                Image.new("RGB", (12, 10), tuple(colour)).save(base / folder / name / f"{name}_{i}{suffix}")
    return base


def _load(root, **kwargs):
    folders = [str(root / "EDSR"), str(root / "CAE")]
    return load_data("imagenet", root=str(root / "imagenet"), image_size=8, extra_folders=folders, **kwargs)


def test_folders_are_sampled_in_proportion_to_their_sizes(root):
    bundle = _load(root, val_size=2)
    train = bundle.train
    # train/ keeps 8 - 2 held out; EDSR (12) and CAE (4) lose the copies of those 2 held-out images
    held = {(int(y), os.path.splitext(os.path.basename(os.fsdecode(f)))[0]) for f, y in zip(bundle.val.files, bundle.val.labels)}
    cae = 4 - sum(name.endswith(("_0", "_1")) for _, name in held)
    assert len(held) == 2 and len(train) == 6 + 10 + cae
    sources, labels, firsts = [], [], []
    for epoch in range(4):
        batches = list(train.batches(5, shuffle=True, generator=torch.Generator().manual_seed(epoch)))
        xs = torch.cat([x for x, _ in batches])
        source = xs.mean(dim=(2, 3)).argmax(1)
        sources.append(source)
        labels.append(torch.cat([y for _, y in batches]))
        firsts.append(source[:5])
    expected = torch.tensor([6, 10, cae])
    for source in sources:  # one epoch: every image once, so each folder exactly its size
        assert torch.equal(torch.bincount(source, minlength=3), expected)
    assert sorted(torch.cat(labels).unique().tolist()) == [0, 1]
    assert len(set(torch.cat(firsts).tolist())) == 3  # shuffled across folders, not folder after folder


def test_deepaugment_with_augmix_trains(root, tmp_path):
    from advews.cli.train import main as train_main

    params = [
        "data.dataset = 'imagenet'", f"data.root = '{root / 'imagenet'}'", "data.image_size = 16",
        f"data.extra_folders = ['{root / 'EDSR'}', '{root / 'CAE'}']", "data.val_size = 2",
        "model.arch = 'small_preact_resnet'", "optimizer.name = 'adam'", "schedule.name = 'constant'",
        "train.epochs = 1", "train.batch_size = 8", "train.defense = 'AugMix'", "AugMix.width = 2",
        "train.val_eps = 0.01", "train.val_steps = 1",
    ]
    args = ["--quiet", "--output", str(tmp_path / "run")]
    for p in params:
        args += ["--gin-param", p]
    assert train_main(args) == 0


@pytest.mark.parametrize("case", ["missing", "unknown", "string", "in_memory"])
def test_mismatched_folders_are_one_line_errors(root, tmp_path, case):
    extra = tmp_path / "extra"
    for name in CLASSES[:1] if case == "missing" else CLASSES + ["n09999999"]:
        os.makedirs(extra / name)
        Image.new("RGB", (8, 8)).save(extra / name / "a.png")
    expected = {
        "missing": f"lacks class folder '{CLASSES[1]}'",
        "unknown": "has class folder 'n09999999' that the training split lacks",
        "string": "must be a list of directories",
        "in_memory": "needs a folder dataset such as imagenet, not the in-memory mnist5k",
    }[case]
    with pytest.raises(AdvewsError) as info:
        if case == "in_memory":
            load_data("mnist5k", extra_folders=[str(extra)])
        else:
            folders = str(extra) if case == "string" else [str(extra)]
            load_data("imagenet", root=str(root / "imagenet"), image_size=8, val_size=2, extra_folders=folders)
    message = str(info.value).splitlines()[0] if "In call to" in str(info.value) else str(info.value)
    assert "\n" not in message and expected in message, message
