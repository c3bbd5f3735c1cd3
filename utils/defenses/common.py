"""Pieces every defense shares: load the infected run, adversarial fine-tuning, logits, consistency scores.

``load_infected`` rebuilds everything a checkpoint describes (model, trigger, the exact poisoned
training set, test split) so a defense needs no flag besides ``--model_path``. ``finetune_epoch``
is ``train_epoch`` with our one PGD plugged in for the first ``adv_batches`` batches.
``consistency_scores`` is PBE's logit cosine similarity (PUD adds the arg-max disagreement penalty).
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dataloader import backdoor_from_checkpoint, load_data, make_augment, poisoned_train_from_checkpoint
from models import model_from_checkpoint
from utils.run import distributed as dist, interrupt
from utils.adversarial import PGD
from utils.run.checkpoint import load_checkpoint
from utils.run.errors import UserError
from utils.data.poison import BackdoorSpec, PoisonedTrainSet
from utils.run.runtime import prepare_model
from utils.training import train_epoch


@dataclass
class InfectedRun:
    ck: dict
    model: torch.nn.Module
    reference: torch.nn.Module  # frozen copy of the infected model
    backdoor: BackdoorSpec
    poisoned: PoisonedTrainSet  # the training data as the attacker left it
    test: object
    augment: object
    attack_args: object  # the attack's args namespace (crop, rotation, ...)


def load_infected(args, device) -> InfectedRun:
    """Load ``args.model_path`` and rebuild its data; refuse a checkpoint of another dataset/arch than asked."""
    ck = load_checkpoint(args.model_path)
    for key in ("dataset", "arch"):
        asked = getattr(args, key, None)
        if asked is not None and asked != ck[key]:
            raise UserError(f"--{key} {asked} does not match the checkpoint ('{args.model_path}' is a {ck[key]} model); "
                            f"drop --{key} or pass the matching checkpoint")
    attack = argparse.Namespace(**ck["args"])
    attack.data_root = args.data_root
    attack.download = getattr(args, "download", "auto")
    attack.num_workers = args.num_workers
    attack.test_subset = args.test_subset if args.test_subset is not None else attack.test_subset
    train, test, _ = load_data(attack, device, train_indices=ck.get("train_indices"))
    pidx = ck.get("poisoned_indices")
    if pidx is not None and len(pidx) and int(pidx.max()) >= len(train):
        raise UserError(f"the training data under '{args.data_root}' has {len(train)} images, fewer than the checkpoint's "
                        "poisoned indices need; point --data_root at the data the model was trained on")
    backdoor = backdoor_from_checkpoint(ck)
    poisoned = poisoned_train_from_checkpoint(ck, train, backdoor)
    model = prepare_model(model_from_checkpoint(ck, device), args, device)  # channels_last, bf16, compile
    reference = copy.deepcopy(model).eval()  # a copy runs eagerly even when the model is compiled
    for p in reference.parameters():
        p.requires_grad_(False)
    return InfectedRun(ck, model, reference, backdoor, poisoned, test, make_augment(attack), attack)


def clean_indices(poisoned: PoisonedTrainSet) -> torch.Tensor:
    """Indices of training images the attack left untouched (not poisoned, not WaNet noise-mode)."""
    bad = (poisoned.is_poison | poisoned.is_noise).cpu()
    return torch.nonzero(~bad).flatten()


def finetune_epoch(model, optimizer, batches, attack: PGD | None, adv_batches: int | None, augment=None,
                   generator=None, channels_last=False, clean_weight: float = 0.0, desc="finetune", total=None,
                   stage: str = "finetune", epoch: int | None = None) -> dict:
    """One fine-tuning epoch; batches with index < ``adv_batches`` (None = all) are replaced by PGD examples.

    Under torchrun ``model`` is the DDP wrapper and ``batches`` this rank's share; PGD attacks the plain model.
    """
    plain = dist.unwrap(model)
    transform = None
    if attack is not None and (adv_batches is None or adv_batches > 0):
        def transform(i, x, y):
            if adv_batches is not None and i >= adv_batches:
                return x
            return attack(plain, x, y, generator=generator)
    return train_epoch(model, optimizer, batches, augment, transform=transform, generator=generator,
                       channels_last=channels_last, clean_weight=clean_weight, desc=desc, total=total, stage=stage,
                       epoch=epoch)


@torch.no_grad()
def all_logits(model, poisoned: PoisonedTrainSet, batch_size: int = 512, channels_last=False) -> torch.Tensor:
    """Logits (on CPU) of every training sample as the model was trained on it, in index order, no augmentation.

    Under torchrun each rank computes every N-th batch (rank 0's BatchNorm statistics) and the zero-filled parts are
    summed, so every rank holds the same logits, equal to one process's, and all ranks score and select alike."""
    was = model.training
    model.eval()
    dist.sync_buffers(model)
    out = torch.zeros(len(poisoned), poisoned.data.num_classes)
    try:
        with torch.no_grad():
            for b, (idx, x, _) in enumerate(poisoned.batches(batch_size, shuffle=False)):
                if not dist.owns_batch(b):
                    continue
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                out[idx.cpu()] = model(x).float().cpu()
    finally:
        model.train(was)
    return dist.all_reduce_sum(out)


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


def estimate_target(s) -> dict:
    """Most frequent prediction of the infected model on untargeted PGD examples of random clean training images.

    ``s`` is a ``DefenseSession`` (args ``target_images``, ``target_eps``, ``eval_bs``; the infected run; the generator).
    """
    args, inf = s.args, s.inf
    data = inf.poisoned.data
    n = min(args.target_images, len(data.y))
    idx = torch.randperm(len(data.y), generator=s.gen)[:n].sort().values
    attack = PGD(eps=args.target_eps, alpha=args.target_eps / 4, steps=10, random_start=False)  # draws nothing
    counts = torch.zeros(inf.backdoor.num_classes, dtype=torch.long)
    for b, (_, x, y) in enumerate(data.batches(args.eval_bs, shuffle=False, indices=idx)):
        interrupt.check(f"the target estimate, batch {b}")
        if not dist.owns_batch(b):  # torchrun: every N-th batch per rank, the votes summed
            continue
        if s.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x_adv = attack(inf.reference, x, y, generator=s.gen)
        with torch.no_grad():
            counts += torch.bincount(inf.reference(x_adv).argmax(1).cpu(), minlength=len(counts))
    return {**vote_result(dist.all_reduce_sum(counts)), "images": n, "pgd": attack.settings()}


def weak_vote_share(num_classes: int) -> float:
    """The winning share under which a vote is weak: twice the uniform 1/K, at most half-way from 1/K to 1 (K = 2)."""
    return min(2.0 / num_classes, (1.0 + 1.0 / num_classes) / 2)


def vote_result(counts: torch.Tensor) -> dict:
    """The estimate from per-class vote counts, its share, all counts, and ``weak`` (``weak_vote_share``).

    Measured: the target took 34-67 % of the votes on the synthetic cnn models (K = 10); on a PreActResNet18 with a
    3x3 patch the PGD examples spread (class 9 won with 17.6 %, the target had 10.4 %), which the flag reports.
    """
    est = int(counts.argmax())
    share = float(counts[est]) / max(int(counts.sum()), 1)
    return {"estimate": est, "vote_share": share, "votes": counts.tolist(), "weak": share < weak_vote_share(len(counts))}


def choose_target(s) -> dict:
    """The backdoor target class: ``--target_label`` if given, else estimated by PGD (``estimate_target``)."""
    args, inf = s.args, s.inf
    if args.target_label == "auto":
        target = estimate_target(s)
    else:
        target = {"estimate": None, "vote_share": None, "given": int(args.target_label)}
    t = target["estimate"] if args.target_label == "auto" else int(args.target_label)
    target["used"] = t
    target["true"] = inf.backdoor.target_label if inf.ck["attack_mode"] == "all2one" else None
    print(f"target class {t}" + (f" (estimated, vote share {target['vote_share']:.1%})" if args.target_label == "auto" else ""),
          flush=True)
    if target.get("weak"):
        bar = weak_vote_share(len(target["votes"]))
        print(f"warning: the target estimate is weak: PGD examples spread over the classes (votes {target['votes']}, "
              f"the winner's {target['vote_share']:.1%} is under {bar:.1%}); the backdoor may not be all2one or PGD "
              "may not reach it (a small patch); pass --target_label if the target is known", flush=True)
    return target


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
        raise UserError("--poison_candidates filtered needs samples removed by the initial filtering, and it removed none")
    return POISON_CANDIDATES[mode](labels, target, filtered)


# Where PBE's round-0 random extra set is drawn from, given the training labels and the (estimated) target.
INIT_POOLS = {
    "non_target": lambda labels, target: torch.nonzero(labels != target).flatten(),  # no all2one poison can be in it
    "all": lambda labels, target: torch.arange(len(labels)),  # the paper code
}
