"""The one evaluation loop: clean accuracy, attack success rate (both variants) and WaNet noise accuracy.

ASR counts triggered test images predicted as their backdoor label, excluding images whose true
label already is that label (the standard definition); ``asr_incl_target`` includes them, as the
original PBE code did. All accuracies are fractions in [0,1].
"""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.poison import BackdoorSpec
from utils.triggers import WarpTrigger


def evaluate(model: nn.Module, test, backdoor: BackdoorSpec | None = None, batch_size: int = 512,
             generator: torch.Generator | None = None, channels_last: bool = False) -> dict:
    """Evaluate ``model`` on a test split (anything with ``batches``); returns a dict of fractions."""
    was_training = model.training
    model.eval()
    n = correct = 0
    bd_hits = bd_n = bd_hits_all = 0
    noise_correct = 0
    try:
        with torch.inference_mode():
            for _, x, y in test.batches(batch_size):
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                n += y.numel()
                correct += (model(x).argmax(1) == y).sum().item()
                if backdoor is None:
                    continue
                yb = backdoor.labels(y)
                hit = model(backdoor.trigger(x)).argmax(1) == yb
                keep = y != yb
                bd_hits += (hit & keep).sum().item()
                bd_n += keep.sum().item()
                bd_hits_all += hit.sum().item()
                if isinstance(backdoor.trigger, WarpTrigger):
                    noise_correct += (model(backdoor.trigger.apply_noise(x, generator)).argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    out = {"clean_acc": correct / max(n, 1)}
    if backdoor is not None:
        out["asr"] = bd_hits / max(bd_n, 1)
        out["asr_incl_target"] = bd_hits_all / max(n, 1)
        if isinstance(backdoor.trigger, WarpTrigger):
            out["noise_acc"] = noise_correct / max(n, 1)
    return out
