"""Gin configuration: shipped recipes by bare name, and parsing whose every error is one line
naming its source (a gin file, a ``--gin-param`` binding, a checkpoint's stored config)."""

from __future__ import annotations

import logging
import os
import re
import tokenize
from importlib import resources
from typing import Any, List, Optional, Sequence, Tuple

import gin

from advews.errors import AdvewsError


def recipe_dir() -> str:
    return str(resources.files("advews") / "gin")


def available_recipes() -> List[str]:
    return sorted(f[:-4] for f in os.listdir(recipe_dir()) if f.endswith(".gin"))


def resolve_gin(name: str) -> str:
    """A path to a gin file, or the bare name of a recipe shipped with advews (``at`` or ``at.gin``)."""
    if os.path.isfile(name):
        return name
    bare = os.path.basename(name)
    shipped = os.path.join(recipe_dir(), bare if bare.endswith(".gin") else bare + ".gin")
    if os.path.isfile(shipped):
        return shipped
    raise AdvewsError(f"gin file {name!r} not found; give a path or one of: {', '.join(available_recipes())}")


GIN_ERRORS = (ValueError, SyntaxError, KeyError, TypeError, ImportError, IOError, tokenize.TokenError)
_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1\s*(?:#.*)?$""", re.M)
_UNDEFINED_MACRO = re.compile(r"No bindings specified for '(?:(.+)/)?([^/]+)/gin\.macro'")


def _gin_message(err: BaseException) -> str:
    """gin's message on one line, without the location gin appends (the caller names the source)."""
    if isinstance(err, tokenize.TokenError):  # ('EOF in multi-line string', (1, 15))
        return f"{err.args[0]} (an unterminated string or bracket)" if err.args else "unterminated string"
    text = " ".join(str(err).split())
    return re.sub(r"\s*\((?:[^()]*, )?line \d+\)$", "", text) or type(err).__name__


def _include_target(name: str) -> Optional[str]:
    """The file gin opens for ``include 'name'``: the path itself (absolute or from the current
    directory), else the shipped recipes' folder, as ``parse_gin`` sets gin's search path."""
    for candidate in ([name] if os.path.isabs(name) else [name, os.path.join(recipe_dir(), name)]):
        if os.path.isfile(candidate):
            return os.path.realpath(candidate)
    return None  # gin's own "Unable to open file" names it


def check_includes(paths: Sequence[str], bindings: Sequence[str]) -> None:
    """Refuse an include cycle (a file including itself, or a -> b -> a) in one line before gin
    follows it into a RecursionError; ``bindings`` may hold ``include`` lines too."""

    def visit(path: str, shown: str, chain: List[Tuple[str, str]]) -> None:
        real = os.path.realpath(path)
        seen = [r for r, _ in chain]
        if real in seen:
            names = [s for _, s in chain[seen.index(real):]]
            if len(names) == 1:
                raise AdvewsError(f"include cycle: {names[0]} includes itself; remove that include")
            raise AdvewsError(f"include cycle: {' -> '.join(names + [shown])}; remove one of these includes")
        try:
            with open(path, errors="replace") as f:
                content = f.read()
        except OSError:
            return  # gin reports an unreadable file itself
        for match in _INCLUDE.finditer(content):
            target = _include_target(match.group(2))
            if target is not None:
                visit(target, match.group(2), chain + [(real, shown)])

    for path in paths:
        visit(path, path, [])
    for binding in bindings:
        for match in _INCLUDE.finditer(binding):
            target = _include_target(match.group(2))
            if target is not None:
                visit(target, match.group(2), [])


def _finalize_message(err: BaseException, files: Sequence[str], bindings: Sequence[str]) -> str:
    """A finalize error in one line; an undefined macro names itself and where it is used, not the
    whole config gin dumps."""
    found = _UNDEFINED_MACRO.search(str(err))
    if not found:
        return f"bad gin config: {_gin_message(err).split(' in config string:')[0]}"
    macro = "%" + found.group(2)
    where = next((f"--gin-param {b!r}" for b in bindings if macro in b), None)
    if where is None:
        where = next((f for f in files if _mentions(f, macro)), "the config")
    return (f"undefined macro {macro} (used in {where}): define it with '{found.group(2)} = VALUE' "
            "or fix its name")


def _mentions(path: str, text: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            return text in f.read()
    except OSError:
        return False


def _too_deep(source: str) -> AdvewsError:
    return AdvewsError(f"bad gin config in {source}: nested too deeply to parse (a value nested thousands deep, "
                       "or an include loop)")


def parse_gin(files: Sequence[str], bindings: Sequence[str], base_config: Optional[str] = None) -> None:
    """Parse ``base_config`` (e.g. a checkpoint's config text), then gin files, then bindings, each
    later one overriding; any gin error becomes a one-line AdvewsError naming its source: the file,
    or the ``--gin-param`` binding itself. Include cycles, values nested thousands deep and
    undefined macros are refused the same way; the model's options are checked before a run
    directory is made (``models.check_options``)."""
    import advews.defenses  # noqa: F401  (registers every defense before the config names them)
    import advews.engine.trainer  # noqa: F401

    paths = [resolve_gin(f) for f in files]
    check_includes(paths, bindings)
    gin.clear_config()
    gin.add_config_file_search_path(recipe_dir())
    quiet = _SkipGinSearchMisses()
    logging.getLogger().addFilter(quiet)
    try:
        if base_config is not None:
            try:
                gin.parse_config(base_config)
            except GIN_ERRORS as e:
                raise AdvewsError(f"the checkpoint's stored config does not parse: {_gin_message(e)}") from None
            except RecursionError:
                raise _too_deep("the checkpoint's stored config") from None
        where = f" in {', '.join(paths)}" if paths else ""
        try:
            gin.parse_config_files_and_bindings(paths, [], finalize_config=False)
        except GIN_ERRORS as e:
            text = _gin_message(e) if isinstance(e, tokenize.TokenError) else " ".join(str(e).split())
            raise AdvewsError(f"bad gin config{where}: {text}") from None
        except RecursionError:
            raise _too_deep(', '.join(paths)) from None
        for binding in bindings:
            try:
                gin.parse_config(binding)
            except GIN_ERRORS as e:
                raise AdvewsError(f"bad --gin-param {binding!r}: {_gin_message(e)}") from None
            except RecursionError:
                raise _too_deep(f"--gin-param {binding[:40] + '...'!r}") from None
        try:
            gin.finalize()
        except ValueError as e:
            raise AdvewsError(_finalize_message(e, paths, bindings)) from None
        check_model_config()
    finally:
        logging.getLogger().removeFilter(quiet)


def check_model_config() -> None:
    """The bound ``model.arch`` and ``model.options`` checked now, before anything is built or
    written (a negative width would otherwise fail inside torch, after the run directory exists)."""
    from advews.models import DEFAULT_ARCH, check_options

    def bound(name: str, default: Any) -> Any:
        try:
            return gin.query_parameter(name)
        except ValueError:  # not bound
            return default

    arch, options = bound("model.arch", DEFAULT_ARCH), bound("model.options", None)
    if isinstance(arch, str) and (options is None or isinstance(options, dict)):  # not a macro or reference
        check_options(arch, {} if options is None else options)


class _SkipGinSearchMisses(logging.Filter):
    """gin logs an ERROR for every search-path location an ``include`` is not in, even when a later
    one (the shipped recipes) has it; a missing include still fails with its own message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")
