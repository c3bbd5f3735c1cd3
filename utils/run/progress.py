"""tqdm progress bars that appear only on a terminal, so logs and CI output stay clean."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable, desc: str = "", total: int | None = None, leave: bool = False):
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not sys.stderr.isatty(), dynamic_ncols=True)
