"""Where an evaluation's data and derived files come from: npz files or named datasets given as
``--data`` (else the test split of the checkpoint's dataset), and the folders next to the model."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from advews.api.options import EvalOptions
from advews.errors import AdvewsError
from advews.models.external import NORMALIZATIONS

# Data options that shape only the training split: evaluation never reloads the extra data.
TRAIN_ONLY_DATA = ("train_limit", "extra_data", "extra_fraction", "allow_pickle")
DATA_FORMS = "npz:FILE or dataset:NAME[:ROOT]"
CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: a last axis of another size means the layout is wrong


def load_npz(path: str):
    """An npz file's x (N x H x W x C uint8) and y (N integers) as a dataset, read without pickles."""
    from advews.data import ArrayDataset
    from advews.data.npz import read_npz

    if not os.path.isfile(path):
        raise AdvewsError(f"--data npz file not found: {path}")

    def pick(keys):
        if "x" not in keys or "y" not in keys:
            raise AdvewsError(f"{path} must hold arrays 'x' and 'y', found {', '.join(keys) or 'none'}")
        return "x", "y"

    x, y = read_npz(path, pick)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise AdvewsError(f"{path}: x must be N x H x W x C uint8, got {x.dtype} with shape {x.shape}")
    if len(x) == 0:
        raise AdvewsError(f"{path}: x holds no images (N = 0)")
    if x.shape[3] not in CHANNELS and x.shape[1] in CHANNELS:
        raise AdvewsError(f"{path}: x of shape {x.shape} looks like N x C x H x W; store N x H x W x C "
                          "(numpy.transpose(x, (0, 2, 3, 1)))")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise AdvewsError(f"{path}: y must be {len(x)} integers, got {y.dtype} with shape {y.shape}")
    return ArrayDataset(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64)))


def dataset_args(spec: str) -> Dict[str, str]:
    """``load_data`` arguments of a ``dataset:NAME[:ROOT]`` spec."""
    name, _, root = spec[len("dataset:"):].partition(":")
    if not name:
        raise AdvewsError(f"bad --data {spec!r}; use dataset:NAME[:ROOT], e.g. dataset:cifar10:data")
    return {"dataset": name, **({"root": root} if root else {})}


def load_eval_data(spec: Optional[str], data_spec: Dict[str, Any]):
    """The test data: ``--data``, else the test split of the checkpoint's dataset (``data_spec``)."""
    from advews.data import load_data

    if spec is None:
        if not data_spec:
            raise AdvewsError(f"--data is required without --checkpoint (there is no training dataset): {DATA_FORMS}")
        return load_data(**{k: v for k, v in data_spec.items() if k not in TRAIN_ONLY_DATA}).test
    if spec.startswith("npz:"):
        return load_npz(spec[4:])
    if spec.startswith("dataset:"):
        return load_data(**dataset_args(spec)).test
    raise AdvewsError(f"bad --data {spec!r}; use {DATA_FORMS}, or leave it out for the checkpoint's test split")


def check_model_source(args: EvalOptions) -> None:
    """Exactly one model: --checkpoint, --arch with --weights, or --model."""
    sources = (("--checkpoint", args.checkpoint), ("--arch/--weights", args.arch or args.weights), ("--model", args.model))
    given = [flag for flag, value in sources if value]
    if len(given) != 1:
        raise AdvewsError(f"give exactly one model: --checkpoint PATH, --arch NAME --weights FILE or --model "
                          f"MODULE:FUNCTION (got {' and '.join(given) or 'none'})")
    if bool(args.arch) != bool(args.weights):
        raise AdvewsError(f"--arch and --weights go together, got only {'--arch' if args.arch else '--weights'}")
    if args.weights_from and not args.checkpoint:
        raise AdvewsError("--weights-from picks a checkpoint's EMA or live weights; it needs --checkpoint")
    if not args.arch and (args.normalization or args.num_classes is not None):
        raise AdvewsError("--normalization and --num-classes describe --arch/--weights models; "
                          "a checkpoint or --model fixes its own")


def external_defaults(data: str, normalization: Optional[str], num_classes: Optional[int]) -> Tuple[str, int]:
    """--normalization and --num-classes of an --arch model: the flags, else those of --data dataset:NAME."""
    from advews.data import get_dataset

    spec = get_dataset(dataset_args(data)["dataset"]) if data.startswith("dataset:") else None
    if normalization is None and spec is not None:
        normalization = next((name for name, stats in NORMALIZATIONS.items() if stats is not None and
                              tuple(stats[0]) == tuple(spec.mean) and tuple(stats[1]) == tuple(spec.std)), None)
        if normalization is None and set(spec.mean) == {0.0} and set(spec.std) == {1.0}:
            normalization = "none"
    if normalization is None:
        raise AdvewsError(f"--normalization is required for --data {data!r}: the input normalization the "
                          f"weights were trained with, one of {', '.join(NORMALIZATIONS)}")
    num_classes = num_classes if num_classes is not None else spec.num_classes if spec else 10
    return normalization, num_classes


def describe(info: Dict[str, Any]) -> str:
    """The model as the reports name it."""
    if "checkpoint" in info:
        weights = f", {info['weights']} weights" if "weights" in info else ""
        return f"{info['checkpoint']} (epoch {info['epoch']}{weights})"
    if "arch" in info:
        return f"{info['arch']} with {info['weights']} (normalization {info['normalization']})"
    return info["model"]


def home_dir(info: Dict[str, Any]) -> str:
    """Where derived files go by default: the directory of the checkpoint ``info`` names, else the current one."""
    return os.path.dirname(os.path.abspath(info["checkpoint"])) if "checkpoint" in info else os.getcwd()


def corruption_cache(cache_dir: Optional[str], info: Dict[str, Any]) -> str:
    """Where generated corruptions are cached: --cache-dir, else corruption_cache in ``home_dir``."""
    return cache_dir or os.path.join(home_dir(info), "corruption_cache")
