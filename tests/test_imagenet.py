"""ImageNet as ImageFolder trees of JPEGs, loaded through DataLoader; torchvision's ResNet-50 subnets."""

import dataclasses
import os

import pytest
import torch
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm

from advews.data import FolderDataset, load_data
from advews.data.imagenet import load_imagenet
from advews.errors import AdvewsError
from advews.models import build_model
from advews.subnets import random_subnet, space_of, subnet

CLASSES = ["n01440764", "n01443537", "n01484850"]  # class c is pure colour channel c, so x tells y


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tree(root, per_class):
    for split, count in per_class.items():
        for c, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(count):
                colour = [0, 0, 0]
                colour[c] = 200 + 10 * i
                Image.new("RGB", (40, 30 + 4 * i), tuple(colour)).save(os.path.join(folder, f"{name}_{i}.JPEG"))
    with open(os.path.join(root, "train", CLASSES[0], "notes.txt"), "w") as f:  # not an image: skipped
        f.write("x")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("imagenet"))
    _tree(path, {"train": 4, "val": 2})
    return path


def _colour_class(x):
    return x.mean(dim=(2, 3)).argmax(1)


def test_load_imagenet_layout(root):
    train, test = load_imagenet(root)
    assert isinstance(train, FolderDataset) and (len(train), len(test)) == (12, 6)
    assert train.labels.tolist() == [0, 1, 2] * 4 and test.labels.tolist() == [0, 1, 2] * 2  # interleaved
    assert train.augment and not test.augment and train.image_shape == (3, 224, 224)
    x, y = next(test.batches(6))
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and torch.equal(_colour_class(x), y)


def test_load_data_imagenet_bundle(root):
    bundle = load_data("imagenet", root=root, image_size=32, val_size=3, num_workers=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 3, 6)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (1000, 3, 32)
    assert bundle.train_augment is None and bundle.mean == (0.485, 0.456, 0.406)
    assert bundle.train.augment and not bundle.val.augment and not bundle.test.augment
    batches = list(bundle.train.batches(4, shuffle=True, drop_last=True, generator=torch.Generator()))
    assert len(batches) == bundle.train.num_batches(4, drop_last=True) == 2
    assert all(x.shape == (4, 3, 32, 32) for x, _ in batches)
    assert all(torch.equal(_colour_class(x), y) for x, y in batches)
    limited = load_data("imagenet", root=root, image_size=32, val_size=0, train_limit=5, augment=False)
    assert limited.val is None and limited.train.labels.tolist() == [0, 1, 2, 0, 1] and not limited.train.augment


def test_folder_batches_depend_on_the_generator_only(root):
    train = load_data("imagenet", root=root, image_size=24, val_size=0).train

    def epoch(seed, workers=0):
        data = dataclasses.replace(train, num_workers=workers)
        return list(data.batches(5, shuffle=True, generator=torch.Generator().manual_seed(seed)))

    state = torch.get_rng_state()
    first = epoch(0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert [len(y) for _, y in first] == [5, 5, 2]
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted([0, 1, 2] * 4)
    for again in (epoch(0), epoch(0, workers=1)):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert torch.equal(torch.get_rng_state(), state)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(1)))


def test_missing_imagenet_is_one_line(tmp_path):
    with pytest.raises(AdvewsError) as info:
        load_data("imagenet", root=str(tmp_path / "nowhere"))
    message = str(info.value).splitlines()[0]
    assert message.startswith(f"ImageNet not found at {tmp_path / 'nowhere'}")
    assert "train/<class>/*.JPEG" in message and "data.root" in message
    with pytest.raises(AdvewsError, match="cannot resize mnist5k"):
        load_data("mnist5k", image_size=32)


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_tv_resnet50_subnets():
    torch.manual_seed(0)
    model = build_model({"arch": "tv_resnet50", "num_classes": 3, "in_channels": 3})
    space = space_of(model)
    assert len(space.blocks) == 16 and [len(b.paths) for b in space.blocks].count(2) == 4  # 4 downsamples
    assert space.blocks[0].name == "model.layer1.0" and len(space.blocks[0].paths[0].layers) == 1  # conv2 only
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    alpha = random_subnet(space, 0.5, torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        full = model(x)
        with subnet(model, alpha):
            sub = model(x)
    assert full.shape == (2, 3) and not torch.allclose(sub, full)
    model.train()
    before = _bn_state(model)
    with subnet(model, alpha):
        model(x).sum().backward()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, _BatchNorm))
    with pytest.raises(AdvewsError, match="3 input channels"):
        build_model({"arch": "tv_resnet50", "num_classes": 3, "in_channels": 1})
