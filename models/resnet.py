"""ResNet18 from torchvision (random init, no weight download) for 224x224 inputs, any channel count."""
from __future__ import annotations

import torch.nn as nn


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    import torchvision  # here, not at the top: importing torchvision takes 1-2 s (it loads torch._dynamo), and
    # every entry script imports this module just to parse its arguments

    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net
