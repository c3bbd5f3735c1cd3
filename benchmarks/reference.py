"""REFERENCE-STYLE BASELINE -- the attack-training step written the way the paper's code does it.

This file exists only so ``benchmarks/bench.py`` can compare our pipeline against the original
design; nothing in the toolkit uses it. It mirrors the data path of the PBE/PUD authors' attack
scripts (docs/pud.md describes their code):

- a torchvision-style ``Dataset`` over HWC uint8 arrays that builds a PIL image per sample and
  converts it with ``transforms.ToTensor()``, read by a shuffling ``DataLoader`` with workers;
- every batch is copied to the device, the first ``floor(pc * bs)`` images of the batch are
  poisoned (blend) and concatenated with the rest (per-batch dynamic poisoning);
- augmentation runs on the device batch after the transfer, kornia-style: a random crop with zero
  padding 5 (coin flip p=0.8 per batch), a random rotation of up to 10 degrees (p=0.5 per batch),
  each its own warp, and a random horizontal flip;
- a plain NCHW fp32 model (the paper code uses no channels_last / AMP), CE loss, SGD step.

kornia is not a dependency of this project, so its two warps are written out with
``affine_grid``/``grid_sample`` -- the same kernels kornia's ``warp_affine`` uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image


class PILDataset(torch.utils.data.Dataset):
    """Like torchvision's CIFAR10: HWC uint8 numpy images -> PIL -> ``ToTensor()`` in ``__getitem__``."""

    def __init__(self, x_uint8_nchw: torch.Tensor, y: torch.Tensor):
        import torchvision.transforms as T

        self.data = x_uint8_nchw.cpu().permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = y.cpu().tolist()
        self.transform = T.Compose([T.ToTensor()])

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return self.transform(img), self.targets[i]


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class PostTensorTransform:
    """kornia-style batch augmentation as in the PBE code: crop(pad 5, p=0.8), rotation(10, p=0.5), flip."""

    def __init__(self, crop_pad: int = 5, rotation: float = 10.0, flip: bool = True):
        self.crop_pad, self.rotation, self.flip = crop_pad, rotation, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        eye = torch.zeros(n, 2, 3, device=dev)
        eye[:, 0, 0] = eye[:, 1, 1] = 1
        if self.crop_pad and torch.rand(()) < 0.8:
            p = self.crop_pad
            theta = eye.clone()
            theta[:, 0, 2] = torch.randint(-p, p + 1, (n,), device=dev) * 2 / w
            theta[:, 1, 2] = torch.randint(-p, p + 1, (n,), device=dev) * 2 / h
            x = _warp(x, theta)
        if self.rotation and torch.rand(()) < 0.5:
            a = (torch.rand(n, device=dev) * 2 - 1) * math.radians(self.rotation)
            theta = eye.clone()
            theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
            theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
            x = _warp(x, theta)
        if self.flip:
            m = (torch.rand(n, device=dev) < 0.5).view(n, 1, 1, 1)
            x = torch.where(m, x.flip(3), x)
        return x


def make_loader(x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int, num_workers: int, device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(PILDataset(x_uint8, y), batch_size=batch_size, shuffle=True,
                                       num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                                       persistent_workers=num_workers > 0)


def train_epoch(net, optimizer, loader, device, pattern: torch.Tensor, alpha: float = 0.1, pc: float = 0.1,
                target_label: int = 0, post_transforms=None) -> dict:
    """One epoch of the reference attack training (blend, all2one, per-batch poisoning)."""
    net.train()
    total_loss = torch.zeros((), device=device)
    total_correct = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    pattern = pattern.to(device)
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        bs = inputs.shape[0]
        num_bd = int(bs * pc)
        inputs_bd = alpha * pattern + (1 - alpha) * inputs[:num_bd]
        targets_bd = torch.ones_like(targets[:num_bd]) * target_label
        total_inputs = torch.cat([inputs_bd, inputs[num_bd:]], dim=0)
        if post_transforms is not None:
            total_inputs = post_transforms(total_inputs)
        total_targets = torch.cat([targets_bd, targets[num_bd:]], dim=0)
        preds = net(total_inputs)
        loss_ce = F.cross_entropy(preds, total_targets)
        optimizer.zero_grad()
        loss_ce.backward()
        optimizer.step()
        total += bs
        total_loss += loss_ce.detach() * bs
        total_correct += torch.sum(torch.argmax(preds, 1) == total_targets)
    return {"loss": float(total_loss) / max(total, 1), "acc": int(total_correct) / max(total, 1)}


__all__ = ["PILDataset", "PostTensorTransform", "make_loader", "train_epoch"]
