"""CIFAR-10-P / CIFAR-100-P and ImageNet-P (Hendrycks & Dietterich, 2019) as released: sequences
of frames that drift under one perturbation each, read as uint8 (T, H, W, 3) arrays.

CIFAR-P: ``<root>/<perturbation>.npy``, one uint8 array (N, T, H, W, 3) per perturbation: N
sequences of T frames (N = 10000, H = W = 32 in the release; the noise files hold the clean test
image followed by 30 noisy copies, as hendrycks/robustness ImageNet-P/create_p/make_cifar_p.py
writes them). The sequences follow the CIFAR test-set order, but no labels are read: flip rates
compare predictions with predictions, and the reference evaluation (ImageNet-P/cifar-p-eval.py)
feeds dummy targets.

ImageNet-P: ``<root>/<perturbation>/<wnid>/*.mp4``, one H.264 video per validation image (224 x
224 frames, written by ffmpeg from PNGs in make_imagenet_p.py). Decoded with OpenCV's
``cv2.VideoCapture``, the decoder of the reference loader (ImageNet-P/utils/video_loader.py):
opencv-python comes with advews's dependency imagecorruptions-imaug and its wheels bundle FFmpeg,
so a fresh install reads the videos without a system ffmpeg, whereas torchvision's video reader
needs PyAV and imageio needs imageio-ffmpeg, neither of them installed with advews. Frames already
extracted to images are not read: the release ships mp4 only and there is no standard layout for
extracted frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from advews.errors import AdvewsError

PERTURBATIONS = ("gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow",
                 "brightness", "translate", "rotate", "tilt", "scale")
"""The 10 perturbations of the paper's Table 3 (ImageNet-P), in its order."""

EXTRA_PERTURBATIONS = ("spatter", "speckle_noise", "gaussian_blur", "shear")
"""The other sequences the reference scripts know (cifar-p-eval.py evaluates spatter in place of
snow); read when present, flagged as outside the standard set by the evaluation."""

SPEC_FORMS = "cifar10-p:DIR, cifar100-p:DIR or imagenet-p:DIR"


def is_noise(perturbation: str) -> bool:
    """Noise sequences are not temporally related, so every frame is compared with the first
    (clean) one; the reference scripts decide it by ``'noise' in name``, and so does this."""
    return "noise" in perturbation


Source = Union[np.ndarray, Tuple[str, ...]]


@dataclass(frozen=True)
class PerturbationSet:
    """The sequences of each perturbation of one benchmark directory, read lazily: a memory-mapped
    array (CIFAR-P) or the video paths (ImageNet-P), so opening checks everything and reads little."""

    benchmark: str
    root: str
    sources: Dict[str, Source]

    @property
    def perturbations(self) -> Tuple[str, ...]:
        return tuple(self.sources)

    def n_sequences(self, perturbation: str) -> int:
        return len(self.sources[perturbation])

    def sequences(self, perturbation: str) -> Iterator[np.ndarray]:
        """Each sequence of ``perturbation`` as a uint8 (T, H, W, 3) array, in a fixed order."""
        source = self.sources[perturbation]
        if isinstance(source, np.ndarray):
            for i in range(len(source)):
                yield np.array(source[i])  # a copy: the map is read-only
            return
        size = None
        for path in source:
            frames = read_video(path)
            if size is None:
                size = frames.shape[1:]
            elif frames.shape[1:] != size:
                raise AdvewsError(f"{path} has {frames.shape[2]}x{frames.shape[1]} frames but the videos before "
                                  f"it have {size[1]}x{size[0]}; every video of a perturbation needs one size")
            yield frames


def open_perturbation_set(
    spec: str, *, perturbations: Optional[Sequence[str]] = None, max_sequences: Optional[int] = None
) -> PerturbationSet:
    """The set a CLI spec names (``SPEC_FORMS``), e.g. ``cifar10-p:/data/CIFAR-10-P``."""
    kind, _, root = spec.partition(":")
    if kind in ("cifar10-p", "cifar100-p") and root:
        return open_cifar_p(root, perturbations=perturbations, max_sequences=max_sequences, benchmark=kind)
    if kind == "imagenet-p" and root:
        return open_imagenet_p(root, perturbations=perturbations, max_sequences=max_sequences)
    raise AdvewsError(f"bad perturbation set {spec!r}; use {SPEC_FORMS}")


def open_cifar_p(
    root: str,
    *,
    perturbations: Optional[Sequence[str]] = None,
    max_sequences: Optional[int] = None,
    benchmark: str = "cifar10-p",
) -> PerturbationSet:
    """``root``'s ``<perturbation>.npy`` files (all known ones present, or those named), each
    checked to be uint8 (N, T, H, W, 3) with T >= 2; ``max_sequences`` keeps the first N of each."""
    layout = "<root>/<perturbation>.npy"
    _check_root(root, benchmark, layout, max_sequences)
    present = {n for n in PERTURBATIONS + EXTRA_PERTURBATIONS if os.path.isfile(os.path.join(root, n + ".npy"))}
    names = _choose(perturbations, present, root, benchmark, layout)
    sources = {}
    for name in names:
        path = os.path.join(root, name + ".npy")
        if not os.path.isfile(path):
            raise AdvewsError(f"{benchmark} file not found: {path} (expected {layout})")
        sources[name] = _load_sequences(path)[:max_sequences]
    return PerturbationSet(benchmark, root, sources)


def open_imagenet_p(
    root: str, *, perturbations: Optional[Sequence[str]] = None, max_sequences: Optional[int] = None
) -> PerturbationSet:
    """``root``'s ``<perturbation>/<wnid>/*.mp4`` videos (all known perturbation folders present, or
    those named). ``max_sequences`` keeps the first N videos taken class by class in turn (each
    class's first video, then each one's second, ...), so a short run still spans the classes."""
    layout = "<root>/<perturbation>/<wnid>/*.mp4"
    _check_root(root, "imagenet-p", layout, max_sequences)
    present = {n for n in PERTURBATIONS + EXTRA_PERTURBATIONS if os.path.isdir(os.path.join(root, n))}
    names = _choose(perturbations, present, root, "imagenet-p", layout)
    sources = {}
    for name in names:
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise AdvewsError(f"imagenet-p folder not found: {folder} (expected {layout})")
        ranked = []
        for wnid in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
            videos = sorted(f for f in os.listdir(os.path.join(folder, wnid)) if f.endswith(".mp4"))
            ranked += [(i, wnid, os.path.join(folder, wnid, f)) for i, f in enumerate(videos)]
        if not ranked:
            raise AdvewsError(f"no .mp4 videos in {folder} (expected {layout})")
        sources[name] = tuple(path for _, _, path in sorted(ranked))[:max_sequences]
    return PerturbationSet("imagenet-p", root, sources)


def read_video(path: str) -> np.ndarray:
    """All frames of the video ``path`` as uint8 RGB (T, H, W, 3), decoded by OpenCV."""
    try:
        import cv2  # slow import, only when videos are read
    except ImportError:
        raise AdvewsError("reading ImageNet-P videos needs OpenCV: pip install 'advews[corruptions]'") from None

    capture = cv2.VideoCapture(path)
    frames = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if len(frames) < 2:
        raise AdvewsError(f"cannot read {path} as a video of at least 2 frames "
                          f"(OpenCV decoded {len(frames)}); is it an intact ImageNet-P .mp4?")
    return np.stack(frames)


def _check_root(root: str, benchmark: str, layout: str, max_sequences: Optional[int]) -> None:
    if max_sequences is not None and max_sequences < 1:
        raise AdvewsError(f"max_sequences must be at least 1, got {max_sequences}")
    if not os.path.isdir(root):
        raise AdvewsError(f"{benchmark} directory not found: {root} (expected {layout})")


def _choose(
    requested: Optional[Sequence[str]], present: set, root: str, benchmark: str, layout: str
) -> Tuple[str, ...]:
    """The perturbations to read: those named (checked against the known names), else every known one present."""
    known = PERTURBATIONS + EXTRA_PERTURBATIONS
    if requested is None:
        names = tuple(n for n in known if n in present)
        if not names:
            raise AdvewsError(f"no {benchmark} perturbation found in {root}: expected {layout} "
                              f"for at least one of {', '.join(known)}")
        return names
    names = tuple(requested)
    bad = [n for n in names if n not in known]
    if not names or bad:
        found = f"unknown perturbation {bad[0]!r}" if bad else "no perturbations"
        raise AdvewsError(f"{found} for {benchmark}; choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise AdvewsError(f"perturbations for {benchmark} repeat a name: {', '.join(names)}")
    return names


def _load_sequences(path: str) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise AdvewsError(f"cannot read {path} as a .npy array: {str(error).splitlines()[0]}") from None
    if array.dtype != np.uint8 or array.ndim != 5 or array.shape[4] != 3 or array.shape[1] < 2 or not len(array):
        raise AdvewsError(f"{path} must be uint8 (sequences, frames >= 2, height, width, 3), "
                          f"got {array.dtype} with shape {array.shape}")
    return array
