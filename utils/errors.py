"""The one exception type for bad user input, and the wrapper that turns it into one clean line.

Entry scripts raise ``UserError`` for anything the user can fix (unknown names, out-of-range
values, missing data, an incompatible checkpoint); ``run_cli`` prints it as a single line with no
traceback and exits with status 2, so a failed run never looks like a crash.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input the user can fix; the message says what is wrong and how to fix it."""


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; a ``UserError`` becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
