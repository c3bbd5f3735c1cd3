"""The backdoor's target class: given, or estimated as the most frequent class of untargeted PGD examples.

An all2one backdoor is a shortcut to its target class, so small untargeted perturbations of clean images
land there more often than in any other class. ``vote_result`` reports every class's votes and calls a
vote ``weak`` when the winner's share is under twice the uniform 1/K (at most half-way from 1/K to 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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
    target_images: int = opt(1000, "training images attacked for the target estimate", type=int)

    def check_for(self, num_classes: int, dataset: str) -> None:
        t = self.target_label
        require(t == "auto" or 0 <= t < num_classes,
                f"--target_label {t} is not a class of {dataset} (classes 0..{num_classes - 1}) nor 'auto'")
        require(0 <= self.target_eps <= 1, f"--target_eps must be in [0, 1] (pixel units), got {self.target_eps}")
        require(self.target_images > 0, f"--target_images must be positive, got {self.target_images}")

    def pgd(self) -> PGD:
        """The estimate's attack: 10 steps of eps/4 from the clean image (no random draws)."""
        return PGD(eps=self.target_eps, alpha=self.target_eps / 4, steps=10, random_start=False)


def weak_vote_share(num_classes: int) -> float:
    """The winning share under which a vote is weak: twice the uniform 1/K, at most half-way from 1/K to 1 (K = 2)."""
    return min(2.0 / num_classes, (1.0 + 1.0 / num_classes) / 2)


def vote_result(counts: torch.Tensor) -> dict:
    """The estimate from per-class vote counts, its share, all counts, and ``weak`` (``weak_vote_share``)."""
    est = int(counts.argmax())
    share = float(counts[est]) / max(int(counts.sum()), 1)
    return {"estimate": est, "vote_share": share, "votes": counts.tolist(), "weak": share < weak_vote_share(len(counts))}


def estimate_target(reference, data, settings: TargetSettings, num_classes: int, batch_size: int,
                    generator: torch.Generator, channels_last: bool) -> dict:
    """Most frequent prediction of ``reference`` (the infected model) on untargeted PGD examples of
    ``settings.target_images`` random training samples of ``data``: the training set as the defender has it
    (poisoned samples with their trigger and training label), not the clean images the attack started from."""
    with stage("target_estimate"):
        n = min(settings.target_images, len(data))
        idx = torch.randperm(len(data), generator=generator)[:n].sort().values
        attack = settings.pgd()
        counts = torch.zeros(num_classes, dtype=torch.long)
        batches = progress(data.batches(batch_size, shuffle=False, indices=idx), "target estimate (PGD)",
                           n_batches(n, batch_size))
        for b, (_, x, y) in enumerate(batches):
            interrupt.check(f"the target estimate, batch {b}")
            if not dist.owns_batch(b):  # torchrun: every N-th batch per rank, the votes summed
                continue
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x_adv = attack(reference, x, y, generator=generator)
            with torch.no_grad():
                counts += torch.bincount(reference(x_adv).argmax(1).cpu(), minlength=len(counts))
        return {**vote_result(dist.all_reduce_sum(counts)), "images": n, "pgd": attack.settings()}


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
