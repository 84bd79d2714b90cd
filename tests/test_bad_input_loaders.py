"""Bad input to the loaders (issue 17, probe sections 4, 5 and 8): damaged or edited exports and
checkpoints, model specs that do not fit their weights, wrong types, non-finite weights, and
unusable output paths of advews-export and advews-data convert. Each is exit 2 (an AdvewsError for
the API) with one line naming what is wrong, no traceback, and nothing on disk changed: in
particular advews-export writes no export (and no directory) of a model that cannot be loaded.

The rows use the probe's ids (EX = tampered export, TC = tampered checkpoint, CV = convert); LD rows
are new. Their files are made once per module next to a copy of the shared world's trained run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import pytest
import torch
from test_bad_input import Bad, api, call, check_row, ev

from advews.cli.export import main as export_main
from advews.engine.checkpoint import HASH_KEY, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
N = ("--n-examples", "8", "--attack", "none")


def flip_200(path: str) -> None:
    """The probe's damage: 200 random bytes of the tensor data XOR 0x40 (header left intact)."""
    import random

    b = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", b[:8])[0]
    random.seed(3)
    for i in random.sample(range(8 + n, len(b)), 200):
        b[i] ^= 0x40
    open(path, "wb").write(bytes(b))


def flip_bit(path: str) -> None:
    """One bit of one weight (EX26)."""
    b = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", b[:8])[0]
    b[8 + n + 1001] ^= 0x01
    open(path, "wb").write(bytes(b))


def tampered_export(root: str, name: str, config: Optional[Callable[[Dict[str, Any]], None]] = None,
                    tensors: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None, rehash: bool = True) -> None:
    """A copy of ex/ok edited as a user could; with ``rehash`` the SHA-256 is recomputed, so only the
    edit itself can be what a loader refuses."""
    from safetensors.torch import load_file, save_file

    src, dst = os.path.join(root, "ex", "ok"), os.path.join(root, "ex", name)
    shutil.copytree(src, dst)
    weights = os.path.join(dst, "model.safetensors")
    if tensors is not None:
        loaded = load_file(weights)
        tensors(loaded)
        save_file(loaded, weights, metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(dst, "config.json")))
    if config is not None:
        config(cfg)
    if rehash:
        cfg["sha256"] = {"model.safetensors": hashlib.sha256(open(weights, "rb").read()).hexdigest()}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


def tampered_checkpoint(root: str, name: str, edit: Callable[[Dict[str, Any]], None]) -> None:
    """G.pt edited and saved with a recomputed content hash (TC rows: the hash is valid)."""
    state = {k: v for k, v in load_checkpoint(os.path.join(root, "G.pt")).items() if k != HASH_KEY}
    state["model_spec"] = dict(state["model_spec"])
    state["model"] = dict(state["model"])
    edit(state)
    save_checkpoint(state, os.path.join(root, "ck", name))


def set_in(key: str, sub: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    def edit(d: Dict[str, Any]) -> None:
        d[key] = {**d[key], sub: value}
    return edit


def set_key(key: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    return lambda d: d.__setitem__(key, value)


def nan_in(name: str) -> Callable[[Dict[str, torch.Tensor]], None]:
    def edit(weights: Dict[str, torch.Tensor]) -> None:
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] = float("nan")
    return edit


@pytest.fixture(scope="module")
def loaders(world: str, tmp_path_factory) -> str:
    """A folder with a copy of the world's trained run (G.pt), its export ex/ok and their tampered copies."""
    root = str(tmp_path_factory.mktemp("loaders"))
    shutil.copy(os.path.join(world, "run", "last.pt"), os.path.join(root, "G.pt"))
    for folder in ("ex", "ck"):
        os.makedirs(os.path.join(root, folder))
    assert export_main([os.path.join(root, "G.pt"), os.path.join(root, "ex", "ok")]) == 0
    ex = lambda *a, **k: tampered_export(root, *a, **k)  # noqa: E731
    ex("st_flip200", rehash=False)
    flip_200(os.path.join(root, "ex", "st_flip200", "model.safetensors"))
    ex("bit1", rehash=False)
    flip_bit(os.path.join(root, "ex", "bit1", "model.safetensors"))
    ex("nan", tensors=nan_in("model.linear.weight"))
    ex("inf_std", tensors=lambda w: w.__setitem__("std", torch.full_like(w["std"], float("inf"))))
    ex("std0", config=set_in("model_spec", "std", [0.0]))
    ex("classes5", config=set_in("model_spec", "num_classes", 5))
    ex("channels3", config=lambda c: c.__setitem__("model_spec", {**c["model_spec"], "in_channels": 3,
                                                                    "mean": [0.0] * 3, "std": [1.0] * 3}))
    ex("arch", config=set_in("model_spec", "arch", "preact_resnet18"))
    ex("mean3", config=set_in("model_spec", "mean", [0.1, 0.2, 0.3]))
    ex("extra", tensors=lambda w: w.__setitem__("model.extra", torch.zeros(3)))
    ex("eps_abc", config=set_in("threat_model", "eps", "abc"))
    ex("mean_abc", config=set_in("model_spec", "mean", "abc"))
    ex("threat_list", config=set_key("threat_model", [0.3, "Linf"]))
    ex("data_list", config=set_key("data_spec", ["mnist5k"]))
    ex("mean_other", config=set_in("model_spec", "mean", [0.5]))
    ex("weights_x", config=set_key("weights", "best"))
    ck = lambda name, edit: tampered_checkpoint(root, name, edit)  # noqa: E731
    ck("classes5.pt", lambda s: s["model_spec"].__setitem__("num_classes", 5))
    ck("arch.pt", lambda s: s["model_spec"].__setitem__("arch", "preact_resnet18"))
    ck("extra.pt", lambda s: s["model"].__setitem__("model.extra", torch.zeros(3)))
    ck("nan.pt", lambda s: nan_in("model.conv1.weight")(s["model"]))
    ck("eps_abc.pt", lambda s: s.__setitem__("threat_model", {"eps": "abc", "norm": "Linf"}))
    ck("std0.pt", lambda s: s["model_spec"].__setitem__("std", [0.0]))
    ck("arch_list.pt", lambda s: s["model_spec"].__setitem__("arch", ["small_preact_resnet"]))
    ck("model_list.pt", lambda s: s.__setitem__("model", [1, 2, 3]))
    torch.save([1, 2, 3], os.path.join(root, "ck", "list.pt"))
    state = load_checkpoint(os.path.join(root, "G.pt"))
    from advews.models import build_model

    net = build_model(state["model_spec"])
    net.load_state_dict(state["model"])
    weights = net.model.state_dict()
    weights["linear.bias"][0] = float("inf")
    torch.save(weights, os.path.join(root, "inf_net.pt"))
    rng = np.random.default_rng(0)
    with open(os.path.join(root, "c_ok.npz"), "wb") as f:
        np.savez(f, image=rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), label=np.arange(20) % 10)
    open(os.path.join(root, "afile"), "w").write("a regular file\n")
    return root


def export(id: str, args: Tuple[str, ...], *needles: str, forbid: str = "") -> Bad:
    return Bad(id, "export", tuple(args), needles, forbid)


def data(id: str, args: Tuple[str, ...], *needles: str, forbid: str = "") -> Bad:
    return Bad(id, "data", tuple(args), needles, forbid)


CASES = [
    # probe section 4: exports carry a SHA-256 of their weights; damage and non-finite models are refused
    ev("EX01", ("--checkpoint", "ex/st_flip200") + N, "ex/st_flip200/model.safetensors", "SHA-256"),
    ev("EX26", ("--checkpoint", "ex/bit1") + N, "ex/bit1/model.safetensors", "SHA-256"),
    api("EX35", call("advews:load_model", "ex/st_flip200"), "model.safetensors", "SHA-256"),
    ev("EX30", ("--checkpoint", "ex/nan") + N, "ex/nan", "not finite", "model.linear.weight"),
    ev("EX17", ("--checkpoint", "ex/std0") + N, "ex/std0", "std", "[0.0]"),
    ev("LD01", ("--checkpoint", "ex/inf_std") + N, "ex/inf_std", "not finite", "std"),
    ev("TC10", ("--checkpoint", "ck/nan.pt") + N, "ck/nan.pt", "not finite", "model.conv1.weight"),
    ev("LD02", ("--checkpoint", "ck/std0.pt") + N, "ck/std0.pt", "std", "[0.0]"),
    ev("LD03", ("--arch", "small_preact_resnet", "--weights", "inf_net.pt", "--data", "dataset:mnist5k",
                "--eps", "0.3") + N, "inf_net.pt", "not finite", "linear.bias"),
    # probe section 5: a model spec that does not fit its weights, and wrong types
    ev("EX06", ("--checkpoint", "ex/classes5") + N, "ex/classes5", "5 classes", "does not fit", "linear"),
    ev("EX07", ("--checkpoint", "ex/channels3") + N, "ex/channels3", "3 input channels", "does not fit"),
    ev("EX05", ("--checkpoint", "ex/arch") + N, "ex/arch", "preact_resnet18", "does not fit"),
    ev("EX16", ("--checkpoint", "ex/mean3") + N, "ex/mean3", "mean", "3 entries"),
    ev("EX31", ("--checkpoint", "ex/extra") + N, "ex/extra", "model.extra", "does not fit"),
    ev("LD04", ("--checkpoint", "ex/mean_other") + N, "ex/mean_other", "mean [0.5]", "does not fit"),
    ev("EX10", ("--checkpoint", "ex/eps_abc") + N, "ex/eps_abc", "eps", "'abc'"),
    ev("EX15", ("--checkpoint", "ex/mean_abc") + N, "ex/mean_abc", "mean", "'abc'"),
    ev("EX22", ("--checkpoint", "ex/threat_list") + N, "ex/threat_list", "threat_model", "list"),
    ev("EX23", ("--checkpoint", "ex/data_list") + N, "ex/data_list", "data_spec", "list"),
    ev("LD05", ("--checkpoint", "ex/weights_x") + N, "ex/weights_x", "weights", "'best'"),
    ev("TC09", ("--checkpoint", "ck/classes5.pt") + N, "ck/classes5.pt", "5 classes", "does not fit"),
    ev("TC16", ("--checkpoint", "ck/arch.pt") + N, "ck/arch.pt", "preact_resnet18", "does not fit"),
    ev("LD06", ("--checkpoint", "ck/extra.pt") + N, "ck/extra.pt", "model.extra", "does not fit"),
    ev("TC13", ("--checkpoint", "ck/eps_abc.pt") + N, "ck/eps_abc.pt", "eps", "'abc'"),
    ev("TC07", ("--checkpoint", "ck/list.pt") + N, "ck/list.pt", "list"),
    ev("LD07", ("--checkpoint", "ck/arch_list.pt") + N, "ck/arch_list.pt", "['small_preact_resnet']"),
    ev("LD08", ("--checkpoint", "ck/model_list.pt") + N, "ck/model_list.pt", "list", "weights"),
    api("LD09", call("advews:load_model", "ck/classes5.pt"), "ck/classes5.pt", "does not fit"),
    # advews-export checks the model before it writes anything (no export, no directory)
    export("TC20", ("ck/classes5.pt", "out/tc20"), "ck/classes5.pt", "does not fit"),
    export("TC18", ("ck/list.pt", "out/tc18"), "ck/list.pt", "list"),
    export("LD10", ("ck/nan.pt", "out/ld10"), "ck/nan.pt", "not finite"),
    export("LD11", ("ck/eps_abc.pt", "out/ld11"), "ck/eps_abc.pt", "'abc'"),
    export("LD12", ("G.pt", "afile"), "afile", "not a directory"),
    export("LD13", ("G.pt", "afile/sub"), "afile/sub", "not a directory"),
    export("LD14", ("G.pt", "/proc/advews_export"), "/proc/advews_export"),
    export("LD15", ("nosuch.pt", "out/ld15"), "nosuch.pt"),
    # probe section 8: advews-data convert to an unusable output path
    data("CV24", ("convert", "c_ok.npz", "afile"), "afile", "not a directory"),
    data("CV25", ("convert", "c_ok.npz", "afile/sub"), "afile/sub", "not a directory"),
    data("CV31", ("convert", "c_ok.npz", "/proc/advews_conv"), "/proc/advews_conv"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_loader_input_is_one_line_and_changes_nothing(case: Bad, loaders: str, monkeypatch, capfd) -> None:
    check_row(case, loaders, monkeypatch, capfd)


def test_the_intact_export_and_checkpoint_still_load(loaders: str, monkeypatch, capfd) -> None:
    """The control: the files every row tampered with load cleanly, with nothing on stderr."""
    import advews

    monkeypatch.chdir(loaders)
    for path in ("ex/ok", "G.pt"):
        assert advews.load_model(path).source["checkpoint"] == path
    assert capfd.readouterr().err == ""
