"""The one training-epoch loop, shared by the attack and every stage of the defenses.

``train_epoch`` takes any batch source yielding (idx, x, y) on the device, an optional batched
augmentation and an optional per-batch input transform (the defenses plug PGD in there, see
``finetune_epoch``), and does cross-entropy SGD steps. A stage with another objective (PUD's
unlearning and mean teacher) passes ``loss_fn`` instead, and ``after_step`` for work after each
optimizer step (the teacher's EMA); everything else stays the loop's: the interrupt check and the
test hooks before every batch, the optimizer step, the divergence check, the statistics. Losses are
checked for finiteness every ``CHECK_EVERY`` batches (one host sync each) and at the end; a
non-finite one stops the run with ``DivergenceError`` naming the first bad batch.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.run import distributed as dist, interrupt, testhooks
from utils.run.errors import DivergenceError
from utils.run.progress import progress
from utils.run.stagetimer import stage as timed_stage

__all__ = ["DivergenceError", "finetune_epoch", "make_optimizer", "train_epoch"]

CHECK_EVERY = 16  # batches between finiteness checks of the losses (one host sync each)


def _checked(losses: list[torch.Tensor], stage: str, epoch: int | None, first_batch: int, what: str) -> torch.Tensor:
    """The per-batch losses stacked (batches ``first_batch``, ...), or ``DivergenceError`` naming the first non-finite one."""
    stacked = torch.stack([v.detach().float() for v in losses])
    bad = ~torch.isfinite(stacked)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise DivergenceError(stage, epoch, first_batch + j, float(stacked[j]), what)
    return stacked


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, augment=None,
                transform: Callable | None = None, generator: torch.Generator | None = None,
                channels_last: bool = False, clean_weight: float = 0.0, desc: str = "train", total: int | None = None,
                stage: str = "train", epoch: int | None = None, check_every: int = CHECK_EVERY,
                loss_fn: Callable | None = None, after_step: Callable | None = None, what: str = "training",
                timing: str = "train", class_weight: torch.Tensor | None = None) -> dict:
    """One pass of SGD steps; returns the mean loss and accuracy and the number of images trained on.

    Default objective: CE on ``transform(i, x, y)`` (e.g. PGD examples; the batch itself without a transform), and
    with ``clean_weight`` w > 0 a transformed batch is trained on (1 - w) CE(transformed) + w CE(clean);
    ``class_weight`` (one weight per class) makes both CE terms class-weighted means.
    ``loss_fn(i, x, y) -> (loss, logits or None)`` replaces that objective (on the transformed batch; accuracy is
    then counted only where logits are returned; ``clean_weight`` does not apply); ``after_step(i)`` runs after
    each optimizer step. ``stage``, ``epoch`` (the run's epoch number) and ``what`` name the position in
    interrupt and divergence messages. Up to ``check_every - 1``
    steps may run on diverged weights before the check sees it, which does not matter: the run then stops
    without saving them. The epoch's seconds go to the run's stage ``timing`` (``utils.run.stagetimer``).

    Under torchrun (``model`` the DDP wrapper, ``batches`` this rank's share) loss and accuracy are averaged
    over ranks (``images`` is this rank's count) and rank 0's BatchNorm statistics are copied to every rank, so
    all ranks go on with the same model.
    """
    if loss_fn is not None and class_weight is not None:
        raise ValueError("class_weight weighs the default cross-entropy; a loss_fn brings its own weighting")
    with timed_stage(timing):  # the whole epoch, PGD inside it excepted (finetune_epoch: train_pgd)
        model.train()
        hooks = testhooks.ACTIVE  # None in normal use
        pending: list[torch.Tensor] = []  # per-batch losses not yet checked
        sizes: list[int] = []  # their batch sizes
        first = 0  # batch index of pending[0]
        loss_sum = correct = None
        n = 0

        def check() -> None:
            nonlocal pending, sizes, first, loss_sum
            if not pending:
                return
            losses = _checked(pending, stage, epoch, first, what)
            w = torch.tensor(sizes, dtype=losses.dtype, device=losses.device)
            loss_sum = (losses * w).sum() + (loss_sum if loss_sum is not None else 0)
            first += len(pending)
            pending, sizes = [], []

        def cross_entropy(i, x, y):
            x_in = transform(i, x, y) if transform is not None else x
            logits = model(x_in)
            loss = F.cross_entropy(logits, y, weight=class_weight)
            if clean_weight > 0 and x_in is not x:
                loss = (1 - clean_weight) * loss + clean_weight * F.cross_entropy(model(x), y, weight=class_weight)
            return loss, logits

        if loss_fn is None:
            objective = cross_entropy
        elif transform is not None:  # e.g. PGD examples of the clean batch, then the given objective
            def objective(i, x, y):
                return loss_fn(i, transform(i, x, y), y)
        else:
            objective = loss_fn
        for i, (_, x, y) in enumerate(progress(batches, desc=desc, total=total)):
            if hooks is not None:
                hooks.before_batch(epoch, i)
            interrupt.check(f"{stage} epoch {epoch}, batch {i}" if epoch is not None else f"{stage}, batch {i}")
            if augment is not None:
                x = augment(x, generator)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss, logits = objective(i, x, y)
            if hooks is not None:
                loss = hooks.loss(loss, epoch, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(i)
            pending.append(loss.detach())
            sizes.append(y.numel())
            if logits is not None:
                hits = (logits.detach().argmax(1) == y).sum()
                correct = hits if correct is None else correct + hits
            n += y.numel()
            if len(pending) >= check_every:
                check()
        check()
        dist.sync_buffers(dist.unwrap(model))
        if n == 0:
            return {"loss": 0.0, "acc": 0.0, "images": 0}
        acc = int(correct) / n if correct is not None else 0.0
        # ``images``: what this process trained on (under torchrun its share: about 1/N of the epoch)
        return {**dist.mean_over_ranks({"loss": float(loss_sum) / n, "acc": acc}), "images": n}


def finetune_epoch(model, optimizer, batches, attack, adv_batches: int | None, augment=None, generator=None,
                   channels_last=False, clean_weight: float = 0.0, desc="finetune", total=None,
                   stage: str = "finetune", epoch: int | None = None, loss_fn: Callable | None = None,
                   class_weight: torch.Tensor | None = None) -> dict:
    """One fine-tuning epoch; batches with index < ``adv_batches`` (None = all) are replaced by ``attack``'s
    (a ``PGD``, or any callable with its signature, e.g. AFT's ``StampShare``; timed as ``train_pgd``) examples of
    the current model. ``loss_fn`` replaces cross-entropy, ``class_weight`` weighs it
    (``train_epoch``).

    Under torchrun ``model`` is the DDP wrapper and ``batches`` this rank's share; PGD attacks the plain model.
    """
    plain = dist.unwrap(model)

    def adversarial(i, x, y):
        if adv_batches is not None and i >= adv_batches:
            return x
        with timed_stage("train_pgd"):
            return attack(plain, x, y, generator=generator)

    any_adversarial = attack is not None and (adv_batches is None or adv_batches > 0)
    return train_epoch(model, optimizer, batches, augment, transform=adversarial if any_adversarial else None,
                       generator=generator, channels_last=channels_last, clean_weight=clean_weight, desc=desc,
                       total=total, stage=stage, epoch=epoch, loss_fn=loss_fn, class_weight=class_weight)
