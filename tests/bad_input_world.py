"""The working directory of tests/test_bad_input.py: a good run and every bad file its table names
(truncated, corrupt, malicious, mislabeled), and a snapshot of it to prove nothing changed."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import zipfile
from typing import Dict, Union

import numpy as np
import torch

from advews.evaluation.corruptions import CORRUPTIONS


class _Evil:
    """A pickle that runs ``touch PWNED`` when loaded: loading it must be refused."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _savez(path, **arrays) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _cifar_batch(n: int = 4) -> bytes:
    rng = np.random.default_rng(0)
    return pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))},
                        protocol=2)


def _cifar_dir(root: str, content: bytes) -> None:
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)


def _flip_tensor_bytes(src: str, dst: str, count: int = 400) -> None:
    """Copy ``src`` with ``count`` bytes flipped inside its largest tensor, the first one written (model
    weights come before optimizer state); the zip stays readable."""
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(open(src, "rb").read())
    off = info.header_offset  # a local file header: 30 bytes, then the name and the extra field
    name_len, extra_len = (int.from_bytes(data[off + k:off + k + 2], "little") for k in (26, 28))
    start = off + 30 + name_len + extra_len
    step = max(info.file_size // count, 1)
    for i in range(count):
        data[start + i * step] ^= 0x5A
    open(dst, "wb").write(bytes(data))


def _resume_dir(world: str, name: str, last: Union[bytes, None]) -> str:
    """A copy of the good run whose last.pt holds ``last`` (None: last.pt is a directory)."""
    run = os.path.join(world, name)
    shutil.copytree(os.path.join(world, "run"), run)
    os.remove(os.path.join(run, "last.pt"))
    if last is None:
        os.makedirs(os.path.join(run, "last.pt"))
    else:
        open(os.path.join(run, "last.pt"), "wb").write(last)
    return run


def make_files(root: str) -> None:
    """Every bad file the table names, next to the good run in ``root/run``."""
    from advews.engine.checkpoint import load_checkpoint, save_checkpoint
    from advews.models import build_model

    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    last = open(j("run", "last.pt"), "rb").read()
    state = load_checkpoint(j("run", "last.pt"))
    for name, text in [("syntax.gin", "train.epochs = = 3\n"), ("unknown_binding.gin", "train.no_such_arg = 1\n"),
                       ("empty.gin", ""), ("afile", "a regular file\n"), ("text.pt", "hello\n"),
                       ("existing.json", "{}\n"), ("s.json", "{}\n"), ("extra.txt", "1 2 3\n")]:
        open(j(name), "w").write(text)
    for name in ("empty.pt", "zero.npz"):
        open(j(name), "wb").close()
    os.makedirs(j("adir"))
    open(j("trunc.pt"), "wb").write(last[:len(last) // 2])
    _flip_tensor_bytes(j("run", "last.pt"), j("bitflip.pt"))
    open(j("evil_plain.pt"), "wb").write(pickle.dumps(_Evil()))
    torch.save({"model_spec": _Evil()}, j("evil_torch.pt"))
    torch.save(state["model"], j("plain_state_dict.pt"))
    model = build_model(state["model_spec"])
    model.load_state_dict(state["model"])
    torch.save(model.model.state_dict(), j("net.pt"))
    bad_spec = {k: v for k, v in state.items() if k not in ("threat_model", "content_hash")}
    save_checkpoint({**bad_spec, "model_spec": {**state["model_spec"], "arch": "resnet9000"}}, j("bad_spec.pt"))

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    y = np.arange(20) % 10
    _savez(j("ok.npz"), x=x, y=y)
    _savez(j("missing_y.npz"), x=x)
    _savez(j("float_x.npz"), x=x.astype(np.float32), y=y)
    _savez(j("nan_float.npz"), x=np.full(x.shape, np.nan, np.float32), y=y)
    _savez(j("x3d.npz"), x=x[..., 0], y=y)
    _savez(j("wrong_hw.npz"), x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y=y)
    _savez(j("nchw.npz"), x=x.transpose(0, 3, 1, 2), y=y)
    _savez(j("labels_oor.npz"), x=x, y=np.full(20, 42))
    _savez(j("labels_neg.npz"), x=x, y=np.full(20, -1))
    _savez(j("labels_float.npz"), x=x, y=y.astype(np.float64))
    _savez(j("len_mismatch.npz"), x=x, y=y[:5])
    _savez(j("empty_n.npz"), x=x[:0], y=y[:0])
    _savez(j("obj.npz"), x=np.array([None, 1], dtype=object), y=y)
    open(j("corrupt.npz"), "wb").write(open(j("ok.npz"), "rb").read()[:3000])
    open(j("text.npz"), "w").write("not an archive\n")
    np.save(j("single.npy"), x)
    os.replace(j("single.npy"), j("single.npz"))

    _savez(j("extra_ok.npz"), image=x, label=y)
    _savez(j("extra_float.npz"), image=np.full(x.shape, np.nan, np.float32), label=y)
    _savez(j("extra_oor.npz"), image=x, label=np.full(20, 99))
    _savez(j("extra_shape.npz"), image=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), label=y)
    _savez(j("extra_keys.npz"), foo=x, bar=y)
    _savez(j("extra_obj.npz"), image=np.array([None], dtype=object), label=y)
    open(j("extra_evil.pickle"), "wb").write(pickle.dumps(_Evil()))
    good_pickle = pickle.dumps({"data": x, "extrapolated_targets": y})
    open(j("trunc.pickle"), "wb").write(good_pickle[: len(good_pickle) // 2])

    os.makedirs(j("cifar10c"))  # a CIFAR-10-C benchmark, for a model of 28 x 28 digits
    np.save(j("cifar10c", "labels.npy"), np.arange(5))
    for name in CORRUPTIONS:
        np.save(j("cifar10c", f"{name}.npy"), rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    _cifar_dir(j("cifar_evil"), pickle.dumps(_Evil()))
    batch = _cifar_batch()
    _cifar_dir(j("cifar_trunc"), batch[: len(batch) // 2])
    _cifar_dir(j("cifar_notdict"), pickle.dumps([1, 2, 3]))

    shutil.copytree(j("run"), j("precious_run"))
    _resume_dir(root, "r50", open(j("evil_torch.pt"), "rb").read())
    _resume_dir(root, "r51", last[: len(last) // 2])
    _resume_dir(root, "r53", last)
    _resume_dir(root, "r55", pickle.dumps(_Evil()))
    _resume_dir(root, "r_text", b"hello\n")
    _resume_dir(root, "r_empty", b"")
    _resume_dir(root, "r_dir", None)
    _resume_dir(root, "r_flip", last)
    _flip_tensor_bytes(j("run", "last.pt"), j("r_flip", "last.pt"))


def snapshot(root: str) -> Dict[str, str]:
    """Every file (by content hash) and folder under ``root``."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            seen[os.path.relpath(os.path.join(folder, d), root)] = "dir"
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                seen[os.path.relpath(path, root)] = hashlib.blake2b(fh.read(), digest_size=16).hexdigest()
    return seen
