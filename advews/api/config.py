"""Gin configuration: shipped recipes by bare name, and parsing whose every error is one line
naming its source (a gin file, a ``--gin-param`` binding, a checkpoint's stored config)."""

from __future__ import annotations

import logging
import os
import re
from importlib import resources
from typing import List, Optional, Sequence

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


GIN_ERRORS = (ValueError, SyntaxError, KeyError, TypeError, ImportError, IOError)


def _gin_message(err: BaseException) -> str:
    """gin's message on one line, without the location gin appends (the caller names the source)."""
    text = " ".join(str(err).split())
    return re.sub(r"\s*\((?:[^()]*, )?line \d+\)$", "", text) or type(err).__name__


def parse_gin(files: Sequence[str], bindings: Sequence[str], base_config: Optional[str] = None) -> None:
    """Parse ``base_config`` (e.g. a checkpoint's config text), then gin files, then bindings, each
    later one overriding; any gin error becomes a one-line AdvewsError naming its source: the file,
    or the ``--gin-param`` binding itself."""
    import advews.defenses  # noqa: F401  (registers every defense before the config names them)
    import advews.engine.trainer  # noqa: F401

    paths = [resolve_gin(f) for f in files]
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
        try:
            gin.parse_config_files_and_bindings(paths, [], finalize_config=False)
        except GIN_ERRORS as e:
            where = f" in {', '.join(paths)}" if paths else ""
            raise AdvewsError(f"bad gin config{where}: {' '.join(str(e).split())}") from None
        for binding in bindings:
            try:
                gin.parse_config(binding)
            except GIN_ERRORS as e:
                raise AdvewsError(f"bad --gin-param {binding!r}: {_gin_message(e)}") from None
        gin.finalize()
    finally:
        logging.getLogger().removeFilter(quiet)


class _SkipGinSearchMisses(logging.Filter):
    """gin logs an ERROR for every search-path location an ``include`` is not in, even when a later
    one (the shipped recipes) has it; a missing include still fails with its own message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")
