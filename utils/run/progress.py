"""tqdm progress bars that appear only on a terminal, so logs and CI output stay clean.

Every loop that can take more than a few seconds (training, evaluation, the PGD robust evaluation, the
target estimate, SPECTRE's representations, training-set logits) runs through ``progress`` with a total,
so its bar shows a count and an ETA. Without a terminal the runs print one line per epoch instead.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sized

from tqdm import tqdm

FALLBACK_SHAPE = (100, 24)  # columns, rows: for terminals that report a size of 0 (some ptys, containers)


def n_batches(n: int, batch_size: int) -> int:
    """How many batches of ``batch_size`` a pass over ``n`` items makes (the last one may be short)."""
    return -(-n // batch_size)


def _bar_shape(stream) -> dict:
    """tqdm's size arguments: follow the terminal, unless it reports 0 columns or rows.

    tqdm draws a bar 0 characters wide, and hides every bar at a position >= the row count, so under a
    terminal of size 0x0 (e.g. ``docker exec -t``, some CI ptys) it would show nothing at all.
    """
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": size.columns or FALLBACK_SHAPE[0], "nrows": size.lines or FALLBACK_SHAPE[1]}


def progress(iterable, desc: str = "", total: int | None = None, leave: bool = False, unit: str = "batch"):
    """``iterable`` with a bar on stderr when stderr is a terminal; ``total`` defaults to ``len(iterable)``."""
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    on = sys.stderr.isatty()
    shape = _bar_shape(sys.stderr) if on else {}
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=not on, unit=unit, **shape)
