"""A reversed trigger: the smallest mask-and-pattern stamp that sends clean images of other classes to one class.

Neural Cleanse's idea, used here by AFT (``--reverse_every``). AFT's PGD epochs make an all2one-infected model
stop predicting the target class through its classifier layer, and its clean epochs teach the class back and
the trigger's features with it (docs/ablations.md, "AFT's late rebound"). The defender never sees the trigger,
but a stamp reversed toward the class the PGD vote picks is a stand-in for it: clean epochs that see a share of
each batch stamped, with the images' own labels, are taught that the stamp's features do not mean that class.
The stamp is found on the model as it is (the infected model first, then the fine-tuned one again), so it
follows the route to the class the model has at the time. Where no stamp can draw the trigger (WaNet's warp),
the smallest stamp is the class's own look, and unlearning it suppresses the class (docs/ablations.md).

The search is deterministic (a fixed start, Adam, no random draws): it keeps the run's random stream as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models import eval_mode
from models.folding import attack_view
from utils.run import interrupt

MASK_START = -3.0  # the mask's logit at the start: sigmoid(-3) = 0.047 on every pixel
LAMBDA_START = 0.01  # the mask penalty's weight at the start (of 100 x the mask's mean); adapted every 10 steps
LAMBDA_STEP = 1.5  # the weight grows by this factor while the stamp succeeds, and shrinks by it while it does not


@dataclass
class ReversedTrigger:
    """``stamp(x) = (1 - mask) x + mask pattern``; ``success``: the share of the search's images it sent to
    ``target``."""

    mask: Tensor  # (1, 1, H, W) in [0, 1]
    pattern: Tensor  # (1, C, H, W) in [0, 1]
    target: int
    success: float

    def stamp(self, x: Tensor) -> Tensor:
        m = self.mask.to(x.device, x.dtype)
        return (1 - m) * x + m * self.pattern.to(x.device, x.dtype)

    def record(self) -> dict:
        """What the summary keeps: the class, the mask's mean (a 3x3 patch on 32x32 is 0.009) and maximum, the
        success."""
        return {"target": self.target, "mask_mean": round(float(self.mask.mean()), 5),
                "mask_max": round(float(self.mask.max()), 4), "success": round(self.success, 4)}


def reverse_trigger(model, x: Tensor, target: int, steps: int = 300, success: float = 0.9,
                    lr: float = 0.1) -> ReversedTrigger:
    """The stamp with the smallest mean mask that sends at least ``success`` of ``x`` (images not of ``target``) to
    ``target``, over ``steps`` Adam steps on the whole of ``x`` (the mask and pattern are sigmoids of free logits).

    The loss is CE(model(stamp(x)), target) + lambda * 100 * mean(mask); lambda grows while the stamp reaches
    ``success`` and shrinks while it does not, so the mask shrinks as far as the model lets it. If no step reached
    ``success``, the last stamp is returned with the success it had. The model runs in eval mode (its flags
    restored after); no parameter gradient is computed.
    """
    n, c, h, w = x.shape
    x = x.detach()
    y = torch.full((n,), target, dtype=torch.long, device=x.device)
    best = None
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        net = attack_view(model)
        mask_logit = torch.full((1, 1, h, w), MASK_START, device=x.device, requires_grad=True)
        pattern_logit = torch.zeros((1, c, h, w), device=x.device, requires_grad=True)
        opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
        lam = LAMBDA_START
        for step in range(steps):
            interrupt.check(f"the trigger reversal, step {step}")
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            logits = net((1 - mask) * x + mask * pattern)
            loss = F.cross_entropy(logits, y) + lam * 100 * mask.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hit = float((logits.detach().argmax(1) == target).float().mean())
            size = float(mask.detach().mean())
            if hit >= success and (best is None or size < best[2]):
                best = (mask.detach().clone(), pattern.detach().clone(), size, hit)
            if step % 10 == 9:
                lam = lam * LAMBDA_STEP if hit >= success else lam / LAMBDA_STEP
        if best is None:
            best = (torch.sigmoid(mask_logit).detach(), torch.sigmoid(pattern_logit).detach(), None, hit)
    return ReversedTrigger(best[0], best[1], int(target), best[3])


class StampShare:
    """A fine-tuning batch transform: the first ``share`` of each (shuffled) batch stamped, labels kept."""

    def __init__(self, trigger: ReversedTrigger, share: float):
        self.trigger, self.share = trigger, share

    def __call__(self, model, x: Tensor, y: Tensor, generator=None) -> Tensor:
        k = max(1, int(round(self.share * len(x))))
        out = x.clone()
        out[:k] = self.trigger.stamp(x[:k])
        return out
