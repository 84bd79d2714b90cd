"""Convert an npz or HDF5 file of generated images (e.g. the EDM 1M-50M releases, 3 GB-154 GB) into
the streamed directory format (``streamed.py``) chunk by chunk, so no step holds more than one chunk.

An npz is a zip of .npy members, stored or deflate-compressed: each member is read through
zipfile's streaming reader (which inflates as it goes), its .npy header parsed, and its bytes
copied to the output in chunks. Both outputs are written under this process's temporary names and
renamed only once both are complete, so an interrupted conversion never leaves a directory that
looks valid; one killed between the two renames leaves one of the pair, an incomplete conversion
that a rerun replaces (a complete pair is never overwritten). A failure removes what it wrote,
including the directory if it created it; a full disk is exit 4 (``DiskFullError``).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

import numpy as np

from advews.data.streamed import IMAGES, LABELS
from advews.data.unlabeled import HDF5_SUFFIXES, pick_pair
from advews.errors import AdvewsError, disk_full, is_disk_full, remove_quietly
from advews.locks import is_tmp_of, tmp_name
from advews.outputs import check_output_dir, make_dirs, remove_dirs

DEFAULT_CHUNK_BYTES = 64 << 20
_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


@dataclass
class _Array:
    """One input array: its dtype and shape, and its C-order bytes in chunks of about ``chunk_bytes``."""

    dtype: np.dtype
    shape: Tuple[int, ...]
    chunks: Callable[[int], Iterator[bytes]]


def convert(source: str, directory: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tuple[int, ...]:
    """Write ``directory/images.npy`` (N x H x W x C uint8) and ``labels.npy`` from ``source`` (.npz
    with keys image/label or data/extrapolated_targets, or the same in HDF5); returns the images'
    shape. Refuses to overwrite an existing conversion; replaces an incomplete one (one file of the pair)."""
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise AdvewsError(f"chunk size must be a positive number of bytes, got {chunk_bytes}")
    if not os.path.isfile(source):
        raise AdvewsError(f"no such file: {source}")
    targets = [os.path.join(directory, name) for name in (IMAGES, LABELS)]
    if all(os.path.exists(target) for target in targets):
        raise AdvewsError(f"{targets[0]} already exists beside {LABELS} (a complete conversion); remove both "
                          "or choose another directory")
    suffix = os.path.splitext(source)[1].lower()
    opener = _npz_arrays if suffix == ".npz" else _hdf5_arrays if suffix in HDF5_SUFFIXES else None
    if opener is None:
        raise AdvewsError(f"cannot convert {source}: suffix {suffix!r} is not .npz, {', '.join(HDF5_SUFFIXES)}")
    check_output_dir(directory, f"; give a directory for {IMAGES} and {LABELS}")
    created: List[str] = []
    partials = [tmp_name(target) for target in targets]
    current = targets[0]
    try:
        try:
            created = make_dirs(directory)
        except OSError as e:
            raise _OutputError(e) from None
        with opener(source) as (images, labels):
            shape = _check(source, images, labels)
            current = targets[0]
            _write(partials[0], images, shape, chunk_bytes, lambda chunk: None)
            current = targets[1]
            _write(partials[1], labels, labels.shape, chunk_bytes, _nonnegative(source, labels.dtype))
        _remove_stale(directory, partials)
        for partial, target in zip(partials, targets):  # both complete; a kill between leaves an incomplete pair
            current = target
            _crash_hook(target)
            os.replace(partial, target)
    except BaseException as error:
        for partial in partials:
            remove_quietly(partial)
        remove_dirs(created)
        state = "was removed" if created else "is as it was"
        kept = f"nothing was converted ({source} is unchanged, {directory} {state})"
        if is_disk_full(error) or (isinstance(error, _OutputError) and is_disk_full(error.error)):
            raise disk_full(current, kept) from None
        if isinstance(error, _OutputError):
            raise AdvewsError(f"cannot write {current}: {error.reason}; {kept}") from None
        if isinstance(error, _ERRORS):
            reason = " ".join(str(error).split()) or type(error).__name__
            raise AdvewsError(f"cannot convert {source} (truncated or corrupt?): {reason}") from None
        raise
    return shape


class _OutputError(Exception):
    """Writing an output file failed (not reading the input): the message must blame the output."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error, self.reason = error, error.strerror or str(error)


def _remove_stale(directory: str, ours: List[str]) -> None:
    """The leftovers of an interrupted conversion: a lone half of the pair, and temporary files of
    processes that no longer run (older advews named them ``*.partial``)."""
    present = [name for name in (IMAGES, LABELS) if os.path.exists(os.path.join(directory, name))]
    if len(present) == 1:
        os.remove(os.path.join(directory, present[0]))
    for name in os.listdir(directory):
        for base in (IMAGES, LABELS):
            pid = name[len(base) + 1:-4] if is_tmp_of(name, base) else ""
            stale = name == base + ".partial" or (pid.isdigit() and not _alive(int(pid)))
            if stale and os.path.join(directory, name) not in ours:
                remove_quietly(os.path.join(directory, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _crash_hook(target: str) -> None:
    """Test-only: ``ADVEWS_TEST_KILL_AT=before-rename:labels.npy`` SIGKILLs this process just before
    it renames that file, i.e. between the two renames (as ``engine.checkpoint``'s hook does)."""
    point = os.environ.get("ADVEWS_TEST_KILL_AT", "")
    if point == f"before-rename:{os.path.basename(target)}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _check(source: str, images: _Array, labels: _Array) -> Tuple[int, ...]:
    """The output images' shape (N x H x W x C), once both inputs are known to be usable."""
    shape = images.shape + (1,) if len(images.shape) == 3 else images.shape
    if images.dtype != np.uint8 or len(shape) != 4 or shape[0] == 0:
        raise AdvewsError(f"{source}: images must be N x H x W x C uint8 with N > 0, got {images.dtype} {images.shape}")
    if len(labels.shape) != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise AdvewsError(f"{source}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != shape[0]:
        raise AdvewsError(f"{source}: {shape[0]} images but {labels.shape[0]} labels")
    return shape


def _nonnegative(source: str, dtype: np.dtype) -> Callable[[bytes], None]:
    def check(chunk: bytes) -> None:
        values = np.frombuffer(chunk, dtype=dtype)
        if len(values) and int(values.min()) < 0:
            raise AdvewsError(f"{source}: label {int(values.min())} is negative; labels must lie in [0, classes)")
    return check


def _output(write: Callable[[], object]) -> None:
    """Run one write to an output file; its OSError becomes ``_OutputError``."""
    try:
        write()
    except OSError as e:
        raise _OutputError(e)


def _write(path: str, array: _Array, shape: Tuple[int, ...], chunk_bytes: int, check: Callable[[bytes], None]) -> None:
    expected = int(np.prod(shape)) * array.dtype.itemsize
    written = 0
    try:
        f = open(path, "wb")
    except OSError as e:
        raise _OutputError(e)
    with f:
        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": shape}
        _output(lambda: np.lib.format.write_array_header_2_0(f, header))
        step = max(array.dtype.itemsize, chunk_bytes - chunk_bytes % array.dtype.itemsize)
        for chunk in array.chunks(step):
            check(chunk)
            _output(lambda: f.write(chunk))
            written += len(chunk)
        _output(f.flush)
        _output(lambda: os.fsync(f.fileno()))
    if written != expected:
        raise AdvewsError(f"{path}: the input holds {written} bytes of data where its header says {expected} "
                          "(truncated file?)")


@contextlib.contextmanager
def _npz_arrays(path: str) -> Iterator[Tuple[_Array, _Array]]:
    with zipfile.ZipFile(path) as archive:
        members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
        image_key, label_key = pick_pair(path, list(members))
        with archive.open(members[image_key]) as images, archive.open(members[label_key]) as labels:
            yield _npy_member(path, image_key, images), _npy_member(path, label_key, labels)


def _npy_member(path: str, key: str, stream) -> _Array:
    """The .npy header of an archive member, then its bytes as they come out of the (inflating) reader."""
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise AdvewsError(f"{path}: array {key!r} has .npy format version {version}, supported 1.0 and 2.0")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise AdvewsError(f"{path}: array {key!r} holds Python objects (needs unpickling); save numeric arrays")
    if fortran_order and len(shape) > 1:
        raise AdvewsError(f"{path}: array {key!r} is stored in Fortran order; save it C-contiguous")

    def chunks(size: int) -> Iterator[bytes]:
        while True:
            chunk = stream.read(size)
            if not chunk:
                return
            yield chunk

    return _Array(dtype, tuple(shape), chunks)


@contextlib.contextmanager
def _hdf5_arrays(path: str) -> Iterator[Tuple[_Array, _Array]]:
    import h5py  # only HDF5 users pay for the import

    with h5py.File(path, "r") as f:
        names = [k for k in f.keys() if isinstance(f[k], h5py.Dataset)]
        image_key, label_key = pick_pair(path, names)
        yield _hdf5_dataset(f[image_key]), _hdf5_dataset(f[label_key])


def _hdf5_dataset(dataset) -> _Array:
    row_bytes = max(1, int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize)

    def chunks(size: int) -> Iterator[bytes]:
        rows = max(1, size // row_bytes)
        for start in range(0, dataset.shape[0], rows):
            yield np.ascontiguousarray(dataset[start : start + rows]).tobytes()

    return _Array(np.dtype(dataset.dtype), tuple(dataset.shape), chunks)

