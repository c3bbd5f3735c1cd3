"""Classifier architectures and ``build_model``; every model takes [0,1] pixels and normalises inside.

``ARCHS`` is the registry (name -> constructor ``f(num_classes, in_channels)``). ``build_model``
prepends a ``Normalize`` layer with the dataset's mean/std, so attacks, triggers and ε all live in
pixel space while the network still sees normalised inputs. ``eval_mode`` and ``frozen_copy`` are the
one way code here switches a model to eval mode for a while and the one way it takes a frozen copy.
"""
from __future__ import annotations

import contextlib
import copy

import torch.nn as nn

from models.normalize import Normalize, NormalizedModel
from models.preact_resnet import PreActResNet18
from models.resnet import resnet18
from models.small_cnn import SmallCNN
from utils.run.errors import UserError

ARCHS = {
    "preactresnet18": PreActResNet18,
    "resnet18": resnet18,
    "cnn": SmallCNN,
}


def build_model(arch: str, num_classes: int, in_channels: int = 3, mean=None, std=None) -> NormalizedModel:
    """Build ``arch`` for ``num_classes`` outputs and ``in_channels`` input channels, normalising inside."""
    if arch not in ARCHS:
        raise UserError(f"unknown arch '{arch}'; choose one of {', '.join(ARCHS)}")
    net = ARCHS[arch](num_classes=num_classes, in_channels=in_channels)
    mean = tuple(mean) if mean is not None else (0.5,) * in_channels
    std = tuple(std) if std is not None else (0.25,) * in_channels
    return NormalizedModel(Normalize(mean, std), net)


__all__ = ["ARCHS", "build_model", "eval_mode", "frozen_copy", "model_from_checkpoint", "Normalize", "NormalizedModel"]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode; restore every submodule's own train/eval flag on exit (also on errors)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


def frozen_copy(model: nn.Module, state_dict: dict | None = None) -> nn.Module:
    """A frozen eval-mode copy of ``model`` (optionally with other weights): a reference, a teacher.

    A copy of a ``--compile``'d model runs eagerly (the compiled forward belongs to the original instance),
    so forward hooks on it (SPECTRE's representations) always fire.
    """
    ref = copy.deepcopy(model).eval()
    if state_dict is not None:
        ref.load_state_dict(state_dict)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def model_from_checkpoint(ck: dict, device="cpu") -> NormalizedModel:
    """Rebuild the exact model stored in a toolkit checkpoint (arch, classes, channels, normalisation, weights)."""
    kw = ck["arch_kwargs"]
    model = build_model(ck["arch"], kw["num_classes"], kw["in_channels"])
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit arch '{ck['arch']}' ({str(e).splitlines()[0]})") from None
    return model.to(device)
