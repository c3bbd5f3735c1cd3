"""Two-way split of the target class: the filter for when the poisons are the class's majority.

With all2one poisoning at 10 % the target label holds about as many poisoned images as genuine ones,
where SPECTRE's robust statistics, built to treat the poison as a minority, break down. But in the
infected model's representations the target-labelled samples still form two clusters, the genuine
images and the triggered images of the other classes. Which cluster is the poison is told apart by the
images' content: the poisons are images of the other classes, so with the target logit masked out the
infected model still recognises their own class confidently, while genuine target images match no other
class well. The cluster with the higher mean *non-target confidence* is flagged.

The same reasoning gives a check. Images of the other classes are recognised as *many* other classes, a
sub-mode of a genuine class as a few neighbours: the flagged cluster's arg-max over the non-target
classes must spread over more classes (exp of its entropy, the effective number of classes) than the
other cluster's, by ``min_spread`` times; where 2-means cuts a clean class in two, the more confident
half spreads over *fewer* classes and the split is not applied. The figures measured on the synthetic
set are in docs/pud.md. This is an addition of this toolkit (PUD has only SPECTRE).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SplitResult", "two_means", "non_target_confidence", "effective_classes", "split_target_class",
           "strong_splits"]


@dataclass
class SplitResult:
    """``flagged_mask``: [N] bool, True = in the suspicious cluster (all False when not ``applied``). ``assign``: [N]
    cluster of each sample (0/1; at ``level`` 2: 1 the flagged sub-cluster, 0 the rest of the class).
    ``confidence``: mean non-target confidence of clusters 0 and 1; ``spread``: their effective numbers of
    non-target classes. ``separation``: centroid distance over the within-cluster RMS distance
    (reported only; docs/pud.md gives the values measured for clean classes and poison splits)."""

    flagged_mask: Tensor
    assign: Tensor
    sizes: tuple[int, int]
    confidence: tuple[float, float]
    spread: tuple[float, float]
    separation: float
    flagged_cluster: int
    applied: bool
    level: int = 1  # 2: a sub-cluster of the first split, against the rest of the class (``assign`` 1 / 0)

    @property
    def candidate_mask(self) -> Tensor:
        """[N] bool: the cluster the check judged (flagged if ``applied``; none for a class too small to split)."""
        return self.assign == self.flagged_cluster

    @property
    def candidate_spread(self) -> float:
        return self.spread[self.flagged_cluster] if self.flagged_cluster >= 0 else 0.0


def two_means(z: Tensor, generator: torch.Generator | None = None, restarts: int = 5, iters: int = 100) -> Tensor:
    """2-means (Lloyd) on the rows of ``z``; the best of ``restarts`` seeded starts by within-cluster sum of squares.
    Returns the [N] cluster index (0/1). Batched: each iteration is one distance matrix."""
    n = z.shape[0]
    if n < 2:
        return torch.zeros(n, dtype=torch.long)
    best, best_assign = None, None
    for _ in range(restarts):
        c = z[torch.randperm(n, generator=generator)[:2]].clone()
        assign = None
        for _ in range(iters):
            new = torch.cdist(z, c).argmin(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            for j in range(2):
                if (assign == j).any():
                    c[j] = z[assign == j].mean(0)
        inertia = float(((z - c[assign]) ** 2).sum())
        if best is None or inertia < best:
            best, best_assign = inertia, assign
    return best_assign


def non_target_confidence(logits: Tensor, target: int) -> tuple[Tensor, Tensor]:
    """[N] top softmax probability over the classes other than ``target`` (its logit masked out), and that class."""
    masked = logits.float().clone()
    masked[:, target] = float("-inf")
    return masked.softmax(1).max(1)


def effective_classes(pred: Tensor, num_classes: int) -> float:
    """exp(entropy) of the histogram of class indices ``pred``: how many classes they spread over (1 .. num_classes)."""
    if len(pred) == 0:
        return 0.0
    p = torch.bincount(pred, minlength=num_classes).double() / len(pred)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def split_target_class(reps: Tensor, logits: Tensor, target: int, dims: int = 10, min_spread: float = 1.25,
                       generator: torch.Generator | None = None, confidence_tie: float = 0.1,
                       second_level: bool = True) -> SplitResult:
    """Split target-labelled samples (``reps`` [N, D] representations, ``logits`` [N, C] of the infected model) in
    two clusters on their top-``dims`` principal components; flag the cluster with the higher non-target confidence
    if its non-target arg-max spreads over at least ``min_spread`` times as many classes as the other's.

    Mean confidences within ``confidence_tie`` of each other decide nothing (an overconfident model gives the genuine
    target images a confident runner-up class too: PreActResNet18 on the synthetic set, 0.84 against the poisons'
    0.83; 43 classes, blend: 0.78 against 0.72; a 10-class fp32 blend model: 0.905 against 0.853); the cluster
    that spreads over more classes is then the candidate, under the same ``min_spread`` check. Where 2-means cuts
    a clean class, the wider half is usually far less confident (0.49 against 0.87), and is not the candidate.

    ``second_level``: 2-means may first cut off a sub-mode of the genuine images instead (a blend model of another
    seed: 202 of 964 target-labelled images, 177 of them genuine, confidently like one neighbour class, against the
    762 that held 475 of the 500 poisons). When the first split is refused because the other cluster spreads over
    ``min_spread`` times as many classes as the candidate (a narrow sub-mode was the candidate), that wide cluster
    is split once more, and the larger of its halves that passes the same check against the rest of the class is
    flagged. (Splitting both clusters again split 8 clean classes of the quick grids' models, 7 on 43 classes; this
    splits 2, both on 43 classes.)"""
    if reps.dim() != 2 or logits.dim() != 2 or reps.shape[0] != logits.shape[0]:
        raise ValueError(f"reps [N, D] and logits [N, C] must describe the same samples, got shapes "
                         f"{tuple(reps.shape)} and {tuple(logits.shape)}")
    n = reps.shape[0]
    if n < 4:
        none = torch.zeros(n, dtype=torch.bool)
        return SplitResult(none, torch.zeros(n, dtype=torch.long), (n, 0), (float("nan"),) * 2, (0.0, 0.0), 0.0, -1,
                           False)
    conf, pred = non_target_confidence(logits, target)
    z = _principal(reps, dims)
    first = _judged(z, two_means(z, generator), conf, pred, logits.shape[1], min_spread, confidence_tie)
    wide = 1 - first.flagged_cluster  # refused because the other cluster spreads min_spread x more: a narrow sub-mode
    if first.applied or not second_level or first.spread[wide] < min_spread * first.spread[1 - wide]:
        return first
    part = torch.nonzero(first.assign == wide).flatten()
    if len(part) < 4:
        return first
    sub = two_means(_principal(reps[part], dims), generator)
    best = None
    for k in range(2):
        assign = torch.zeros(n, dtype=torch.long)
        assign[part[sub == k]] = 1  # this sub-cluster against the rest of the class
        res = _judged(z, assign, conf, pred, logits.shape[1], min_spread, confidence_tie, level=2)
        if res.applied and res.flagged_cluster == 1 and (best is None or res.sizes[1] > best.sizes[1]):
            best = res
    return best or first


def _principal(reps: Tensor, dims: int) -> Tensor:
    """The rows of ``reps``, centred, on their top-``dims`` principal components."""
    x = reps.double() - reps.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:min(dims, v.shape[0])].T


def _judged(z: Tensor, assign: Tensor, conf: Tensor, pred: Tensor, num_classes: int, min_spread: float,
            confidence_tie: float, level: int = 1) -> SplitResult:
    """The check of ``split_target_class`` on the two groups ``assign`` (0/1) of the samples ``z``."""
    n = len(assign)
    sizes = tuple(int((assign == j).sum()) for j in range(2))
    means = tuple(float(conf[assign == j].mean()) if sizes[j] else float("-inf") for j in range(2))
    centroids = torch.stack([z[assign == j].mean(0) if sizes[j] else z.mean(0) for j in range(2)])
    within = ((z - centroids[assign]) ** 2).sum(1).mean().sqrt()
    separation = float((centroids[0] - centroids[1]).norm() / within.clamp_min(1e-12))
    spread = tuple(effective_classes(pred[assign == j], num_classes) for j in range(2))
    flagged = int(means[1] > means[0]) if abs(means[1] - means[0]) > confidence_tie else int(spread[1] > spread[0])
    applied = min(sizes) > 0 and spread[flagged] >= min_spread * spread[1 - flagged]
    mask = (assign == flagged) if applied else torch.zeros(n, dtype=torch.bool)
    return SplitResult(mask, assign, sizes, means, spread, separation, flagged, applied, level)


def strong_splits(candidate_spread: dict[int, float], widest_spread: dict[int, float],
                  factor: float) -> tuple[list[int], float]:
    """Classes whose split candidate spreads over at least ``factor`` times as many classes as a class's wider
    cluster typically does (the median of ``widest_spread`` over the model's classes), and that median.

    The split's own check compares the two clusters of one class, so it fails where 2-means cuts the poisons
    in two (a 43-class blend model: 745 poisons spread over 8.5 classes against 115 poisons and the genuine
    images, 7.7) and cannot tell a target class from the clean classes that split too (a 43-class patch model:
    11 of 43). Measured against the other classes instead, triggered images of every other class stand out: on
    the 24 infected models of the quick grids (two attack seeds, 10 and 43 classes) the candidates at 2x the
    median or more were only all2one target classes (2.2-9.7x, 470-860 images, 88-100 % poisons); the highest
    of any clean or all2all class was 1.5x. ``factor`` 0 turns it off."""
    if factor <= 0 or not widest_spread:
        return [], float("nan")
    baseline = statistics.median(widest_spread.values())
    return sorted(c for c, s in candidate_spread.items() if s >= factor * baseline), baseline
