"""Mean-teacher stage of PUD: EMA teacher + softmax-consistency regularizer for the student.

The teacher is a frozen copy of the student (``models.frozen_copy``) that changes only through ``ema_update``.
The authors' code counted EMA steps with a global that was never defined; here the caller passes the step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ema_update", "softmax_consistency"]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> float:
    """In-place EMA with warm-up: decay_t = min(1 − 1/(step+1), decay); θ_T ← decay_t·θ_T + (1−decay_t)·θ_S.

    Step 0 therefore copies the student. Buffers (BN running stats, num_batches_tracked) are copied from the
    student, as in the authors' code. Parameters and buffers are matched by name. Returns decay_t.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    decay_t = min(1.0 - 1.0 / (step + 1), decay)
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        raise KeyError("teacher and student parameter names differ")
    for name, tp in t_params.items():
        sp = s_params[name].detach()
        tp.mul_(decay_t).add_(sp.to(tp.dtype), alpha=1.0 - decay_t)
    s_bufs = dict(student.named_buffers())
    t_bufs = dict(teacher.named_buffers())
    if s_bufs.keys() != t_bufs.keys():
        raise KeyError("teacher and student buffer names differ")
    for name, tb in t_bufs.items():
        tb.copy_(s_bufs[name])
    return decay_t


def softmax_consistency(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Σ over batch AND classes of (softmax(s) − softmax(t))². This is a SUM, not a mean, as in the authors'
    mean-teacher loss (it is weighted by 0.05 there). The teacher side is detached: no gradient reaches it."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"shape mismatch: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    p_s = torch.softmax(student_logits, dim=1)
    p_t = torch.softmax(teacher_logits.detach(), dim=1)
    return (p_s - p_t).square().sum()
