"""Scoring and selecting training samples: consistency scores, top/bottom shares, poison-detection figures.

``consistency_scores`` is PBE's cosine similarity of the infected and current models' logits (PUD
subtracts 0.5 where the arg-max changed): high means the sample kept its meaning while the backdoor was
weakened, i.e. likely clean. ``POISON_CANDIDATES`` and ``INIT_POOLS`` are the registries of where a
poison set and PBE's round-0 extra set are drawn from. Without a ground truth (a training set of other code
given without its poisoned indices) ``truth`` is None and every detection figure is None: not measurable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.run.errors import UserError
from utils.settings import opt

NO_CLEAN_KNOWN = ("which training samples are clean is unknown (a training set of other code without "
                  "--poison_indices)")


def clean_indices(poisoned, why: str) -> torch.Tensor:
    """Indices of training images the attack left untouched (the model-repair simulation's clean data); ``why``
    names what needs them, for the error when no ground truth says which they are."""
    idx = poisoned.untouched()
    if idx is None:
        raise UserError(f"{why} needs clean training samples, but {NO_CLEAN_KNOWN}; {why} cannot run on it")
    return idx


def consistency_scores(ref_logits: torch.Tensor, cur_logits: torch.Tensor, argmax_penalty: bool = False) -> torch.Tensor:
    """0.5 + 0.5 cos(z_ref, z_cur) per sample (high = consistent = likely clean); PUD subtracts 0.5 on arg-max disagreement."""
    s = 0.5 + 0.5 * F.cosine_similarity(ref_logits, cur_logits, dim=1, eps=1e-12)
    if argmax_penalty:
        s = s - 0.5 * (ref_logits.argmax(1) != cur_logits.argmax(1)).float()
    return s


def label_scores(cur_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The current model's probability of each sample's own label (low = likely a dirty-label poison).

    A poison of an all2all (or unknown-target) attack carries the label of a class its image is not; once the
    backdoor is weakened the model gives it its true class, so its label's probability falls. Consistency with the
    infected logits also falls for clean images the fine-tuning merely moved, which are many among every class's
    suspects."""
    return cur_logits.float().softmax(1).gather(1, labels.to(cur_logits.device).view(-1, 1)).squeeze(1).cpu()


# How a poison set ranks its candidates, lowest first: (the defense's consistency scores, current logits, labels)
# -> scores. The consistency scores are the ones the defense already computed for its extra set (PBE's with its own
# --argmax_penalty).
POISON_SCORES = {
    "consistency": lambda consistency, cur, labels: consistency,  # the papers'
    "label": lambda consistency, cur, labels: label_scores(cur, labels),
}


def resolve_poison_score(setting: str, target: int | None) -> str:
    """``--poison_score`` for this run; ``auto``: the label's probability where no target is confirmed (the
    candidates are suspects of every class; the last step's poison set of the quick grid's four all2all cells is
    100 % precise with it on seeds 0 and 1, 78-95 % with consistency), else the papers' consistency."""
    if setting != "auto":
        return setting
    return "label" if target is None else "consistency"


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


def detection_stats(flagged: torch.Tensor, is_poison: torch.Tensor | None) -> dict:
    """Precision / recall / FPR of ``flagged`` indices as a poison detector against the ground truth (None
    without one)."""
    if is_poison is None:
        return {"precision": None, "recall": None, "fpr": None, "flagged": len(torch.unique(flagged))}
    truth = is_poison.cpu()
    mask = torch.zeros_like(truth)
    mask[flagged.cpu()] = True
    tp = int((mask & truth).sum())
    fp = int((mask & ~truth).sum())
    pos = int(truth.sum())
    neg = int((~truth).sum())
    return {"precision": tp / max(int(mask.sum()), 1), "recall": tp / max(pos, 1), "fpr": fp / max(neg, 1),
            "flagged": int(mask.sum())}


def poison_share(indices: torch.Tensor, is_poison: torch.Tensor | None) -> float | None:
    """Share of truly poisoned samples in a set of indices (the extra set's impurity); None without a ground truth."""
    if is_poison is None:
        return None
    if len(indices) == 0:
        return 0.0
    return float(is_poison.cpu()[indices.cpu()].float().mean())


def poison_count(indices: torch.Tensor, is_poison: torch.Tensor | None) -> int | None:
    """How many of ``indices`` are truly poisoned; None without a ground truth."""
    return None if is_poison is None else int(is_poison.cpu()[indices.cpu()].sum())


def shown(value, spec: str = ".3f") -> str:
    """A figure for a progress line: formatted, or ``n/a`` where it is not measurable (None)."""
    return "n/a" if value is None else format(value, spec)


# Where a poison set / poison detector picks its samples from, given the training labels, the (estimated) target and
# the samples an initial filter removed (PUD's SPECTRE and class split; PBE has none).
POISON_CANDIDATES = {
    "target": lambda labels, target, filtered, split: torch.nonzero(labels == target).flatten(),
    "split": lambda labels, target, filtered, split: split,  # the cluster the class split removed from the target
    "all": lambda labels, target, filtered, split: None,  # the paper code: every training sample
    "filtered": lambda labels, target, filtered, split: filtered,  # the samples the initial filtering removed
}


def poison_candidates_opt(subject: str):
    """The ``--poison_candidates`` setting of a defense whose ``subject`` (e.g. "the poison set is drawn from")
    picks from ``POISON_CANDIDATES``: one declaration for PBE's detector and PUD's poison set."""
    return opt("auto", f"{subject} the samples labelled as the target (target), the target's class-split cluster "
                       "(split), those the initial filtering removed (filtered), or all samples (all, paper code); "
                       "auto: split if the split found a cluster in a confirmed target, else target, else filtered",
               choices=("auto", *POISON_CANDIDATES))


def poison_score_opt(subject: str, consistency: str = "consistency of the infected and current logits (the papers')"):
    """The ``--poison_score`` setting (``POISON_SCORES``) of a defense whose ``subject`` ranks the candidates;
    ``consistency`` says what that score is in this defense."""
    return opt("auto", f"how {subject} ranks its candidates, lowest first: {consistency}, or label = the current "
                       "model's probability of the sample's own label; auto: label where no target is confirmed "
                       "(suspects of every class), else consistency",
               choices=("auto", *POISON_SCORES))


def auto_candidates(target: int | None, split: torch.Tensor | None) -> str:
    """``--poison_candidates auto``: the target's split cluster if the split found one there, else the target's
    samples if a target is confirmed, else what the filter removed.

    The split cluster is images of many other classes labelled as the target: the poisons. Among all target-labelled
    samples the least consistent ones are also the genuine target images the fine-tuning moved, which is most of
    them where genuine images are few beside the poisons (43 classes: 158 genuine, 860 poisons; precision 0.31)."""
    if target is None:
        return "filtered"
    return "split" if split is not None and len(split) > 0 else "target"


def resolve_candidates(setting: str, labels: torch.Tensor, target: int | None, filtered: torch.Tensor | None,
                       split: torch.Tensor | None) -> tuple[str, torch.Tensor | None]:
    """``--poison_candidates`` (``auto`` or a mode) for this run: the mode used and its candidate indices. ``split``
    is what the class split removed; it counts as the target's cluster only when a target is confirmed (without
    one it holds every class's clusters)."""
    split = split if target is not None else None
    mode = setting if setting != "auto" else auto_candidates(target, split)
    return mode, poison_candidates(mode, labels, target, filtered, split)


def poison_candidates(mode: str, labels: torch.Tensor, target: int, filtered: torch.Tensor | None = None,
                      split: torch.Tensor | None = None) -> torch.Tensor | None:
    """Indices a poison set is drawn from (``None`` = all samples); ``mode`` is a key of ``POISON_CANDIDATES``.

    An all2one poisoned sample always carries the target label, and once the backdoor is weakened exactly those
    target-labelled samples flip their arg-max away from the infected model's, so the consistency score separates
    them from genuine target-class images; over all samples it also picks up clean images the fine-tuning flipped.
    ``filtered`` ranks only what an initial filter removed: the suspects, when that filter is good; ``split`` only
    the class split's cluster in the target class.
    """
    if mode == "filtered" and (filtered is None or len(filtered) == 0):
        raise UserError("--poison_candidates filtered needs samples removed by the initial filtering, and it removed "
                        "none; use --poison_candidates target (the default) or all")
    if mode == "split" and (split is None or len(split) == 0):
        raise UserError("--poison_candidates split needs a cluster the class split removed from the target class, and "
                        "it removed none; use --poison_candidates target or auto")
    return POISON_CANDIDATES[mode](labels, target, filtered, split)


# Where PBE's round-0 random extra set is drawn from, given the training labels, the (confirmed) target and the
# samples the per-class filter kept.
INIT_POOLS = {
    "non_target": lambda labels, target, kept: torch.nonzero(labels != target).flatten(),  # no all2one poison in it
    "filtered": lambda labels, target, kept: kept,  # what SPECTRE and the class split kept, every class
    "all": lambda labels, target, kept: torch.arange(len(labels)),  # the paper code
}


def suspect_scores(stages: dict, consistency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The samples any stage flagged, most suspicious first: (indices, their scores, stage -> flagged set).

    score = the sum of the weights of the stages that flagged the sample + 0.25 x how far the defense moved the
    model's view of it. A stage's weight is the share of its flags that another stage also raised (1 for a lone
    stage): without a ground truth, agreement is the only evidence of a detector's precision, so a stage that
    flags many samples nothing else confirms (SPECTRE's fixed share of a class of clean images) counts less.
    The movement is ``(1 - consistency) / 1.5`` in [0, 1] (``consistency_scores`` of the infected and the
    defended model with the arg-max penalty; above 1/3 the prediction changed). Ties by index.
    """
    flagged = {name: idx.cpu().long().unique() for name, idx in stages.items() if idx is not None}
    n = len(consistency)
    masks = {}
    for name, idx in flagged.items():
        masks[name] = torch.zeros(n, dtype=torch.bool)
        masks[name][idx] = True
    votes = torch.zeros(n)
    for name, mask in masks.items():
        others = torch.zeros(n, dtype=torch.bool)
        for other, m in masks.items():
            if other != name:
                others |= m
        weight = float((mask & others).sum()) / max(int(mask.sum()), 1) if len(masks) > 1 else 1.0
        votes[mask] += weight
    union = torch.nonzero(torch.stack(list(masks.values())).any(0)).flatten() if masks else torch.zeros(0, dtype=torch.long)
    score = votes + 0.25 * (1 - consistency.cpu().float()).clamp(0, 1.5) / 1.5
    order = union[torch.argsort(-score[union], stable=True)]
    return order, score[order], {name: set(idx.tolist()) for name, idx in flagged.items()}
