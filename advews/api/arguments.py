"""The Python API's argument checks: a wrong type or name given to ``advews.train``, ``load_model``,
``evaluate`` or ``analyze_subnets`` is one AdvewsError line naming the argument, the value and what
is allowed, raised before any file is opened or written (the CLIs' parsers already give these
checks their types). Ranges (``n_examples >= 1``, a finite ``eps``) stay in ``api.checks``, which
the CLI shares, so both say the same thing.

``public`` decorates the functions ``advews`` exports: an AdvewsError raised inside a gin configurable
carries gin's "In call to configurable ..." lines, which it removes, so ``str(err)`` is one line.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

from advews.api.options import AMP, NORMS, SEARCH_BN, VERSIONS, WEIGHTS_FROM
from advews.errors import AdvewsError

Check = Callable[[str, Any], None]
F = TypeVar("F", bound=Callable[..., Any])


def _fail(name: str, value: Any, allowed: str) -> None:
    raise AdvewsError(f"{name} must be {allowed}, got {_show(value)}")


def _show(value: Any) -> str:
    """The value as the user typed it, cut to one short line (an object's repr may be long)."""
    shown = " ".join(repr(value).split())
    return shown if len(shown) <= 200 else shown[:197] + "..."


def opt(check: Check, allowed: str) -> Check:
    """``check``, or None."""

    def run(name: str, value: Any) -> None:
        if value is not None:
            try:
                check(name, value)
            except AdvewsError:
                _fail(name, value, allowed + " or None")
    return run


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "an integer")


def number(name: str, value: Any) -> None:
    """An int or float; NaN and infinities pass here and are refused, with the flag's name, by api.checks."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "a number")


def finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "a finite number")


def text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        _fail(name, value, "a non-empty string")


def path(name: str, value: Any) -> None:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value) or not isinstance(os.fspath(value), str):
        _fail(name, value, "a str or os.PathLike path")


def choice(choices: Sequence[str]) -> Check:
    """One of ``choices`` (None allowed), refused in the words of advews-eval's parser, which
    restricts the flag of the same name to them: the CLI and the API say the same line."""

    def run(name: str, value: Any) -> None:
        if value is not None and (not isinstance(value, str) or value not in choices):
            raise AdvewsError(f"argument --{name.replace('_', '-')}: invalid choice: {_show(value)} "
                              f"(choose from {', '.join(choices)})")
    return run


def names(name: str, value: Any) -> None:
    """A comma-separated string or a list of strings (``attacks="pgd,fgsm"`` or ``["pgd", "fgsm"]``)."""
    if isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return
    _fail(name, value, "a comma-separated string or a list of strings")


def model(name: str, value: Any) -> None:
    from torch import nn

    if not isinstance(value, nn.Module):
        try:
            path(name, value)
        except AdvewsError:
            _fail(name, value, "a checkpoint or export path, or a torch.nn.Module")


def _sweep(name: str, value: Any) -> None:
    """Fractions of eps: a comma-separated string or a list of numbers."""
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and all(
            not isinstance(v, bool) and isinstance(v, (int, float)) for v in value)):
        return
    _fail(name, value, "a comma-separated string or a list of numbers")


OPT_PATH = opt(path, "a str or os.PathLike path")
OPT_TEXT = opt(text, "a non-empty string")
OPT_INT = opt(integer, "an integer")
OPT_NUMBER = opt(number, "a number")
OPT_NAMES = opt(names, "a comma-separated string or a list of strings")

# the arguments both evaluate and analyze_subnets take
_SHARED: Dict[str, Check] = {
    "model": model, "data": OPT_TEXT, "eps": OPT_NUMBER, "steps": OPT_INT, "step_size": OPT_NUMBER,
    "norm": choice(NORMS), "restarts": integer,
    "n_examples": OPT_INT, "batch_size": integer, "seed": integer, "output": OPT_PATH, "force": boolean,
    "device": text,
}

SPECS: Dict[str, Dict[str, Check]] = {
    "evaluate": {
        **_SHARED, "attacks": OPT_NAMES, "version": choice(VERSIONS), "aa_attacks": OPT_NAMES, "state": OPT_PATH,
        "corruptions": OPT_TEXT, "cache_dir": OPT_PATH, "hdf5": OPT_PATH,
        "weights_from": choice(WEIGHTS_FROM), "amp": choice(AMP), "perturbations": OPT_TEXT,
        "perturbation_baseline": OPT_PATH, "fixed_batches": boolean,
    },
    "analyze_subnets": {
        **_SHARED, "attack": text, "rho": number, "n_subnets": integer, "search": names, "search_updates": integer,
        "search_lr": number, "search_bn": choice(SEARCH_BN), "bn_modes": names, "eval_batch_size": OPT_INT,
        "figures": OPT_PATH,
    },
    "audit": {
        **{k: _SHARED[k] for k in ("model", "data", "eps", "norm", "batch_size", "seed", "output", "force", "device")},
        "n_examples": integer, "steps": integer, "indicators": OPT_NAMES, "sweep": _sweep,
        "square_queries": integer, "best_of": integer, "eot": integer, "surrogate": OPT_PATH, "bpda": OPT_NAMES,
        "state": OPT_PATH, "weights_from": choice(WEIGHTS_FROM),
    },
    "load_model": {
        "path": OPT_PATH, "arch": OPT_TEXT, "weights": OPT_PATH, "normalization": OPT_TEXT, "num_classes": OPT_INT,
        "data": OPT_TEXT, "device": text,
        "weights_from": choice(WEIGHTS_FROM),
    },
}


def check_arguments(function: str, given: Mapping[str, Any]) -> None:
    """Check every argument of ``function`` (its ``locals()`` at the top of its body) against SPECS."""
    for name, check in SPECS[function].items():
        if name in given:
            check(name, given[name])


def _file_list(name: str, value: Any) -> List[str]:
    """A str (or path) is one file or binding; a list or tuple holds several."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        _fail(name, value, "a str or a list of str")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, (str, os.PathLike)) or not isinstance(os.fspath(item), str) or not os.fspath(item):
            _fail(f"{name}[{i}]", item, "a non-empty str")
        out.append(os.fspath(item))
    return out


def train_arguments(gin_files: Any, bindings: Any, output_dir: Any, resume: Any, override: Any,
                    quiet: Any) -> Tuple[List[str], List[str], Optional[str]]:
    """``advews.train``'s arguments checked, as (gin files, bindings, output directory): a single str
    is one gin file or one binding, as a list of one."""
    files = _file_list("gin_files", gin_files)
    lines = _file_list("bindings", [] if bindings is None else bindings)
    OPT_PATH("output_dir", output_dir)
    for name, value in (("resume", resume), ("override", override), ("quiet", quiet)):
        boolean(name, value)
    return files, lines, None if output_dir is None else os.fspath(output_dir)


# gin appends "\n  In call to configurable 'X' (...)" (and "\n  In file ..." for parse errors) to an
# exception raised inside a configurable, once per configurable on the stack
_GIN_LINES = re.compile(r"\n\s*In (call to configurable|file |bindings string).*", re.S)


def _gin_proxy(err: BaseException) -> bool:
    """gin re-raises an exception from a configurable as a proxy subclass that appends its lines."""
    init = type(err).__dict__.get("__init__")
    return "ExceptionProxy" in getattr(init, "__qualname__", "")


def without_gin_lines(err: AdvewsError) -> AdvewsError:
    """The AdvewsError as raised, before gin appended its call lines (attributes kept)."""
    if not _gin_proxy(err):
        return err
    original: BaseException = err
    while _gin_proxy(original) and original.__context__ is not None:
        original = original.__context__
    if isinstance(original, AdvewsError) and not _gin_proxy(original):
        original.__dict__.update(vars(err))  # e.g. attributes a caller set on the proxy
        return original
    return AdvewsError(_GIN_LINES.sub("", str(err)).strip())


def public(function: F) -> F:
    """A function of the Python API: its AdvewsError is one line, without gin's additions."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except AdvewsError as err:
            clean = without_gin_lines(err)
            if clean is err:
                raise
        raise clean  # outside the except block: its own cause and context, not gin's proxy

    return run  # type: ignore[return-value]
