"""What both command-line tools share: gin recipe lookup and parsing, and one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from typing import Callable, List, Sequence

import gin

from advews.errors import AdvewsError


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parse gin files and bindings; any gin error becomes a one-line AdvewsError."""
    import advews.defenses  # noqa: F401  (registers every defense before the config names them)
    import advews.engine.trainer  # noqa: F401

    paths = [resolve_gin(f) for f in files]
    gin.clear_config()
    gin.add_config_file_search_path(recipe_dir())
    quiet = _SkipGinSearchMisses()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(paths, list(bindings))
    except (ValueError, SyntaxError, KeyError, TypeError, ImportError, IOError) as e:
        where = f" in {', '.join(paths)}" if paths else ""
        raise AdvewsError(f"bad gin config{where}: {' '.join(str(e).split())}") from None
    finally:
        logging.getLogger().removeFilter(quiet)


class _SkipGinSearchMisses(logging.Filter):
    """gin logs an ERROR for every search-path location an ``include`` is not in, even when a later
    one (the shipped recipes) has it; a missing include still fails with its own message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body: user errors print one line to stderr and exit 2; Ctrl-C exits 130."""
    try:
        return body()
    except AdvewsError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
