"""The training epoch shared by the attack and the defenses' fine-tuning loops.

``train_epoch`` takes any batch source yielding (idx, x, y) on the device, an optional batched
augmentation and an optional per-batch input transform (the defenses plug PGD in there), and does
plain cross-entropy SGD steps. It returns the mean loss and accuracy, and stops with
``DivergenceError`` on a non-finite loss instead of silently training on NaNs.

Every training loop (this one and PUD's unlearning and mean-teacher loops) calls ``batch_start``
before a batch (a pending SIGINT/SIGTERM stops the run there) and ``checked_loss`` on its loss
(the divergence check), so all of them share one interrupt path and one divergence path, with the
test hooks of ``utils.testhooks`` in both.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import interrupt, testhooks
from utils.errors import DivergenceError
from utils.progress import progress

__all__ = ["DivergenceError", "batch_start", "checked_loss", "make_optimizer", "train_epoch"]


def batch_start(stage: str, epoch: int | None, batch: int) -> None:
    """Before a training batch: stop here if SIGINT/SIGTERM arrived (``epoch`` as logged in metrics.jsonl)."""
    testhooks.before_batch(epoch, batch)
    interrupt.check(f"{stage} epoch {epoch}, batch {batch}" if epoch is not None else f"{stage}, batch {batch}")


def checked_loss(loss: torch.Tensor, stage: str, epoch: int | None, batch: int, what: str = "training") -> torch.Tensor:
    """``loss``, or ``DivergenceError`` naming stage, epoch and batch if it is not finite."""
    loss = testhooks.loss(loss, epoch, batch)
    value = loss.item()
    if not math.isfinite(value):
        raise DivergenceError(stage, epoch, batch, value, what)
    return loss


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, augment=None,
                transform: Callable | None = None, generator: torch.Generator | None = None,
                channels_last: bool = False, clean_weight: float = 0.0, desc: str = "train", total: int | None = None,
                stage: str = "train", epoch: int | None = None) -> dict:
    """One pass of CE training; ``transform(i, x, y) -> x`` may replace a batch (e.g. by PGD examples).

    With ``clean_weight`` w > 0 a transformed batch is trained on (1 - w) CE(transformed) + w CE(clean).
    ``stage`` and ``epoch`` (the run's epoch number) name the position in interrupt and divergence messages.
    """
    model.train()
    loss_sum = 0.0
    correct = n = 0
    for i, (_, x, y) in enumerate(progress(batches, desc=desc, total=total)):
        batch_start(stage, epoch, i)
        if augment is not None:
            x = augment(x, generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_in = transform(i, x, y) if transform is not None else x
        logits = model(x_in)
        loss = F.cross_entropy(logits, y)
        if clean_weight > 0 and x_in is not x:
            loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(model(x), y)
        loss = checked_loss(loss, stage, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * y.numel()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.numel()
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}
