"""AFT: repair an infected model by fine-tuning it on a small clean extra set, the first epochs on PGD examples.

The clean extra set is ``--extra_data`` (a set the defender holds) or a seeded ``--extra_ratio`` share of the
training set's clean samples (the research simulation; it needs the ground truth of which those are).
``FinetuneSettings`` is the fine-tuning (learning rate and the PGD that makes its adversarial examples);
PBE fine-tunes with the same settings. ``--adv_window`` (this toolkit's option; 0, the default, is the
paper's whole-image PGD) confines each example to one random k x k window: with ``--adv_eps 1`` a
patch-shaped example, which is what reaches a BadNets patch trigger.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.adversarial import NORMS, PGD
from utils.defenses.selection import clean_indices
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

    def check(self) -> None:
        require(0 < self.extra_ratio <= 1, f"--extra_ratio must be in (0, 1], got {self.extra_ratio}")
        require(self.aft_epochs > 0, f"--aft_epochs must be positive, got {self.aft_epochs}")
        require(0 <= self.adv_epochs <= self.aft_epochs,
                f"--adv_epochs {self.adv_epochs} must be between 0 and --aft_epochs {self.aft_epochs}")
        require(self.window_search >= 0, f"--window_search must be >= 0, got {self.window_search}")


@dataclass
class AFTState:
    """AFT's loop cursor: the last finished epoch, the clean extra set, and the searched window positions."""

    epoch: int = 0
    extra: torch.Tensor | None = None
    windows: torch.Tensor | None = None  # (N, 3) float: the top-ranked (top, left, loss), kept for a resume


WINDOW_SEARCH_IMAGES = 32


def search_windows(model, data, indices: torch.Tensor, k: int, top: int, gen: torch.Generator) -> torch.Tensor:
    """(top, 3): the ``top`` window positions of ``rank_windows`` on 32 seeded extra-set images, with their losses."""
    pick = indices[torch.randperm(len(indices), generator=gen)[:WINDOW_SEARCH_IMAGES]]
    _, x, y = next(iter(data.batches(len(pick), indices=pick)))
    pos, loss = rank_windows(model, x, y, k=k, generator=gen)
    return torch.cat([pos[:top].float(), loss[:top, None]], 1)


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
        attack = ft.pgd(window_at=st.windows[:, :2].long() if st.windows is not None else None)
        for epoch in range(st.epoch + 1, aft.aft_epochs + 1):
            adv = epoch <= aft.adv_epochs
            stats = finetune_epoch(s.train_model, opt, dist.epoch_batches(data, bs, s.gen, indices=st.extra),
                                   attack if adv else None, None, inf.augment, s.gen, s.cl, ft.clean_weight,
                                   desc=f"aft {epoch}", stage="aft", epoch=epoch)
            rec = {"epoch": epoch, "adversarial": adv, **stats, **s.epoch_eval(epoch, aft.aft_epochs)}
            s.log(rec, f"aft epoch {epoch}/{aft.aft_epochs}{' (adv)' if adv else ''}")
            st.epoch = epoch
            s.save(f"aft epoch {epoch}", st, **objects)
        settings = {"extra_size": n_extra, "extra_ratio": aft.extra_ratio if inf.extra is None else None,
                    "extra_data": aft.extra_data, "aft_epochs": aft.aft_epochs,
                    "adv_epochs": aft.adv_epochs, "lr": ft.ft_lr, "pgd": attack.settings(),
                    "clean_weight": ft.clean_weight,
                    **({"window_search": {"images": WINDOW_SEARCH_IMAGES, "top": aft.window_search,
                                          "found": st.windows.tolist()}} if st.windows is not None else {})}
        return s.finish(settings)
