"""AFT: repair an infected model by fine-tuning it on a small clean extra set, the first epochs on PGD examples.

The clean extra set is ``--extra_data`` (a set the defender holds) or a seeded ``--extra_ratio`` share of the
training set's clean samples (the research simulation; it needs the ground truth of which those are).
``FinetuneSettings`` is the fine-tuning (learning rate and the PGD that makes its adversarial examples);
PBE fine-tunes with the same settings. ``--adv_window`` (this toolkit's option; 0, the default, is the
paper's whole-image PGD) confines each example to one random k x k window: with ``--adv_eps 1`` a
patch-shaped example, which is what reaches a BadNets patch trigger. ``--reverse_every N`` (this toolkit's
option, 0 off) stamps a share of each clean-epoch batch with a trigger reversed toward the class a PGD vote on
the extra set picks (``utils.defenses.trigger_reversal``), re-reversed on the fine-tuned model every N clean
epochs, so that the clean epochs do not teach an all2one target class back through the trigger's features. It
removes the blend rebound on the quick grid but, where no stamp draws the trigger (WaNet), the stamp is the target
class's own look and the class does not come back (docs/ablations.md): an experiment, not the grid's setting.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.adversarial import NORMS, PGD
from utils.defenses.selection import clean_indices
from utils.defenses.target import TargetSettings, batch_votes, vote_result
from utils.defenses.trigger_reversal import ReversedTrigger, StampShare, reverse_trigger
from utils.defenses.window_search import rank_windows
from utils.run import distributed as dist
from utils.run.errors import UserError
from utils.run.stagetimer import stage
from utils.settings import Settings, fraction, opt, require
from utils.training import finetune_epoch, make_optimizer


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    GROUP = "fine-tuning and its PGD examples (AFT and PBE)"
    ft_lr: float = opt(0.001, "fine-tuning SGD learning rate", type=fraction)
    adv_norm: str = opt("linf", "PGD norm", choices=NORMS)
    adv_eps: float = opt(6 / 255, "PGD radius", type=fraction)
    adv_alpha: float = opt(1.2 / 255, "PGD step", type=fraction)
    adv_steps: int = opt(7, "PGD iterations", type=int)
    adv_random_start: bool = opt(False, "start PGD from a random point (the paper code starts at the image)",
                                 action="store_true")
    adv_window: int = opt(0, "confine each example to one random KxK pixel window (0: the whole image); with "
                             "--adv_eps 1 a patch-shaped example", type=int)
    adv_eps_outside: float = opt(0.0, "with --adv_window (linf): the budget outside the window, e.g. 6/255 for a "
                                      "patch-shaped and an ordinary example in one", type=fraction)
    adv_restarts: int = opt(1, "PGD runs per example, keeping the worst (with --adv_window each run draws its own "
                               "window: 4 reach a BadNets patch more often, docs/ablations.md)", type=int)
    clean_weight: float = opt(0.0, "mix w * CE(clean batch) into adversarial batches (the paper: 0)", type=fraction)

    def check(self) -> None:
        require(self.ft_lr > 0, f"--ft_lr must be positive, got {self.ft_lr}")
        if self.adv_norm == "linf":
            require(0 <= self.adv_eps <= 1, f"--adv_eps must be in [0, 1] (pixel units, e.g. 6/255), got {self.adv_eps}")
        else:
            require(self.adv_eps >= 0, f"--adv_eps must be >= 0, got {self.adv_eps}")
        require(self.adv_alpha >= 0, f"--adv_alpha must be >= 0, got {self.adv_alpha}")
        require(self.adv_steps >= 0, f"--adv_steps must be >= 0, got {self.adv_steps}")
        require(self.adv_restarts >= 1, f"--adv_restarts must be >= 1, got {self.adv_restarts}")
        if self.adv_eps_outside != 0:
            require(self.adv_window > 0 and self.adv_norm == "linf",
                    "--adv_eps_outside is the budget outside --adv_window: it needs --adv_window > 0 and --adv_norm linf")
            require(0 < self.adv_eps_outside <= self.adv_eps,
                    f"--adv_eps_outside must be in (0, --adv_eps {self.adv_eps}], got {self.adv_eps_outside}")
        require(0 <= self.clean_weight < 1, f"--clean_weight must be in [0, 1), got {self.clean_weight}")

    def check_for(self, input_shape) -> None:
        size = min(input_shape[1:])
        require(0 <= self.adv_window <= size,
                f"--adv_window must be between 0 (whole image) and the image size {size}, got {self.adv_window}")

    def pgd(self, eps: float | None = None, window_at: torch.Tensor | None = None) -> PGD:
        """The fine-tuning PGD; ``eps`` replaces ``--adv_eps`` and scales the step (and ``--adv_eps_outside``) with
        it (PBE's per-round radius); ``window_at``: window positions half the windows go to (AFT's search)."""
        scale = 1.0 if eps is None or self.adv_eps == 0 else eps / self.adv_eps
        return PGD(eps=self.adv_eps if eps is None else eps, alpha=self.adv_alpha * scale, steps=self.adv_steps,
                   norm=self.adv_norm, random_start=self.adv_random_start, restarts=self.adv_restarts,
                   window=self.adv_window, eps_outside=self.adv_eps_outside * scale, window_at=window_at)


@dataclass(frozen=True)
class AFTSettings(Settings):
    GROUP = "AFT (the default of pbe_main.py: a clean extra set)"
    extra_ratio: float = opt(0.05, "size of the clean extra set, as a fraction of the training set (drawn from its "
                                   "clean samples: known for a model.pt of train_blend.py or with --poison_indices)",
                             type=fraction)
    extra_data: str | None = opt(None, "a clean extra set you hold instead (the model-repair setting): an image "
                                       "folder or a .pt/.npz tensor file, used whole", metavar="PATH",
                                 shown="--extra_ratio of the training set")
    aft_epochs: int = opt(20, "fine-tuning epochs", type=int)
    adv_epochs: int = opt(3, "how many of the first epochs fine-tune on PGD examples", type=int)
    window_search: int = opt(0, "with --adv_window: put half the windows at the N positions where one universal "
                                "patch fools the infected model most on 32 extra-set images (0: off; "
                                "docs/ablations.md)", type=int)
    reverse_every: int = opt(0, "stamp a share of each clean-epoch batch with a trigger reversed toward the class "
                                "untargeted PGD examples of the extra set vote for (labels kept), reversed on the "
                                "infected model and again every N clean epochs (0: off; skipped when the vote is "
                                "weak, e.g. all2all; docs/ablations.md)", type=int)
    reverse_share: float = opt(0.2, "with --reverse_every: the share of each clean-epoch batch stamped",
                               type=fraction)
    reverse_steps: int = opt(300, "with --reverse_every: Adam steps of each reversal (on up to 512 extra-set "
                                  "images at once)", type=int)

    def check(self) -> None:
        require(0 < self.extra_ratio <= 1, f"--extra_ratio must be in (0, 1], got {self.extra_ratio}")
        require(self.aft_epochs > 0, f"--aft_epochs must be positive, got {self.aft_epochs}")
        require(0 <= self.adv_epochs <= self.aft_epochs,
                f"--adv_epochs {self.adv_epochs} must be between 0 and --aft_epochs {self.aft_epochs}")
        require(self.window_search >= 0, f"--window_search must be >= 0, got {self.window_search}")
        require(self.reverse_every >= 0, f"--reverse_every must be >= 0, got {self.reverse_every}")
        require(0 < self.reverse_share <= 1, f"--reverse_share must be in (0, 1], got {self.reverse_share}")
        require(self.reverse_steps > 0, f"--reverse_steps must be positive, got {self.reverse_steps}")


@dataclass
class AFTState:
    """AFT's loop cursor: the last finished epoch, the clean extra set, the searched window positions, and the
    reversed trigger (the vote, the stamp in use, every reversal's record)."""

    epoch: int = 0
    extra: torch.Tensor | None = None
    windows: torch.Tensor | None = None  # (N, 3) float: the top-ranked (top, left, loss), kept for a resume
    vote: dict | None = None
    trigger: dict | None = None  # ReversedTrigger's fields, plain (state.pt holds no custom class)
    reversals: list | None = None


WINDOW_SEARCH_IMAGES = 32


def search_windows(model, data, indices: torch.Tensor, k: int, top: int, gen: torch.Generator) -> torch.Tensor:
    """(top, 3): the ``top`` window positions of ``rank_windows`` on 32 seeded extra-set images, with their losses."""
    pick = indices[torch.randperm(len(indices), generator=gen)[:WINDOW_SEARCH_IMAGES]]
    _, x, y = next(iter(data.batches(len(pick), indices=pick)))
    pos, loss = rank_windows(model, x, y, k=k, generator=gen)
    return torch.cat([pos[:top].float(), loss[:top, None]], 1)


def extra_set_vote(model, data, indices: torch.Tensor, batch_size: int, num_classes: int) -> dict:
    """The target vote of ``utils.defenses.target`` (its PGD, untargeted) on the clean extra set: the class the
    examples of clean images land in most is an all2one backdoor's shortcut; ``weak`` as there."""
    attack = TargetSettings().pgd()
    counts = sum(batch_votes(model, attack, x, y, num_classes) for _, x, y in data.batches(batch_size, indices=indices))
    return {**vote_result(counts), "images": len(indices), "pgd": attack.settings()}


REVERSE_IMAGES = 512  # at most this many extra-set images (one batch) in a reversal


def reverse_on_extra(model, data, indices: torch.Tensor, target: int, epoch: int, steps: int) -> tuple[dict, dict]:
    """``reverse_trigger`` on the first ``REVERSE_IMAGES`` extra-set images of other classes than ``target`` (the
    extra set is a seeded draw): (the stamp as plain fields, its record with the epoch it was made after; 0: the
    infected model)."""
    _, x, y = next(iter(data.batches(len(indices), indices=indices)))
    trig = reverse_trigger(model, x[y != target][:REVERSE_IMAGES], target, steps=steps)
    return vars(trig), {"epoch": epoch, **trig.record()}


def reversal_due(epoch: int, adv_epochs: int, every: int) -> bool:
    """Whether the stamp is reversed again before ``epoch``: every ``every`` clean epochs after the first one."""
    k = epoch - adv_epochs - 1
    return every > 0 and k > 0 and k % every == 0


def run_aft(s, aft: AFTSettings, ft: FinetuneSettings) -> dict:
    """AFT on the session ``s``: fine-tune on a seeded clean extra set, the first ``adv_epochs`` epochs on PGD examples."""
    inf, bs = s.inf, s.job.run.bs
    if inf.extra is not None:  # the defender's own clean set (--extra_data), whole
        data, n_extra = inf.extra, len(inf.extra)
        extra = torch.arange(n_extra)
    else:  # the model-repair simulation: a seeded share of the training set's clean samples
        clean = clean_indices(inf.poisoned, "AFT without --extra_data")
        n_extra = max(1, int(round(aft.extra_ratio * len(inf.poisoned))))
        if n_extra > len(clean):
            raise UserError(f"--extra_ratio asks for {n_extra} clean images but only {len(clean)} training images are "
                            "unpoisoned; lower --extra_ratio")
        extra = clean[torch.randperm(len(clean), generator=s.gen)[:n_extra]].sort().values
        data = inf.poisoned.data  # the images as stored: extra indices were never poisoned
    opt = make_optimizer(inf.model, ft.ft_lr)
    objects = {"model": inf.model, "opt": opt}
    with s.ctl:
        st = s.start(AFTState(extra=extra), **objects)
        if aft.window_search and st.windows is None:  # on the infected model, before any step (kept for a resume)
            with stage("window_search"):
                st.windows = search_windows(inf.model, data, st.extra, ft.adv_window, aft.window_search, s.gen)
            print(f"window search: the top {aft.window_search} (top, left, loss): "
                  f"{[(int(t), int(l), round(float(v), 2)) for t, l, v in st.windows]}", flush=True)
        if aft.reverse_every and st.vote is None:  # on the infected model, before any step; no random draws
            with stage("trigger_reversal"):
                st.vote, st.reversals = extra_set_vote(inf.model, data, st.extra, bs, inf.num_classes), []
                if not st.vote["weak"]:
                    st.trigger, rec = reverse_on_extra(inf.model, data, st.extra, st.vote["estimate"], 0,
                                                       aft.reverse_steps)
                    st.reversals.append(rec)
            print(f"trigger reversal: the PGD vote on the extra set: class {st.vote['estimate']} with "
                  f"{st.vote['vote_share']:.1%}" + (f"; reversed stamp {st.reversals[0]}" if st.trigger else
                                                   " (weak: no stamp, the clean epochs stay clean)"), flush=True)
        attack = ft.pgd(window_at=st.windows[:, :2].long() if st.windows is not None else None)
        for epoch in range(st.epoch + 1, aft.aft_epochs + 1):
            adv = epoch <= aft.adv_epochs
            if st.trigger is not None and reversal_due(epoch, aft.adv_epochs, aft.reverse_every):
                with stage("trigger_reversal"):
                    st.trigger, rec = reverse_on_extra(inf.model, data, st.extra, st.vote["estimate"], epoch - 1,
                                                       aft.reverse_steps)
                st.reversals.append(rec)
                print(f"trigger reversal after epoch {epoch - 1}: {rec}", flush=True)
            stamp = StampShare(ReversedTrigger(**st.trigger), aft.reverse_share) if st.trigger is not None else None
            stats = finetune_epoch(s.train_model, opt, dist.epoch_batches(data, bs, s.gen, indices=st.extra),
                                   attack if adv else stamp, None, inf.augment, s.gen, s.cl, ft.clean_weight,
                                   desc=f"aft {epoch}", stage="aft", epoch=epoch)
            rec = {"epoch": epoch, "adversarial": adv, **stats, **s.epoch_eval(epoch, aft.aft_epochs)}
            s.log(rec, f"aft epoch {epoch}/{aft.aft_epochs}{' (adv)' if adv else ''}")
            st.epoch = epoch
            s.save(f"aft epoch {epoch}", st, **objects)
        settings = {"extra_size": n_extra, "extra_ratio": aft.extra_ratio if inf.extra is None else None,
                    "extra_data": aft.extra_data, "aft_epochs": aft.aft_epochs,
                    "adv_epochs": aft.adv_epochs, "lr": ft.ft_lr, "pgd": attack.settings(),
                    "clean_weight": ft.clean_weight,
                    **({"trigger_reversal": {"every": aft.reverse_every, "share": aft.reverse_share,
                                             "steps": aft.reverse_steps, "vote": st.vote,
                                             "reversals": st.reversals}} if aft.reverse_every else {}),
                    **({"window_search": {"images": WINDOW_SEARCH_IMAGES, "top": aft.window_search,
                                          "found": st.windows.tolist()}} if st.windows is not None else {})}
        return s.finish(settings)
