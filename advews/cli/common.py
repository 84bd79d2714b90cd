"""What the command-line tools share: one-line errors and argument parsing. Gin parsing lives in
``advews.api.config`` (re-exported here), so the Python API uses the same rules."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from advews.api.config import available_recipes, parse_gin, recipe_dir, resolve_gin  # noqa: F401  (re-exported)
from advews.errors import AdvewsError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run a CLI body: user errors print one line to stderr and exit 2 (or the error's own
    ``exit_code``, e.g. 3 for a diverged training run); Ctrl-C exits 130."""
    try:
        return body()
    except AdvewsError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
