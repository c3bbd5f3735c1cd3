"""Filtering every class, and the decision whether a defense may rely on one backdoor target.

A defender knows neither the attack's mode nor its target. ``filter_classes`` therefore runs the initial
filter on every label: SPECTRE flags the most suspicious share of each class (poisons that are a minority
of their label: all2all, a small all2one rate), and the two-way split (``class_split``) flags a cluster
that the infected model, the class's logit masked, sees as images of many other classes (all2one poisons,
which are the target label's majority). Both are recorded per class.

``decide_target`` then weighs the evidence: a target class (the one given, or the PGD vote's winner unless
the vote is weak) is *confirmed* when the split found its poison cluster there, or when the vote for it is
decisive (its winner well ahead of every other class). A confirmed target lets the defense use its target-class
machinery (filter that class, draw the poison set from its samples); with none confirmed, e.g. for an
all2all backdoor or a wrong ``--target_label``, the defense goes class-agnostic (every class filtered, the
poison set drawn from what the filter removed). The decision and its reasons go into summary.json.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from utils.defenses.class_split import split_target_class, strong_splits
from utils.defenses.selection import detection_stats, poison_count, poison_share, shown
from utils.defenses.spectre import layer_representations, spectre_filter
from utils.defenses.target import DECISIVE_LEAD, decisive
from utils.evaluation import all_logits
from utils.run import distributed as dist
from utils.run.progress import n_batches, progress
from utils.run.stagetimer import stage
from utils.settings import Settings, fraction, opt, require

SPECTRE_LAYERS = {"cnn": "net.features", "preactresnet18": "net.layer4.0", "resnet18": "net.layer2.1"}


# the largest share of the classes in which the split may find a cluster and still confirm one target
# (--class_split_confirm): all2all leaves one in every class; 4-5 of 43 clean classes split on the 43-class set
CLASS_SPLIT_CONFIRM = 0.2


@dataclass(frozen=True)
class FilterSettings(Settings):
    GROUP = "filtering the training set (SPECTRE and the class split, per class)"
    spectre_layer: str | None = opt(None, "module whose output SPECTRE and the split use", shown=", ".join(
        f"{v} ({k})" for k, v in SPECTRE_LAYERS.items()))
    spectre_remove: float = opt(0.25, "SPECTRE: share of a class removed", type=fraction)
    class_split: int = opt(1, "1: also split a class in two clusters and drop the one the infected model, the "
                              "class's logit masked, finds most like other classes (this toolkit's addition, for "
                              "all2one poisons that are the target label's majority); 0: SPECTRE only (the paper)",
                           type=int, choices=(0, 1))
    class_split_spread: float = opt(1.25, "the split is applied only if the removed cluster's non-target predictions "
                                          "spread over this many times as many classes as the other's", type=fraction)
    class_split_tie: float = opt(0.1, "clusters whose mean non-target confidences differ by at most this much are "
                                       "told apart by their spread alone", type=fraction)
    class_split_confirm: float = opt(CLASS_SPLIT_CONFIRM, "the split confirms a class as the one target only while it found a cluster "
                                          "in at most this share of the classes (all2all leaves one in every class)",
                                     type=fraction)
    class_split_strong: float = opt(2.0, "a class whose split candidate spreads over at least this many times the "
                                         "median, over the classes, of a class's wider cluster is split whatever the "
                                         "other cluster's spread, and confirms itself as the target however many "
                                         "classes split (0: off)", type=float)

    def check(self) -> None:
        require(0 < self.spectre_remove < 1, f"--spectre_remove must be in (0, 1), got {self.spectre_remove}")
        require(self.class_split_spread > 0, f"--class_split_spread must be positive, got {self.class_split_spread}")
        require(0 <= self.class_split_tie < 1, f"--class_split_tie must be in [0, 1), got {self.class_split_tie}")
        require(0 <= self.class_split_confirm <= 1,
                f"--class_split_confirm must be in [0, 1], got {self.class_split_confirm}")
        require(self.class_split_strong >= 0, f"--class_split_strong must be >= 0, got {self.class_split_strong}")

    def for_arch(self, arch: str) -> "FilterSettings":
        """The default ``--spectre_layer`` of ``arch`` filled in."""
        return self if self.spectre_layer is not None else self.replace(spectre_layer=SPECTRE_LAYERS.get(arch, "net"))

    def check_model(self, model, arch: str) -> None:
        names = [n for n, _ in model.named_modules() if n]
        require(self.spectre_layer in names,
                f"--spectre_layer '{self.spectre_layer}' is not a module of {arch}; choose one of "
                f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''}")


def class_representations(reference, poisoned, layer: str, indices: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The infected model's ``layer`` outputs of the training samples ``indices``, without augmentation."""
    batches = progress((x for _, x, _ in poisoned.batches(batch_size, shuffle=False, indices=indices)),
                       "SPECTRE representations", n_batches(len(indices), batch_size))
    return layer_representations(reference, layer, batches)


def spectre_flags(reps: torch.Tensor, indices: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (of ``indices``) SPECTRE flags on the representations ``reps``; rank 0's under torchrun."""
    res = spectre_filter(reps.double(), fraction)
    return dist.broadcast(indices[res.flagged_mask.cpu()].sort().values)


def removed_record(removed: torch.Tensor, considered: int, truth: torch.Tensor | None) -> dict:
    """What a filter removed; precision and the poison count are None without a ground truth."""
    return {"considered": considered, "removed": len(removed),
            "precision": poison_share(removed, truth) if len(removed) else None,
            "removed_poison": poison_count(removed, truth)}


def filter_class(reference, poisoned, cls: int, settings: FilterSettings, logits: torch.Tensor | None, seed: int,
                 batch_size: int, spectre: bool = True, split: bool = True, reps: torch.Tensor | None = None,
                 exclude: torch.Tensor | None = None) -> dict:
    """SPECTRE and (if ``settings.class_split``) the split on the training samples labelled ``cls``: their flagged
    indices, the records and the representations (``reps``: already read ones, for the second filter of a class).
    ``spectre``/``split`` False skip that filter (the decision needs only the splits). SPECTRE leaves out
    ``exclude`` (what the split removed): with the poisons gone from the class it removes its share from what
    is left, not from the genuine images that were the minority beside them."""
    layer, split = settings.spectre_layer, split and bool(settings.class_split)
    truth = poisoned.truth  # None: no ground truth (data of other code without --poison_indices)
    idx = torch.nonzero(poisoned.train_labels.cpu() == cls).flatten()
    out = {"class": cls, "indices": idx, "spectre": torch.zeros(0, dtype=torch.long),
           "split": torch.zeros(0, dtype=torch.long), "split_applied": False}
    if len(idx) < 2:
        out["record"] = {"class": cls, "considered": len(idx)}
        return out
    if reps is None:
        reps = class_representations(reference, poisoned, layer, idx, batch_size)  # read once for both filters
    out["reps"] = reps
    record = {"class": cls}
    if spectre:
        keep = ~torch.isin(idx, exclude) if exclude is not None else torch.ones(len(idx), dtype=torch.bool)
        if int(keep.sum()) >= 2:
            out["spectre"] = spectre_flags(reps[keep], idx[keep], settings.spectre_remove)
        record["spectre"] = removed_record(out["spectre"], int(keep.sum()), truth)
    if split:
        res = _split(reps, logits[idx], cls, settings, seed)
        candidate = idx[dist.broadcast(res.candidate_mask.to(torch.uint8)).bool()]  # torchrun: rank 0's cluster
        flagged = candidate if res.applied else candidate[:0]
        out["split"], out["split_applied"] = flagged, bool(res.applied)
        if res.flagged_cluster >= 0:  # for strong_splits: the candidate against the other classes
            out["candidate"], out["candidate_spread"], out["widest_spread"] = candidate, res.candidate_spread, max(
                res.spread)
        record["split"] = {**removed_record(flagged, len(idx), truth), "applied": res.applied,
                           "cluster_sizes": list(res.sizes), "cluster_confidence": [round(c, 4) for c in res.confidence],
                           "cluster_spread": [round(c, 2) for c in res.spread],
                           "spread_ratio": None if res.flagged_cluster < 0 else round(
                               res.candidate_spread / max(res.spread[1 - res.flagged_cluster], 1e-9), 3),
                           "suspicious_cluster": res.flagged_cluster, "separation": round(res.separation, 3),
                           "level": res.level}
    out["record"] = record
    return out


def _split(reps: torch.Tensor, logits: torch.Tensor, cls: int, settings: FilterSettings, seed: int):
    """``split_target_class`` with the settings' check, on its own seeded generator (a split that is not applied
    leaves the run as without it)."""
    return split_target_class(reps, logits, cls, min_spread=settings.class_split_spread,
                              confidence_tie=settings.class_split_tie, generator=torch.Generator().manual_seed(seed))


def decide_target(given: int | None, vote: dict | None, split_classes: list[int], num_classes: int,
                  confirm_share: float = CLASS_SPLIT_CONFIRM, strong_classes: list[int] = ()) -> dict:
    """Whether to rely on one target class, and which: the given class or the vote's winner, if confirmed.

    A class is confirmed by the split (its poison cluster found there, while the split found clusters in at most
    ``confirm_share`` of the classes: all2all poisons leave one in every class, and a few clean classes split too,
    4-5 of 43 on the 43-class set) or by a decisive vote for it. The given class is tried first; a given class the
    evidence does not confirm is replaced by the vote's winner if that one is confirmed (and the record says so),
    else the defense goes class-agnostic. A weak vote's winner is no candidate: its lead is noise, and a split
    cluster there is chance (tiny all2all models split in 2-3 of 10 classes, the vote's winner among them in 2
    of 6 measured).

    ``strong_classes`` (``class_split.strong_splits``: a split cluster spreading over far more classes than any
    class's clusters typically do) confirm their class however many classes split, and the one strong class is a
    candidate after the given class and the vote's winner (a 43-class patch model: 11 of 43 classes split, the
    vote not decisive and its winner 23, the one strong class 0, the target); beside one strong class an ordinary
    split confirms nothing (it is one of the clean classes that split)."""
    winner = vote["estimate"] if vote else None
    weak = bool(vote and vote.get("weak"))
    strong = list(strong_classes)  # several would be several targets: then they are ordinary split classes
    candidates = [c for c in (given, None if weak else winner, strong[0] if len(strong) == 1 else None)
                  if c is not None]
    split_counts = len(split_classes) <= max(1, confirm_share * num_classes)
    for c in dict.fromkeys(candidates):
        reasons = []
        if strong == [c]:
            reasons.append("the class split found a cluster of images of far more other classes labelled as it than "
                           "a class's clusters spread over elsewhere")
        elif c in split_classes and split_counts and len(strong) != 1:  # one strong class outweighs other splits
            reasons.append("the class split found a cluster of images of many other classes labelled as it")
        if c == winner and decisive(vote):
            reasons.append(f"the PGD vote for it is decisive ({vote['vote_share']:.1%} of the votes, at least "
                           f"{DECISIVE_LEAD:g}x the runner-up's)")
        if reasons:
            why = "; ".join(reasons)
            if given is not None and c != given:
                why = f"the given target {given} is not confirmed by the evidence; class {c}: {why}"
            return {"mode": "target", "target": c, "why": why, "given": given, "vote_winner": winner,
                    "vote_decisive": decisive(vote), "split_classes": split_classes, "strong_classes": strong}
    why = ("no class is confirmed as a single backdoor target (the vote is "
           + (f"weak, its winner {winner} no candidate" if weak and winner is not None else "not decisive")
           + (f", the given target {given} shows no poison cluster" if given is not None else "")
           + (f", the split found clusters in classes {split_classes}"
              + ("" if split_counts else f", more than {confirm_share:.0%} of the {num_classes} classes: no single target")
              if split_classes else ", the split found no cluster")
           + "): the defense works on every class")
    return {"mode": "agnostic", "target": None, "why": why, "given": given, "vote_winner": winner,
            "vote_decisive": decisive(vote), "split_classes": split_classes, "strong_classes": strong}


def apply_strong_splits(per_class: list[dict], factor: float, truth: torch.Tensor | None) -> tuple[list[int], float]:
    """Apply the split of every class ``class_split.strong_splits`` finds among ``per_class`` (``filter_class``
    outputs), whatever its two clusters' spreads (2-means may have cut the poisons in two), and mark it ``strong``
    in its record. Returns those classes and the median spread they were measured against."""
    measured = [f for f in per_class if "candidate" in f]
    strong, baseline = strong_splits({f["class"]: f["candidate_spread"] for f in measured},
                                     {f["class"]: f["widest_spread"] for f in measured}, factor)
    for f in (f for f in measured if f["class"] in strong):
        f["split"], f["split_applied"] = f["candidate"], True
        f["record"]["split"].update(removed_record(f["candidate"], len(f["indices"]), truth), applied=True,
                                    strong=True)
    return strong, baseline


def peel_strong(f: dict, logits: torch.Tensor, settings: FilterSettings, baseline: float, seed: int,
                truth: torch.Tensor | None) -> None:
    """Split once more what the split of the target class kept (``f``: its ``filter_class`` output), and remove a
    sub-cluster that passes the split's check and is strong against the other classes (``class_split_strong``
    times ``baseline``, the median of ``strong_splits``): where 2-means cut the poisons in two, the half beside the
    genuine images is left. Measured: a 43-class blend model kept 269 images, 115 of them poisons, the kept part's
    split found them with 70 genuine ones (spread 9.8 against the median's 3.1); on the 23 other infected models
    of the quick grids no kept part holds a strong sub-cluster. Recorded as ``split.peeled``; the sub-cluster
    leaves the pool, but the poison set is drawn from the split's own cluster (``split_stages``): PBE
    drew its from both and unlearned 67 of its 70 genuine target images (target class 20.4 %, infected 85.7)."""
    factor, rec = settings.class_split_strong, f["record"]["split"]
    idx = f["indices"]
    kept = ~torch.isin(idx, f["split"])
    if not f["split_applied"] or factor <= 0 or math.isnan(baseline) or int(kept.sum()) < 4:
        return
    res = _split(f["reps"][kept], logits[idx[kept]], f["class"], settings, seed)
    strong = res.applied and res.candidate_spread >= factor * baseline
    mask = res.flagged_mask if strong else torch.zeros_like(res.flagged_mask)
    more = idx[kept][dist.broadcast(mask.to(torch.uint8)).bool()]  # every rank broadcasts: rank 0's cluster
    strong = len(more) > 0
    rec["peeled"] = {**removed_record(more, int(kept.sum()), truth), "cluster_sizes": list(res.sizes),
                     "cluster_spread": [round(c, 2) for c in res.spread], "applied": bool(strong)}
    if strong:  # filtered out of the pool, but no poison set is drawn from it (it holds genuine images too)
        f["split"], f["peeled"] = torch.cat([f["split"], more]).sort().values, more
        rec.update(removed_record(f["split"], len(idx), truth))


def split_stages(chosen: list[dict]) -> dict:
    """What the split removed from the ``chosen`` classes, as stages (for suspects.csv and the poison set):
    ``class_split``, its own clusters, the poison set's candidates; ``class_split_peeled`` (if any), the strong
    sub-clusters ``peel_strong`` removed, which left the pool but hold genuine images too."""
    none = torch.zeros(0, dtype=torch.long)
    split = torch.cat([none] + [f["split"] for f in chosen]).unique()
    peeled = torch.cat([none] + [f["peeled"] for f in chosen if "peeled" in f]).unique()
    return {"class_split": split[~torch.isin(split, peeled)], **({"class_split_peeled": peeled} if len(peeled) else {})}


@dataclass
class FilterOutcome:
    removed: torch.Tensor  # the samples the filter removed (sorted indices)
    pool: torch.Tensor  # the rest
    record: dict  # for summary.json: what was removed, with what precision, per class; the pool's purity
    stages: dict  # filter name -> what it removed (for suspects.csv)


def filter_classes_and_decide(reference, poisoned, filt: FilterSettings, target: dict, seed: int, batch_size: int,
                              channels_last: bool, logits: torch.Tensor | None = None) -> FilterOutcome:
    """SPECTRE and the class split on every class, then the decision (``decide_target``, written into the
    ``target`` record as ``used`` and ``decision``): with a confirmed target only that class's flags are removed
    (the paper's target-class filtering, plus the split), without one every class's SPECTRE flags (the split's
    clusters are then the evidence against a single target, not poisons). ``logits``: the reference's
    ``all_logits`` if the caller has them (the split needs them; computed here otherwise)."""
    with stage("filtering"):
        return _filter_classes_and_decide(reference, poisoned, filt, target, seed, batch_size, channels_last, logits)


def _filter_classes_and_decide(reference, poisoned, filt, target, seed, batch_size, channels_last,
                               logits) -> FilterOutcome:
    n = len(poisoned)
    truth = poisoned.truth  # None: no ground truth (data of other code without --poison_indices)
    classes = range(poisoned.data.num_classes)
    none = torch.zeros(0, dtype=torch.long)
    per_class = [{"class": c, "indices": torch.nonzero(poisoned.train_labels.cpu() == c).flatten(), "spectre": none,
                  "split": none, "split_applied": False, "record": {"class": c}} for c in classes]
    if filt.class_split:  # first the split on every class: it is evidence for the decision
        if logits is None:
            logits = all_logits(reference, poisoned, batch_size, channels_last)
        per_class = [filter_class(reference, poisoned, c, filt, logits, seed, batch_size, spectre=False)
                     for c in classes]
    strong, baseline = apply_strong_splits(per_class, filt.class_split_strong, truth)
    split_classes = [f["class"] for f in per_class if f["split_applied"]]
    decision = decide_target(target.get("given"), target, split_classes, len(classes), filt.class_split_confirm,
                             strong)
    decision["split_baseline_spread"] = None if math.isnan(baseline) else round(baseline, 3)
    target.update(used=decision["target"], decision=decision)
    if decision["target"] is not None and filt.class_split:
        peel_strong(per_class[decision["target"]], logits, filt, baseline, seed, truth)
    if decision["target"] is None:  # no confirmed target: the split's clusters were evidence, not poisons
        for f in per_class:  # (WaNet all2all: clusters in 4 classes, 8 % poisoned; removing them cost PBE 22 points)
            f["split"] = none
    for c in (classes if decision["target"] is None else [decision["target"]]):  # then SPECTRE where it is used
        f = filter_class(reference, poisoned, c, filt, None, seed, batch_size, split=False,
                         reps=per_class[c].pop("reps", None), exclude=per_class[c]["split"])
        per_class[c]["spectre"] = f["spectre"]
        per_class[c]["record"].update(f["record"])
    print(f"decision: {decision['mode']}" + (f" (target {decision['target']})" if decision["target"] is not None
                                              else "") + f": {decision['why']}", flush=True)
    chosen = per_class if decision["target"] is None else [per_class[decision["target"]]]
    spectre = torch.cat([f["spectre"] for f in chosen]).unique()
    considered = sum(len(f["indices"]) for f in chosen)
    seen = sum(f["record"].get("spectre", {}).get("considered", len(f["indices"])) for f in chosen)
    record = {**removed_record(spectre, seen, truth), "recall": detection_stats(spectre, truth)["recall"]}
    where = "every class" if decision["target"] is None else f"class {decision['target']}"
    print(f"initial SPECTRE: removed {len(spectre)} of {seen} samples of {where}"
          f"{' the split kept' if seen < considered else ''} ({shown(record['removed_poison'], 'd')} truly poisoned)",
          flush=True)
    removed = spectre
    if filt.class_split:
        split_parts = split_stages(chosen)
        split = torch.cat(list(split_parts.values())).unique()  # the split's clusters and what the peel added
        if decision["target"] is not None:
            record["class_split"] = {**per_class[decision["target"]]["record"]["split"],
                                     "recall": detection_stats(split, truth)["recall"]}
            sp = record["class_split"]
            print(f"target-class split: clusters {sp['cluster_sizes']}, non-target confidence "
                  f"{sp['cluster_confidence']}, spread over {sp['cluster_spread']} classes; " + (
                      f"removed {'a second-level sub-' if sp['level'] == 2 else ''}cluster {sp['suspicious_cluster']}"
                      f"{' (strong: against the other classes)' if sp.get('strong') else ''}: "
                      f"{sp['removed']} samples "
                      + (f"with {sp['peeled']['removed']} of the {sp['peeled']['considered']} it kept (a strong "
                         "sub-cluster) " if sp.get("peeled", {}).get("applied") else "")
                      + f"({shown(sp['removed_poison'], 'd')} truly poisoned)" if sp["applied"]
                      else "not applied (the more confident cluster does not spread over more classes)"), flush=True)
        else:
            record["class_split"] = {**removed_record(split, considered, truth), "applied_in": [],
                                     "clusters_in": split_classes, "recall": detection_stats(split, truth)["recall"],
                                     "why": "no confirmed target: the clusters are evidence against a single target, "
                                            "not poisons (SPECTRE filters every class whole)"}
        removed = torch.unique(torch.cat([removed, split]))
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    pool = torch.nonzero(keep).flatten()
    record = {**record, "filtered": len(removed), "filtered_precision": poison_share(removed, truth),
              "filtered_recall": detection_stats(removed, truth)["recall"],
              "pool_size": len(pool), "pool_poison_share": poison_share(pool, truth),
              "classes": [f["record"] for f in per_class]}
    print(f"pool {len(pool)} samples, {shown(record['pool_poison_share'], '.3%')} truly poisoned", flush=True)
    stages = {"spectre": spectre, **(split_parts if filt.class_split else {})}
    return FilterOutcome(removed, pool, record, stages)
