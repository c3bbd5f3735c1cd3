"""Scoring and selecting training samples: consistency scores, top/bottom shares, poison-detection figures.

``consistency_scores`` is PBE's cosine similarity of the infected and current models' logits (PUD
subtracts 0.5 where the arg-max changed): high means the sample kept its meaning while the backdoor was
weakened, i.e. likely clean. ``POISON_CANDIDATES`` and ``INIT_POOLS`` are the registries of where a
poison set and PBE's round-0 extra set are drawn from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.data.poison import PoisonedTrainSet
from utils.run.errors import UserError


def clean_indices(poisoned: PoisonedTrainSet) -> torch.Tensor:
    """Indices of training images the attack left untouched (not poisoned, not WaNet noise-mode)."""
    bad = (poisoned.is_poison | poisoned.is_noise).cpu()
    return torch.nonzero(~bad).flatten()


def consistency_scores(ref_logits: torch.Tensor, cur_logits: torch.Tensor, argmax_penalty: bool = False) -> torch.Tensor:
    """0.5 + 0.5 cos(z_ref, z_cur) per sample (high = consistent = likely clean); PUD subtracts 0.5 on arg-max disagreement."""
    s = 0.5 + 0.5 * F.cosine_similarity(ref_logits, cur_logits, dim=1, eps=1e-12)
    if argmax_penalty:
        s = s - 0.5 * (ref_logits.argmax(1) != cur_logits.argmax(1)).float()
    return s


def top_fraction(scores: torch.Tensor, fraction: float, among: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the highest-scored ``fraction`` of samples (of ``among`` if given), sorted by index.

    With ``labels`` the fraction is taken within each label, so the selection keeps the classes'
    proportions (consistency is higher for some classes than others; a global top share can drop
    whole classes). One sort by (label, -score) picks every class's top share.
    """
    idx = torch.arange(len(scores)) if among is None else among
    order = torch.argsort(scores[idx], descending=True, stable=True)
    if labels is None:
        return idx[order[:max(1, int(round(fraction * len(idx))))]].sort().values
    lab = labels[idx]
    order = order[torch.argsort(lab[order], stable=True)]  # grouped by label, best first within a label
    counts = torch.bincount(lab, minlength=int(lab.max()) + 1 if len(lab) else 0)
    keep_n = torch.clamp((counts.float() * fraction).round().long(), min=1) * (counts > 0)
    rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[lab[order]]
    return idx[order[rank < keep_n[lab[order]]]].sort().values


def bottom_fraction(scores: torch.Tensor, fraction: float, among: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the lowest-scored ``fraction`` of all samples, taken from ``among`` if given, sorted by index."""
    k = max(1, int(round(fraction * len(scores))))
    idx = torch.arange(len(scores)) if among is None else among
    return idx[torch.argsort(scores[idx], stable=True)[:k]].sort().values


def detection_stats(flagged: torch.Tensor, is_poison: torch.Tensor) -> dict:
    """Precision / recall / FPR of ``flagged`` indices as a poison detector against the ground truth."""
    truth = is_poison.cpu()
    mask = torch.zeros_like(truth)
    mask[flagged.cpu()] = True
    tp = int((mask & truth).sum())
    fp = int((mask & ~truth).sum())
    pos = int(truth.sum())
    neg = int((~truth).sum())
    return {"precision": tp / max(int(mask.sum()), 1), "recall": tp / max(pos, 1), "fpr": fp / max(neg, 1),
            "flagged": int(mask.sum())}


def poison_share(indices: torch.Tensor, is_poison: torch.Tensor) -> float:
    """Share of truly poisoned samples in a set of indices (the extra set's impurity)."""
    if len(indices) == 0:
        return 0.0
    return float(is_poison.cpu()[indices.cpu()].float().mean())


# Where a poison set / poison detector picks its samples from, given the training labels, the (estimated) target and
# the samples an initial filter removed (PUD's SPECTRE and class split; PBE has none).
POISON_CANDIDATES = {
    "target": lambda labels, target, filtered: torch.nonzero(labels == target).flatten(),
    "all": lambda labels, target, filtered: None,  # the paper code: every training sample
    "filtered": lambda labels, target, filtered: filtered,  # PUD: the samples its initial filtering removed
}


def poison_candidates(mode: str, labels: torch.Tensor, target: int, filtered: torch.Tensor | None = None) -> torch.Tensor | None:
    """Indices a poison set is drawn from (``None`` = all samples); ``mode`` is a key of ``POISON_CANDIDATES``.

    An all2one poisoned sample always carries the target label, and once the backdoor is weakened exactly those
    target-labelled samples flip their arg-max away from the infected model's, so the consistency score separates
    them from genuine target-class images; over all samples it also picks up clean images the fine-tuning flipped.
    ``filtered`` ranks only what an initial filter removed: the suspects, when that filter is good.
    """
    if mode == "filtered" and (filtered is None or len(filtered) == 0):
        raise UserError("--poison_candidates filtered needs samples removed by the initial filtering, and it removed "
                        "none; use --poison_candidates target (the default) or all")
    return POISON_CANDIDATES[mode](labels, target, filtered)


# Where PBE's round-0 random extra set is drawn from, given the training labels, the (confirmed) target and the
# samples the per-class filter kept.
INIT_POOLS = {
    "non_target": lambda labels, target, kept: torch.nonzero(labels != target).flatten(),  # no all2one poison in it
    "filtered": lambda labels, target, kept: kept,  # what SPECTRE and the class split kept, every class
    "all": lambda labels, target, kept: torch.arange(len(labels)),  # the paper code
}
