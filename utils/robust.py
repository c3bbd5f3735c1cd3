"""Robust accuracy from command-line arguments: the PGD evaluation the entry scripts report.

``DEFAULT_EVAL`` is the standard L∞ evaluation (ε = 8/255, α = 2/255, 20 steps, random start);
any ``args.eval_*`` field that is missing or None falls back to it. The random start is drawn from
a CPU generator seeded from ``args.seed``, so the number is reproducible run to run.
"""
from __future__ import annotations

import torch

from utils.adversarial import PGD, robust_accuracy
from utils.run.errors import UserError

DEFAULT_EVAL = dict(eps=8 / 255, alpha=2 / 255, steps=20, random_start=True)


def _arg(args, name: str, default):
    v = getattr(args, name, default)
    return default if v is None else v


def robust_acc_from_args(model: torch.nn.Module, test, args) -> dict:
    """``robust_accuracy`` with PGD built from ``args.eval_eps/eval_alpha/eval_steps`` (DEFAULT_EVAL fallbacks).

    Optional fields: ``eval_norm`` ('linf'), ``eval_restarts`` (1), ``eval_max_images`` (all),
    ``eval_bs`` (256), ``channels_last`` ('off' disables it), ``seed`` (0).
    """
    try:
        attack = PGD(eps=_arg(args, "eval_eps", DEFAULT_EVAL["eps"]),
                     alpha=_arg(args, "eval_alpha", DEFAULT_EVAL["alpha"]),
                     steps=_arg(args, "eval_steps", DEFAULT_EVAL["steps"]),
                     norm=_arg(args, "eval_norm", "linf"),
                     random_start=DEFAULT_EVAL["random_start"],
                     restarts=_arg(args, "eval_restarts", 1))
    except ValueError as e:
        raise UserError(f"bad robust-evaluation setting: {e}") from None
    gen = torch.Generator().manual_seed(int(_arg(args, "seed", 0)) + 104729)
    return robust_accuracy(model, test, attack, batch_size=int(_arg(args, "eval_bs", 256)),
                           max_images=_arg(args, "eval_max_images", None), generator=gen,
                           channels_last=getattr(args, "channels_last", "off") != "off")
