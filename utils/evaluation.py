"""The one evaluation loop (clean accuracy, attack success rate, WaNet noise accuracy) and training-set logits.

ASR counts triggered test images predicted as their backdoor label, excluding images whose true
label already is that label (the standard definition); ``asr_incl_target`` includes them, as the
original PBE code did. Without a trigger (a model and data of other code) ASR comes from a triggered test
set (``triggered``: images that carry the trigger, labelled with their backdoor labels): the share predicted
as that label; without either, ASR is not measured. All accuracies are fractions in [0,1]. ``all_logits`` is
the model's view of every training sample, in index order (the defenses score and select samples by it).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models import eval_mode
from utils.data.poison import BackdoorSpec, PoisonedTrainSet
from utils.data.triggers import WarpTrigger
from utils.run import distributed as dist
from utils.run.progress import n_batches, progress

LOGGED = ("loss", "clean_acc", "target_class_acc", "asr", "asr_incl_target", "noise_acc", "robust_acc")


def log_line(prefix: str, rec: dict) -> str:
    """One progress line: ``prefix | loss 0.1234 clean_acc 0.9800 ...`` (the metrics a record has)."""
    return prefix + " | " + " ".join(f"{k} {rec[k]:.4f}" for k in LOGGED if k in rec)


def evaluate(model: nn.Module, test, backdoor: BackdoorSpec | None = None, batch_size: int = 512,
             noise_seed: int = 0, channels_last: bool = False,
             indices: torch.Tensor | None = None, triggered=None, num_classes: int | None = None) -> dict:
    """Evaluate ``model`` on a test split (anything with ``batches``); returns a dict of fractions.

    WaNet's noise images come from their own generator seeded with ``noise_seed``: every evaluation sees the same
    noise, and an evaluation draws nothing from the run's random stream, so how often a run evaluates does not
    change its training.

    Counts are summed on the device (one host sync at the end). ``indices`` restricts the pass to
    those test images (a rank's shard); under ``torchrun`` the counts of all ranks are summed.
    ``triggered`` (only without ``backdoor``) is a triggered test set: its ``asr`` is the share of its images
    predicted as their (backdoor) label.
    With ``num_classes``, ``per_class_acc`` is the clean accuracy of each class (None for a class with no test
    image): a target class 10 points down reads differently when every class lost as much.
    """
    if triggered is not None:
        if backdoor is not None:
            raise ValueError("ASR comes from the trigger or from a triggered test set, not both")
        out = evaluate(model, test, None, batch_size, noise_seed, channels_last, indices, num_classes=num_classes)
        hits = evaluate(model, triggered, None, batch_size, noise_seed, channels_last)["clean_acc"]
        return {**out, "asr": hits}
    if indices is None and dist.world_size() > 1:  # torchrun: same weights and BN statistics everywhere, own shard
        dist.sync_buffers(model)
        indices = dist.eval_shard(len(test))
    warp = backdoor is not None and isinstance(backdoor.trigger, WarpTrigger)
    counts = None  # n, correct, bd_hits, bd_n, bd_hits_all, noise_correct, target_n, target_correct
    per_class = None  # (2, num_classes): test images, correct ones
    target = backdoor.target_label if backdoor is not None and backdoor.attack_mode == "all2one" else None
    generator = torch.Generator().manual_seed(noise_seed) if warp else None  # CPU: the same noise on any device
    with eval_mode(model), torch.inference_mode():
        total = n_batches(len(test) if indices is None else len(indices), batch_size)
        for _, x, y in progress(test.batches(batch_size, indices=indices), "evaluate", total):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if counts is None:
                counts = torch.zeros(8, dtype=torch.long, device=y.device)
            counts[0] += y.numel()
            right = model(x).argmax(1) == y
            counts[1] += right.sum()
            if num_classes is not None:
                if per_class is None:
                    per_class = torch.zeros(2, num_classes, dtype=torch.long, device=y.device)
                # scatter_add_: no boolean indexing, so no host sync per batch on a GPU
                per_class[0].scatter_add_(0, y, torch.ones_like(y))
                per_class[1].scatter_add_(0, y, right.long())
            if target is not None:
                is_target = y == target
                counts[6] += is_target.sum()
                counts[7] += (right & is_target).sum()
            if backdoor is None:
                continue
            yb = backdoor.labels(y)
            hit = model(backdoor.trigger(x)).argmax(1) == yb
            keep = y != yb
            counts[2] += (hit & keep).sum()
            counts[3] += keep.sum()
            counts[4] += hit.sum()
            if warp:
                counts[5] += (model(backdoor.trigger.apply_noise(x, generator)).argmax(1) == y).sum()
    if counts is None:
        counts = torch.zeros(8, dtype=torch.long)
    n, correct, bd_hits, bd_n, bd_hits_all, noise_correct, target_n, target_correct = dist.all_reduce_sum(counts).tolist()
    out = {"clean_acc": correct / max(n, 1)}
    if num_classes is not None:
        if per_class is None:
            per_class = torch.zeros(2, num_classes, dtype=torch.long)
        totals, rights = dist.all_reduce_sum(per_class).tolist()
        out["per_class_acc"] = [r / t if t else None for t, r in zip(totals, rights)]
    if backdoor is not None:
        out["asr"] = bd_hits / max(bd_n, 1)
        out["asr_incl_target"] = bd_hits_all / max(n, 1)
        if warp:
            out["noise_acc"] = noise_correct / max(n, 1)
        if target is not None and target_n:
            # clean accuracy on the target class: a "defense" that stops predicting the target at all has ASR 0 too
            out["target_class_acc"] = target_correct / target_n
    return out


@torch.no_grad()
def all_logits(model, poisoned: PoisonedTrainSet, batch_size: int = 512, channels_last=False) -> torch.Tensor:
    """Logits (on CPU) of every training sample as the model was trained on it, in index order, no augmentation.

    Under torchrun each rank computes every N-th batch (rank 0's BatchNorm statistics) and the zero-filled parts are
    summed, so every rank holds the same logits, equal to one process's, and all ranks score and select alike."""
    dist.sync_buffers(model)
    out = torch.zeros(len(poisoned), poisoned.data.num_classes)
    with eval_mode(model):
        batches = poisoned.batches(batch_size, shuffle=False)
        for b, (idx, x, _) in enumerate(progress(batches, "training-set logits", n_batches(len(poisoned), batch_size))):
            if not dist.owns_batch(b):
                continue
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out[idx.cpu()] = model(x).float().cpu()
    return dist.all_reduce_sum(out)
