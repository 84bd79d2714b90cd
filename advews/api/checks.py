"""The evaluation's checks of its options, output files and checkpoint, run before anything slow: an
evaluation may take hours, so a bad option or an unwritable --output must fail at once, in one line,
and a write that still fails at the end must not lose the result. Messages name the advews-eval flag,
so the CLI and the Python API say the same thing."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from advews.attacks.autoattack import AA_ATTACKS
from advews.attacks.custom import SPEC_FORM, attack_class, is_spec
from advews.attacks.zoo import ZOO
from advews.api.options import NORMS, SEARCH_BN, VERSIONS, EvalOptions
from advews.errors import AdvewsError

NATIVE = ("pgd", "fgsm")
ATTACKS = NATIVE + tuple(ZOO) + ("autoattack", "none")


def _at_least(value: Optional[int], flag: str, low: int) -> None:
    if value is not None and value < low:
        raise AdvewsError(f"{flag} must be >= {low}, got {value}")


def _finite(value: Optional[float], flag: str, *, positive: bool = False) -> None:
    if value is not None and (not math.isfinite(value) or value < 0 or (positive and value == 0)):
        raise AdvewsError(f"{flag} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


def _one_of(value: Optional[str], flag: str, choices: Sequence[str]) -> None:
    """The choices the CLI's parser enforces, enforced for Python callers too."""
    if value is not None and value not in choices:
        raise AdvewsError(f"argument {flag}: invalid choice: {value!r} (choose from {', '.join(choices)})")


def check_flags(args: EvalOptions, has_dataset: bool) -> None:
    """Every number and name given, before a file is opened. ``has_dataset``: the model names its
    training dataset (a checkpoint), whose validation split a subnet analysis searches on."""
    _one_of(args.norm, "--norm", NORMS)
    _one_of(args.version, "--version", VERSIONS)
    _at_least(args.n_examples, "--n-examples", 1)
    _at_least(args.batch_size, "--batch-size", 1)
    _finite(args.eps, "--eps")
    _finite(args.step_size, "--step-size")
    _at_least(args.steps, "--steps", 1)
    _at_least(args.restarts, "--restarts", 1)
    _at_least(args.num_classes, "--num-classes", 2)
    if args.analysis == "subnets":
        check_analysis_flags(args, has_dataset)


def check_analysis_flags(args: EvalOptions, has_dataset: bool) -> None:
    """The --analysis subnets flags; the search needs a validation split, which npz data lacks."""
    from advews.evaluation.subnet_analysis import BN_MODES, STRATEGIES

    _one_of(args.search_bn, "--search-bn", SEARCH_BN)
    strategies = [s for s in args.search.split(",") if s]
    if not strategies or any(s not in STRATEGIES for s in strategies):
        raise AdvewsError(f"bad --search {args.search!r}; use a comma-separated list of {', '.join(STRATEGIES)}")
    bn_modes = [m for m in args.bn_modes.split(",") if m]
    if not bn_modes or any(m not in BN_MODES for m in bn_modes) or len(set(bn_modes)) != len(bn_modes):
        raise AdvewsError(f"bad --bn-modes {args.bn_modes!r}; use eval, train or eval,train")
    if not 0 < args.rho <= 1:
        raise AdvewsError(f"--rho must be in (0, 1], got {args.rho}")
    _at_least(args.n_subnets, "--n-subnets", 1)
    _at_least(args.search_updates, "--search-updates", 0)
    _finite(args.search_lr, "--search-lr", positive=True)
    _at_least(args.eval_batch_size, "--eval-batch-size", 1)
    if not has_dataset and not (args.data or "").startswith("dataset:"):
        raise AdvewsError("--analysis subnets trains its search on a validation split: use --checkpoint or "
                          "--data dataset:NAME[:ROOT], not npz data")


def parse_attacks(spec: str) -> List[str]:
    """The attack names of a comma-separated ``--attack``, checked; a user's MODULE:CLASS is imported
    now (from the working directory first, as advews-train imports a recipe's modules), so a bad one
    is refused before anything loads."""
    names = [n.strip() for n in spec.split(",")]
    bad = [n for n in names if n not in ATTACKS and not is_spec(n)]
    if bad:
        raise AdvewsError(f"unknown --attack {bad[0]!r}; choose from {', '.join(ATTACKS)} or {SPEC_FORM} "
                          "(comma-separated)")
    if any(is_spec(n) for n in names) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in filter(is_spec, names):
        attack_class(name)
    if len(set(names)) != len(names):
        raise AdvewsError(f"--attack {spec!r} names an attack twice")
    if "none" in names and len(names) > 1:
        raise AdvewsError(f"--attack none means clean accuracy only; it cannot be combined, got {spec!r}")
    return names


def autoattack_cascade(args: EvalOptions, names: List[str]) -> Optional[List[str]]:
    """The --aa-attacks list (None unless --version custom), after checking the AutoAttack flags."""
    if "autoattack" not in names:
        if args.aa_attacks or args.version != "standard":
            raise AdvewsError("--version and --aa-attacks configure autoattack; add it to --attack")
        return None
    if args.version != "custom":
        if args.aa_attacks:
            raise AdvewsError(f"--aa-attacks needs --version custom; --version {args.version} fixes its own cascade")
        return None
    if not args.aa_attacks:
        raise AdvewsError(f"--version custom needs --aa-attacks, a comma-separated list from {', '.join(AA_ATTACKS)}")
    return [a.strip() for a in args.aa_attacks.split(",")]


def unwritable(path: str) -> Optional[str]:
    """Why a file cannot be written at ``path`` (missing folders would be created), or None.

    Leaves nothing behind: the nearest existing folder is probed with a temporary file that is
    removed at once, since permission bits alone do not tell (root, read-only or virtual file systems)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return "it is a directory"
    folder = os.path.dirname(path)
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"cannot create files in {folder}: {error.strerror or error}"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is read-only"
    return None


def check_outputs(args: EvalOptions, folders: Dict[str, str]) -> None:
    """Refuse to overwrite without --force, and refuse any file the run could not write, including
    files it writes into ``folders`` (what each holds: folder)."""
    files = [(args.output, "--output"), (args.hdf5, "--hdf5")]
    for path, flag in files:
        if path and os.path.exists(path) and not args.force:
            raise AdvewsError(f"{path} exists; choose another {flag} or pass --force")
    if args.output and args.hdf5 and os.path.abspath(args.output) == os.path.abspath(args.hdf5):
        raise AdvewsError(f"--output and --hdf5 name the same file {args.output}; give two files")
    files.append((args.state, "--state"))
    files += [(os.path.join(folder, "probe"), what) for what, folder in folders.items()]
    for path, flag in files:
        reason = path and unwritable(path)
        if reason:
            where = os.path.dirname(path) if flag in folders else path
            raise AdvewsError(f"cannot write {flag} {where}: {reason}")
    if args.state and os.path.exists(args.state):
        _check_state(args.state)


def _check_state(path: str) -> None:
    """An existing --state must be an advews-eval state file: found out now, not after hours of
    attacks (whether it belongs to this evaluation is checked before the first attack)."""
    from advews.api.eval_state import read_state

    read_state(path)


def check_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """An advews checkpoint names a known architecture and its classes and channels."""
    from advews.models import ARCHITECTURES, known_arch

    spec = state.get("model_spec")
    if not isinstance(spec, dict):
        raise AdvewsError(f"{path} is not an advews checkpoint (no model_spec)")
    if not known_arch(spec.get("arch")):
        raise AdvewsError(f"{path}: model_spec names unknown model {spec.get('arch')!r}; "
                          f"this advews knows {', '.join(sorted(ARCHITECTURES))} and timm:NAME")
    for key, low in (("num_classes", 2), ("in_channels", 1)):
        if not isinstance(spec.get(key), int) or spec[key] < low:
            raise AdvewsError(f"{path}: model_spec {key} must be an integer >= {low}, got {spec.get(key)!r}")
    if "model" not in state:
        raise AdvewsError(f"{path} holds no model weights (no 'model' entry)")


def checkpoint_image_shape(state: Dict[str, Any]) -> Tuple[int, Optional[int], Optional[int]]:
    """(C, H, W) a checkpoint's model was trained on; H and W are None when its dataset does not fix them."""
    from advews.data import DATASETS

    channels = state["model_spec"]["in_channels"]
    data_spec = state.get("data_spec") or {}
    spec = DATASETS.get(data_spec.get("dataset"))
    size = data_spec.get("image_size")
    if spec is not None and spec.image_shape is not None:
        return channels, spec.image_shape[1], spec.image_shape[2]
    if isinstance(size, int):
        return channels, size, size
    return channels, None, None
