"""Reading user npz files without pickles: any file that is not a readable archive of plain
arrays (text, truncated, corrupt, object arrays) is one AdvewsError naming the file, never a
numpy or zipfile traceback."""

from __future__ import annotations

import zipfile
import zlib
from typing import Callable, List, Sequence, Tuple

import numpy as np

from advews.errors import AdvewsError

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_npz(path: str, pick: Callable[[List[str]], Sequence[str]]) -> Tuple[np.ndarray, ...]:
    """The arrays ``pick(names in the archive)`` chooses, read with ``allow_pickle=False``.

    ``pick`` raises its own AdvewsError when the keys it needs are missing."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in ZIP_MAGIC:
        kind = "an empty file" if not magic else "a single .npy array" if magic == b"\x93NUM" else "not a zip archive"
        raise AdvewsError(f"{path} is not an npz archive ({kind}); write one with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return tuple(archive[key] for key in pick(list(archive.files)))
    except AdvewsError:
        raise
    except _READ_ERRORS as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        if "allow_pickle" in reason:
            reason = "it holds object arrays, which need unpickling (arbitrary code); save numeric arrays"
        raise AdvewsError(f"cannot read {path} as an npz archive: {reason}") from None
