"""Progress bars for long evaluations: shown on a terminal only, so logs of batch jobs stay clean."""

from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: Optional[str], total: Optional[int] = None) -> Iterable[T]:
    """``iterable`` with a bar on stderr when ``desc`` is given and stderr is a terminal; the bar
    is removed when done (``leave=False``), so the report that follows stays readable."""
    if desc is None or not sys.stderr.isatty():
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)
