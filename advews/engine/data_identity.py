"""The training data's fingerprint, kept in every training checkpoint, so ``--resume`` on data that
changed since the checkpoint is refused instead of silently breaking the promise that a resumed run
equals an uninterrupted one.

By content, not by path (``data.root`` may move): in-memory splits (the training and validation
splits, in-memory extra data) by a SHA-256 of their pixels and labels (``tensor_fingerprint``);
extra data streamed from disk by its labels and a sample of images.npy (``StreamedDataset.fingerprint``);
folder datasets (ImageNet) by their list of files and labels, since reading every image would
take longer than an epoch (a file replaced under the same name is not caught there).
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional

from advews.data import ArrayDataset, DataBundle, FolderDataset, MixedDataset, StreamedDataset
from advews.data.fingerprint import tensor_fingerprint
from advews.errors import AdvewsError

NAMES = {"train": "the training split", "val": "the validation split", "extra": "the extra data (data.extra_data)"}


def _split(data: Any) -> str:
    if isinstance(data, ArrayDataset):
        return tensor_fingerprint([data.images, data.labels])
    if isinstance(data, FolderDataset):
        h = hashlib.sha256(data.files.tobytes())
        h.update(tensor_fingerprint([data.labels]).encode())
        return h.hexdigest()
    return f"unknown:{type(data).__name__}:{len(data)}"


def data_fingerprint(data: DataBundle) -> Dict[str, str]:
    """{part: fingerprint} of what the run trains and selects on: 'train', 'val' and the extra data
    ('extra', or 'extra images.npy' and 'extra labels.npy' when streamed)."""
    out: Dict[str, str] = {}
    train = data.train
    if isinstance(train, MixedDataset):
        if isinstance(train.extra, StreamedDataset):
            out.update({f"extra {name}": fp for name, fp in train.extra.fingerprint().items()})
        else:
            out["extra"] = _split(train.extra)
        train = train.labeled
    out["train"] = _split(train)
    if data.val is not None:
        out["val"] = _split(data.val)
    return out


def _name(part: str, dataset: str) -> str:
    if part.startswith("extra "):
        return f"the extra data's {part[len('extra '):]}"
    return NAMES.get(part, part) + (f" of {dataset}" if part in ("train", "val") else "")


def check_same_data(saved: Optional[Dict[str, str]], current: Dict[str, str], dataset: str, path: str) -> None:
    """Refuse a resume whose data differ from the checkpoint's (one line naming what changed); a
    checkpoint written before checkpoints held a fingerprint (``saved`` None) is not checked."""
    if not isinstance(saved, dict):
        return
    parts = sorted(set(saved) | set(current))
    changed: List[str] = [_name(k, dataset) for k in parts if saved.get(k) != current.get(k)]
    if changed:
        raise AdvewsError(f"cannot resume {path}: the training data changed since it was saved ({', '.join(changed)} "
                          f"{'differs' if len(changed) == 1 else 'differ'} by content); resume on the same data, or "
                          "start a new run in another --output")
