"""A small, fast CNN for CPU experiments and tests (about 0.3M parameters at 32x32)."""
from __future__ import annotations

import torch.nn as nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(in_channels, w), nn.MaxPool2d(2),
            _block(w, 2 * w), nn.MaxPool2d(2),
            _block(2 * w, 4 * w), _block(4 * w, 4 * w), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
