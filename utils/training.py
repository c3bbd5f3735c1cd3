"""The training epoch shared by the attack and the defenses' fine-tuning loops.

``train_epoch`` takes any batch source yielding (idx, x, y) on the device, an optional batched
augmentation and an optional per-batch input transform (the defenses plug PGD in there), and does
plain cross-entropy SGD steps. It returns the mean loss and accuracy, and stops with
``DivergenceError`` on a non-finite loss instead of silently training on NaNs. Statistics stay on
the device until the end of the epoch and the losses are checked every ``CHECK_EVERY`` batches
(one host sync each), so a GPU does not wait for the host after every batch.

Every training loop (this one and PUD's unlearning and mean-teacher loops) calls ``batch_start``
before a batch (a pending SIGINT/SIGTERM stops the run there) and ``checked_loss``/``checked_losses``
on its losses (the divergence check), so all of them share one interrupt path and one divergence
path, with the test hooks of ``utils.run.testhooks`` in both.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.run import distributed as dist
from utils.run import interrupt, testhooks
from utils.run.errors import DivergenceError
from utils.run.progress import progress

__all__ = ["DivergenceError", "batch_start", "checked_loss", "make_optimizer", "train_epoch"]

CHECK_EVERY = 16  # batches between finiteness checks of train_epoch's losses (one host sync each)


def batch_start(stage: str, epoch: int | None, batch: int) -> None:
    """Before a training batch: stop here if SIGINT/SIGTERM arrived (``epoch`` as logged in metrics.jsonl)."""
    testhooks.before_batch(epoch, batch)
    interrupt.check(f"{stage} epoch {epoch}, batch {batch}" if epoch is not None else f"{stage}, batch {batch}")


def checked_losses(losses: list[torch.Tensor], stage: str, epoch: int | None, first_batch: int,
                   what: str = "training") -> torch.Tensor:
    """The per-batch losses stacked (batches ``first_batch``, ...), or ``DivergenceError`` naming the first non-finite one."""
    stacked = torch.stack([v.detach().float() for v in losses])
    bad = ~torch.isfinite(stacked)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise DivergenceError(stage, epoch, first_batch + j, float(stacked[j]), what)
    return stacked


def checked_loss(loss: torch.Tensor, stage: str, epoch: int | None, batch: int, what: str = "training") -> torch.Tensor:
    """``loss``, or ``DivergenceError`` naming stage, epoch and batch if it is not finite (checked at once)."""
    loss = testhooks.loss(loss, epoch, batch)
    checked_losses([loss], stage, epoch, batch, what)
    return loss


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, augment=None,
                transform: Callable | None = None, generator: torch.Generator | None = None,
                channels_last: bool = False, clean_weight: float = 0.0, desc: str = "train", total: int | None = None,
                stage: str = "train", epoch: int | None = None, check_every: int = CHECK_EVERY) -> dict:
    """One pass of CE training; ``transform(i, x, y) -> x`` may replace a batch (e.g. by PGD examples).

    With ``clean_weight`` w > 0 a transformed batch is trained on (1 - w) CE(transformed) + w CE(clean).
    ``stage`` and ``epoch`` (the run's epoch number) name the position in interrupt and divergence messages.
    Loss and accuracy are summed on the device; the losses are checked for finiteness every
    ``check_every`` batches and at the end. A non-finite loss raises ``DivergenceError`` naming the first
    bad batch; up to ``check_every - 1`` further steps may have run on the diverged weights by then,
    which does not matter because the run stops without saving them.

    Under torchrun (``model`` the DDP wrapper, ``batches`` this rank's share) loss and accuracy are
    averaged over ranks (``images`` is this rank's count) and rank 0's BatchNorm statistics are copied to every rank, so all ranks go on
    with the same model.
    """
    model.train()
    pending: list[torch.Tensor] = []  # per-batch losses not yet checked
    sizes: list[int] = []  # their batch sizes
    first = 0  # batch index of pending[0]
    loss_sum = correct = None
    n = 0

    def check() -> None:
        nonlocal pending, sizes, first, loss_sum
        if not pending:
            return
        losses = checked_losses(pending, stage, epoch, first)
        w = torch.tensor(sizes, dtype=losses.dtype, device=losses.device)
        loss_sum = (losses * w).sum() + (loss_sum if loss_sum is not None else 0)
        first += len(pending)
        pending, sizes = [], []

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
        loss = testhooks.loss(loss, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pending.append(loss.detach())
        sizes.append(y.numel())
        hits = (logits.detach().argmax(1) == y).sum()
        correct = hits if correct is None else correct + hits
        n += y.numel()
        if len(pending) >= check_every:
            check()
    check()
    dist.sync_buffers(dist.unwrap(model))
    if n == 0:
        return {"loss": 0.0, "acc": 0.0, "images": 0}
    # ``images``: what this process trained on (under torchrun its share: about 1/N of the epoch)
    return {**dist.mean_over_ranks({"loss": float(loss_sum) / n, "acc": int(correct) / n}), "images": n}
