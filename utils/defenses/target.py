"""The backdoor's target class: given, or estimated as the most frequent class of untargeted PGD examples.

An all2one backdoor is a shortcut to its target class, so small untargeted perturbations of clean images
land there more often than in any other class. ``vote_result`` reports every class's votes and calls a
vote ``weak`` when the winner's share is under twice the uniform 1/K (at most half-way from 1/K to 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models import eval_mode
from utils.adversarial import PGD
from utils.run import distributed as dist, interrupt
from utils.run.progress import n_batches, progress
from utils.run.stagetimer import stage
from utils.settings import Settings, fraction, opt, require


def target_label_arg(text: str):
    """``auto`` or a class index."""
    import argparse

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'auto' or a class index") from None


@dataclass(frozen=True)
class TargetSettings(Settings):
    GROUP = "backdoor target"
    target_label: object = opt("auto", "the backdoor's target class, or auto: the most frequent class of untargeted "
                                       "PGD examples", type=target_label_arg, metavar="auto|N")
    target_eps: float = opt(8 / 255, "PGD radius of the target estimate", type=fraction)
    target_images: int = opt(1000, "training images attacked for the target estimate (at most)", type=int)
    target_error: float = opt(1e-3, "the target estimate stops once its vote is decisive with at most this "
                                    "probability of error (a sequential test, docs/speed.md); 0: attack all "
                                    "--target_images", type=fraction)
    target_look: int = opt(100, "images attacked between two looks of the sequential test", type=int)

    def check_for(self, num_classes: int, dataset: str) -> None:
        t = self.target_label
        require(t == "auto" or 0 <= t < num_classes,
                f"--target_label {t} is not a class of {dataset} (classes 0..{num_classes - 1}) nor 'auto'")
        require(0 <= self.target_eps <= 1, f"--target_eps must be in [0, 1] (pixel units), got {self.target_eps}")
        require(self.target_images > 0, f"--target_images must be positive, got {self.target_images}")
        require(0 <= self.target_error < 1, f"--target_error must be in [0, 1), got {self.target_error}")
        require(self.target_look > 0, f"--target_look must be positive, got {self.target_look}")

    def pgd(self) -> PGD:
        """The estimate's attack: 10 steps of eps/4 from the clean image (no random draws)."""
        return PGD(eps=self.target_eps, alpha=self.target_eps / 4, steps=10, random_start=False)


DECISIVE_LEAD = 2.0  # a decisive vote: the winner has at least this many times the runner-up's votes (and is not weak)


def weak_vote_share(num_classes: int) -> float:
    """The winning share under which a vote is weak: twice the uniform 1/K, at most half-way from 1/K to 1 (K = 2)."""
    return min(2.0 / num_classes, (1.0 + 1.0 / num_classes) / 2)


def vote_result(counts: torch.Tensor) -> dict:
    """The estimate from per-class vote counts, its share, all counts, and ``weak`` (``weak_vote_share``)."""
    est = int(counts.argmax())
    share = float(counts[est]) / max(int(counts.sum()), 1)
    return {"estimate": est, "vote_share": share, "votes": counts.tolist(), "weak": share < weak_vote_share(len(counts))}


def batch_votes(reference, attack: PGD, x, y, num_classes: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-class counts of ``reference``'s predictions on ``attack``'s untargeted examples of one batch (CPU)."""
    x_adv = attack(reference, x, y, generator=generator)
    with torch.no_grad(), eval_mode(reference):
        return torch.bincount(reference(x_adv).argmax(1).cpu(), minlength=num_classes)


def estimate_target(reference, data, settings: TargetSettings, num_classes: int, batch_size: int,
                    generator: torch.Generator, channels_last: bool) -> dict:
    """Most frequent prediction of ``reference`` (the infected model) on untargeted PGD examples of up to
    ``settings.target_images`` random training samples of ``data``: the training set as the defender has it
    (poisoned samples with their trigger and training label), not the clean images the attack started from.

    With ``--target_error`` > 0 the images are attacked in random order and the vote is looked at every
    ``--target_look`` images; it stops at the first look where ``settled`` finds it decisive at that error
    bound (``images`` is then what was attacked, ``images_planned`` the budget). 0 attacks every image in
    index order, in batches of ``batch_size`` (the estimate before the sequential test)."""
    with stage("target_estimate"):
        n = min(settings.target_images, len(data))
        idx = torch.randperm(len(data), generator=generator)[:n]
        sequential = settings.target_error > 0
        look = min(settings.target_look, n) if sequential else n
        bs = min(batch_size, look)
        if not sequential:
            idx = idx.sort().values
        looks = -(-n // look)
        attack = settings.pgd()

        def batches():  # (look, whether the batch ends its look, x, y)
            for k in range(looks):
                part = idx[k * look:(k + 1) * look]
                for j, (_, x, y) in enumerate(data.batches(bs, shuffle=False, indices=part)):
                    yield k, (j + 1) * bs >= len(part), x, y

        counts = torch.zeros(num_classes, dtype=torch.long)  # this rank's votes
        total, used = counts, 0
        for b, (k, look_ends, x, y) in enumerate(progress(batches(), "target estimate (PGD)", n_batches(n, bs))):
            interrupt.check(f"the target estimate, batch {b}")
            if dist.owns_batch(b):  # torchrun: every N-th batch per rank, the votes summed at each look
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                counts += batch_votes(reference, attack, x, y, len(counts), generator)
            if look_ends:
                used = min(n, (k + 1) * look)
                total = dist.all_reduce_sum(counts.clone())
                if sequential and k < looks - 1 and settled(total, looks, settings.target_error):
                    break
        record = {**vote_result(total), "images": used, "images_planned": n, "pgd": attack.settings()}
        if sequential:
            record["sequential"] = {"error": settings.target_error, "look": look, "looks": -(-used // look),
                                    "max_looks": looks, "stopped_early": used < n}
        return record


def _kl(p: float, q: float) -> float:
    """Relative entropy of Bernoulli(p) from Bernoulli(q), 0 < q < 1."""
    out = 0.0
    if p > 0:
        out += p * math.log(p / q)
    if p < 1:
        out += (1 - p) * math.log((1 - p) / (1 - q))
    return out


def _beats(hits: int, n: int, p0: float, delta: float) -> bool:
    """A one-sided Chernoff test: ``hits`` of ``n`` draws reject "the rate is at most ``p0``" at level ``delta``
    (P(rate seen >= hits/n | rate <= p0) <= exp(-n KL(hits/n || p0)); without replacement too, by Hoeffding)."""
    return n > 0 and hits / n > p0 and n * _kl(hits / n, p0) >= math.log(1 / delta)


def settled(counts: torch.Tensor, looks: int, error: float) -> bool:
    """Whether a partial vote is decisive (``decisive``) for the images not yet attacked too, at error ``error``.

    Decisive means the winner's share is not weak and every other class has at most 1/``DECISIVE_LEAD`` of
    the winner's votes. Each part is a Chernoff test: the winner's share against the weak bar, and for every
    other class c the winner's share of the votes that went to it or to c against L/(L+1) (L the lead).
    Bonferroni over the ``looks`` looks, the K possible winners and the K tests of each gives every test the
    level error / (looks K^2), so the chance that the estimate stops early on a vote whose full population
    (the training set) is not decisive for its winner, and so a winner that is not the population's clear
    mode, is at most ``error``. A partial vote that passes is itself decisive."""
    votes = counts.tolist()
    k = len(votes)
    w = max(range(k), key=votes.__getitem__)
    delta = error / (looks * k * k)
    a, n = votes[w], sum(votes)
    if not _beats(a, n, weak_vote_share(k), delta):
        return False
    lead = DECISIVE_LEAD / (DECISIVE_LEAD + 1)
    return all(_beats(a, a + votes[c], lead, delta) for c in range(k) if c != w)


def decisive(vote: dict | None) -> bool:
    """A vote whose winner is not weak and has at least ``DECISIVE_LEAD`` times the runner-up's votes."""
    if not vote or not vote.get("votes"):
        return False
    counts = sorted(vote["votes"], reverse=True)
    runner_up = counts[1] if len(counts) > 1 else 0
    return not vote["weak"] and counts[0] >= DECISIVE_LEAD * max(runner_up, 1)


def choose_target(settings: TargetSettings, true_target: int | None, estimate, always_vote: bool = False) -> dict:
    """The target class record: ``--target_label`` if given, else ``estimate()`` (``estimate_target``'s record).

    ``always_vote`` takes the vote also when a target is given (as evidence: PUD's decision weighs both).
    ``true`` is the attack's all2one target where it is known (``InfectedRun.true_target``), for the summary only."""
    given = None if settings.target_label == "auto" else int(settings.target_label)
    target = estimate() if given is None or always_vote else {"estimate": None, "vote_share": None}
    target["given"] = given
    t = given if given is not None else target["estimate"]
    target["used"] = t
    target["true"] = true_target
    vote = (f"the PGD vote: class {target['estimate']} with {target['vote_share']:.1%}"
            if target["estimate"] is not None else "")
    print(f"target class {t} " + (f"(given; {vote})" if given is not None and vote else "(given)" if given is not None
                                  else f"(estimated, vote share {target['vote_share']:.1%})"), flush=True)
    if given is None and target.get("weak"):
        bar = weak_vote_share(len(target["votes"]))
        print(f"warning: the target estimate is weak: PGD examples spread over the classes (votes {target['votes']}, "
              f"the winner's {target['vote_share']:.1%} is under {bar:.1%}); the backdoor may not be all2one or PGD "
              "may not reach it (a small patch); pass --target_label if the target is known", flush=True)
    return target
