"""Test hooks: environment variables that make a failure happen at a chosen batch, for subprocess tests.

They exist so tests can exercise the divergence and interrupt paths of a real run. ``load`` reads them
once when a script starts (``run_cli``); when none is set, ``ACTIVE`` is None and the training loop
skips the hooks entirely.

``PUD_INJECT_NAN_AT=EPOCH:BATCH``      that batch's loss becomes NaN (the divergence path)
``PUD_INJECT_SIGTERM_AT=EPOCH:BATCH``  the process sends itself SIGTERM before that batch (the interrupt path)
``PUD_INJECT_BATCH_SLEEP=SECONDS``     sleep before every training batch, so a test can signal a run mid-epoch
``PUD_INJECT_RANK=R``                  under torchrun, only rank R injects (default: every process)

EPOCH is the epoch number the run writes in metrics.jsonl (the defenses count on across rounds, steps
and stages), BATCH counts from 0 within that epoch. (No torch import: ``run_cli`` loads this module for every
script, ``python -m utils.report`` included.)
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

NAN_AT = "PUD_INJECT_NAN_AT"
SIGTERM_AT = "PUD_INJECT_SIGTERM_AT"
BATCH_SLEEP = "PUD_INJECT_BATCH_SLEEP"
RANK = "PUD_INJECT_RANK"


@dataclass(frozen=True)
class Hooks:
    nan_at: str | None
    sigterm_at: str | None
    batch_sleep: float
    this_rank: bool  # PUD_INJECT_RANK unset or naming this process

    def before_batch(self, epoch: int | None, batch: int) -> None:
        if self.batch_sleep:
            time.sleep(self.batch_sleep)
        if self.this_rank and self.sigterm_at == f"{epoch}:{batch}":
            os.kill(os.getpid(), signal.SIGTERM)

    def loss(self, value, epoch: int | None, batch: int):
        """``value`` (a loss tensor), or NaN times it at the chosen batch."""
        return value * float("nan") if self.this_rank and self.nan_at == f"{epoch}:{batch}" else value


ACTIVE: Hooks | None = None


def load() -> None:
    """Read the hooks from the environment (at start-up); none set leaves ``ACTIVE`` None."""
    global ACTIVE
    env = {k: (os.environ.get(k) or "").strip() for k in (NAN_AT, SIGTERM_AT, BATCH_SLEEP, RANK)}
    if not (env[NAN_AT] or env[SIGTERM_AT] or env[BATCH_SLEEP]):
        ACTIVE = None
        return
    ACTIVE = Hooks(env[NAN_AT] or None, env[SIGTERM_AT] or None, float(env[BATCH_SLEEP] or 0),
                   not env[RANK] or env[RANK] == os.environ.get("RANK", "0"))
