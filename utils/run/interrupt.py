"""SIGINT/SIGTERM as a clean stop: the handler only sets a flag; training loops check it between batches.

Stopping in the middle of an optimizer step or a file write would leave a state that cannot be
resumed, so the handler does nothing but remember the signal. ``check`` (called before every
training batch and after every state save) raises ``Interrupted``; the run then ends with the state
saved after its last completed epoch, and ``--resume`` redoes only the interrupted epoch, which
keeps a resumed run bit-identical to an uninterrupted one. A second signal gets the default
behaviour back (Ctrl-C twice aborts at once).
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

from utils.run.distributed import max_over_ranks
from utils.run.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: int | None = None
_previous: dict = {}
_owner: int | None = None  # pid that installed the handler; forked DataLoader workers inherit it and must ignore it


def _handler(signum, _frame) -> None:
    global _pending
    if os.getpid() != _owner:  # a worker: the main process stops the run and shuts the workers down
        return
    _pending = signum
    for s, h in _previous.items():  # the next signal acts at once
        signal.signal(s, h)
    # os.write, not print: a handler may run while the main code is inside print (re-entrant buffered I/O)
    os.write(2, f"\n{signal.Signals(signum).name} received: stopping at the next batch boundary "
                f"(send it again to abort at once)\n".encode())


@contextmanager
def handle_signals():
    """Within the block, SIGINT/SIGTERM set the flag ``check`` looks at (main thread only, where Python allows it)."""
    global _pending, _owner
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending, _owner = None, os.getpid()
    _previous.clear()
    _previous.update({s: signal.signal(s, _handler) for s in SIGNALS})
    saved = dict(_previous)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        _previous.clear()
        _pending = None


def check(where: str) -> None:
    """Raise ``Interrupted`` if a signal arrived; ``where`` names the position for the message.

    Under torchrun the ranks agree first (one tiny all-reduce): a signal seen by any rank stops all
    of them at the same batch, so none is left waiting in a collective the others never join.
    """
    pending = max_over_ranks(_pending or 0)
    if pending:
        raise Interrupted(pending, where)
