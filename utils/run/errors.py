"""The exceptions that end a run without a traceback, and the wrapper that turns them into one clean line.

Entry scripts raise ``UserError`` for anything the user can fix (unknown names, out-of-range
values, missing data, an incompatible checkpoint); ``run_cli`` prints it as a single line with no
traceback and exits with status 2, so a failed run never looks like a crash. A run that stops after
it started working raises a ``RunStopped``: ``Interrupted`` (SIGINT/SIGTERM, exit 128 + signal
number, as a shell reports a signal) or ``DivergenceError`` (a non-finite loss, exit 3). The run
adds a ``note`` (what was kept, how to resume) before the exception reaches ``run_cli``.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """Bad input the user can fix; the message says what is wrong and how to fix it."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2), like every other bad input."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


class RunStopped(Exception):
    """A run that ends early on purpose; ``report()`` is the line printed, ``exit_code`` the status."""

    exit_code = 1
    note = ""

    def report(self) -> str:
        return str(self) + (f"; {self.note}" if self.note else "")


class Interrupted(RunStopped):
    """SIGINT/SIGTERM arrived; raised at the next batch boundary (or after the next state save)."""

    def __init__(self, signum: int, where: str):
        self.signum, self.where = signum, where
        self.exit_code = 128 + signum
        super().__init__(f"interrupted ({signal.Signals(signum).name}) at {where}")


class DivergenceError(RunStopped, RuntimeError):
    """A non-finite loss: the run stops, keeps its last good checkpoint/state and records failure.json."""

    exit_code = EXIT_DIVERGED

    def __init__(self, stage: str, epoch: int | None, batch: int, value: float, what: str = "training"):
        self.stage, self.epoch, self.batch, self.value, self.what = stage, epoch, batch, value, what
        at = f"{stage} epoch {epoch}" if epoch is not None else stage
        super().__init__(f"non-finite {what} loss ({value}) at {at}, batch {batch}")

    def report(self) -> str:
        return "error: " + super().report()


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; a ``UserError`` becomes ``error: <message>`` and exit 2, a ``RunStopped`` its report."""
    from utils.run import testhooks
    from utils.run.runlock import release_all

    testhooks.load()  # the test hooks are read once, at start-up
    try:
        main(argv)
        dist = sys.modules.get("utils.run.distributed")  # not imported: no process group (and no torch: utils.report)
        if dist is not None:
            dist.finish()  # torchrun: leave the group once the run's frames (and their DDP wrappers) are gone
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except RunStopped as e:
        print(e.report(), file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        release_all()  # a run that failed before its RunControl took over still frees its folder
