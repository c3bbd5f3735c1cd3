"""Dataset normalisation as the model's first layer, so everything outside the model is in [0,1] pixels."""
from __future__ import annotations

import torch
import torch.nn as nn


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

    def forward(self, x):
        return self.net(self.normalize(x))
