"""Training augmentation as one batched tensor op on the device.

Random crop with zero padding, random rotation and horizontal flip are all affine maps, so a batch
is augmented with a single ``affine_grid`` + ``grid_sample`` call using per-image parameters (no
Python loop over images, no PIL). Integer crop shifts with no rotation land exactly on pixel
centres, so a pure crop moves pixels without blurring them. The defaults follow the paper code:
crop with probability 0.8, rotation with probability 0.5 (drawn per image here rather than per
batch), flip only where the dataset wants it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Augment:
    def __init__(self, crop_pad: int = 0, rotation: float = 0.0, flip: bool = False, p_crop: float = 0.8, p_rot: float = 0.5):
        self.crop_pad = int(crop_pad)
        self.rotation = float(rotation)
        self.flip = bool(flip)
        self.p_crop = p_crop
        self.p_rot = p_rot

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.rotation > 0 or self.flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.active:
            return x
        n, _, h, w = x.shape
        dev = x.device

        def rand(*shape):
            return torch.rand(shape, generator=generator, device=generator.device if generator is not None else "cpu").to(dev)

        angle = torch.zeros(n, device=dev)
        if self.rotation > 0:
            angle = (rand(n) * 2 - 1) * math.radians(self.rotation) * (rand(n) < self.p_rot)
        tx = torch.zeros(n, device=dev)
        ty = torch.zeros(n, device=dev)
        if self.crop_pad > 0:
            use = (rand(n) < self.p_crop).float()
            p = self.crop_pad
            dx = torch.floor(rand(n) * (2 * p + 1)) - p
            dy = torch.floor(rand(n) * (2 * p + 1)) - p
            tx, ty = dx * 2 / w * use, dy * 2 / h * use
        sx = torch.ones(n, device=dev)
        if self.flip:
            sx = torch.where(rand(n) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos * sx, -sin * (h / w), tx], dim=1),
            torch.stack([sin * sx * (w / h), cos, ty], dim=1),
        ], dim=1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
