"""Test hooks: environment variables that make a failure happen at a chosen batch, for subprocess tests.

They exist so tests can exercise the divergence and interrupt paths of a real run; they are unset in
normal use, where reading them costs one dictionary lookup per batch.

``PUD_INJECT_NAN_AT=EPOCH:BATCH``      that batch's loss becomes NaN (the divergence path)
``PUD_INJECT_SIGTERM_AT=EPOCH:BATCH``  the process sends itself SIGTERM before that batch (the interrupt path)
``PUD_INJECT_BATCH_SLEEP=SECONDS``     sleep before every training batch, so a test can signal a run mid-epoch
``PUD_INJECT_RANK=R``                  under torchrun, only rank R injects (default: every process)

EPOCH is the epoch number the run writes in metrics.jsonl (the defenses count on across rounds, steps
and stages), BATCH counts from 0 within that epoch.
"""
from __future__ import annotations

import os
import signal
import time

import torch

NAN_AT = "PUD_INJECT_NAN_AT"
SIGTERM_AT = "PUD_INJECT_SIGTERM_AT"
BATCH_SLEEP = "PUD_INJECT_BATCH_SLEEP"
RANK = "PUD_INJECT_RANK"


def _at(var: str, epoch: int | None, batch: int) -> bool:
    spec = os.environ.get(var)
    if not spec or spec.strip() != f"{epoch}:{batch}":
        return False
    only = os.environ.get(RANK)
    return not only or only.strip() == os.environ.get("RANK", "0")


def before_batch(epoch: int | None, batch: int) -> None:
    sleep = os.environ.get(BATCH_SLEEP)
    if sleep:
        time.sleep(float(sleep))
    if _at(SIGTERM_AT, epoch, batch):
        os.kill(os.getpid(), signal.SIGTERM)


def loss(value: torch.Tensor, epoch: int | None, batch: int) -> torch.Tensor:
    return value * float("nan") if _at(NAN_AT, epoch, batch) else value
