"""Dataset normalisation as the model's first layer, so everything outside the model is in [0,1] pixels.

``NormalizedModel`` is also where the speed switches that must follow the model live:
``amp_dtype`` (bf16 autocast inside ``forward``; logits come back as float32, so losses, PGD
gradients and metrics are computed in float32 outside) and ``compile_forward`` (``torch.compile``
of this instance's forward). Neither changes the state dict, and a ``deepcopy`` (reference model,
mean teacher) runs eagerly: the compiled function belongs to the original instance only, so hooks
on a copy (SPECTRE) are never silently skipped by a stale compiled graph.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

_COMPILED: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """``normalize`` then ``net``; named submodules stay reachable as ``net.<name>`` for hooks."""

    def __init__(self, normalize: Normalize, net: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net
        self.amp_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: autocast inside forward

    def _forward(self, x):
        if self.amp_dtype is None:
            return self.net(self.normalize(x))
        with torch.autocast(x.device.type, dtype=self.amp_dtype):
            out = self.net(self.normalize(x))
        return out.float()

    def forward(self, x):
        fn = _COMPILED.get(self)
        return fn(x) if fn is not None else self._forward(x)


def compile_forward(model: NormalizedModel, **kwargs) -> NormalizedModel:
    """``torch.compile`` this instance's forward in place (state dict unchanged; copies stay eager)."""
    _COMPILED[model] = torch.compile(model._forward, **kwargs)
    return model


def is_compiled(model: nn.Module) -> bool:
    return model in _COMPILED
