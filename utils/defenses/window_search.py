"""Where to put AFT's patch-shaped PGD examples: the window positions where one universal patch fools the model most.

For each k x k window position (every ``stride`` pixels, the last row and column included, so with
``stride <= k - 2`` every 3x3 square lies inside one window) one patch shared by all the given images is
optimised by signed gradient steps to raise their mean cross-entropy; positions are ranked by the loss their
patch reaches. It needs no trigger, target or poisoned data: only the infected model and a few clean images.
Measured on the synthetic grids (docs/ablations.md), the best positions are not the BadNets corner, yet
placing half of the examples' windows there lowers the patch backdoor on three seeds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models import eval_mode
from models.folding import attack_view
from utils.adversarial import window_masks


def _starts(size: int, k: int, stride: int) -> list[int]:
    out = list(range(0, size - k + 1, stride))
    if out[-1] != size - k:
        out.append(size - k)
    return out


def rank_windows(model, x: Tensor, y: Tensor, k: int = 5, stride: int = 3, steps: int = 5, alpha: float = 0.25,
                 generator: torch.Generator | None = None, chunk: int = 20) -> tuple[Tensor, Tensor]:
    """(positions (P, 2) as (top, left), the mean loss of each position's universal patch), highest loss first.

    ``x`` (N, C, H, W) in [0, 1], ``y`` their labels; each patch starts uniform at random (from ``generator``).
    The model runs in eval mode (its flags restored after); no parameter gradient is computed.
    """
    n, c, h, w = x.shape
    pos = torch.tensor([(t, l) for t in _starts(h, k, stride) for l in _starts(w, k, stride)], dtype=torch.long)
    masks = window_masks(pos[:, 0], pos[:, 1], k, x)  # (P, 1, H, W)
    losses = torch.empty(len(pos))
    dev = generator.device if generator is not None else x.device
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        net = attack_view(model)
        x = x.detach()
        for s in range(0, len(pos), chunk):
            m = masks[s:s + chunk].view(-1, 1, 1, h, w)  # (p, 1, 1, H, W): one window per position
            p = m.shape[0]
            patch = torch.rand((p, 1, c, h, w), generator=generator, device=dev).to(x.device, x.dtype)
            for step in range(steps + 1):
                patch.requires_grad_(True)
                images = (x.unsqueeze(0) * (1 - m) + patch * m).reshape(p * n, c, h, w)
                loss = F.cross_entropy(net(images), y.repeat(p), reduction="none").view(p, n).mean(1)
                if step == steps:
                    losses[s:s + p] = loss.detach().float().cpu()
                    break
                (g,) = torch.autograd.grad(loss.sum(), patch)
                patch = (patch.detach() + alpha * g.sign()).clamp_(0, 1)
    order = losses.argsort(descending=True, stable=True)
    return pos[order], losses[order]
