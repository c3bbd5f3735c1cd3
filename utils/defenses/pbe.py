"""Progressive PBE (no clean data), and pbe_main.py's job: AFT by default, PBE with ``--progressive``.

PBE starts from a random share of the poisoned training set and, round by round, fine-tunes (the first
round on PGD examples), scores every training sample by the consistency of the infected and current
models' logits and keeps the most consistent share as the next extra set; the least consistent samples
are reported as detected poison.

Departures from the paper code, each an option whose other value is the paper's: round 0's share is drawn from the
samples not labelled as the (estimated) target (``--init_pool non_target``: a random share keeps the all2one
poisons among it, which re-teach the backdoor in their PGD copies); the score subtracts 0.5 where the arg-max
changed (``--argmax_penalty``, PUD's score); the detector ranks among the target's class-split cluster, or its
target-labelled samples (``--poison_candidates auto``; without a confirmed target among what the per-class filter
removed, ranked by the probability of their own label, ``--poison_score``), and what it flags stays out of every
later extra set
(``--quarantine``); later extra sets are drawn only from what the per-class filter kept (``--later_pool kept``)
and take the top share of every label (``--balanced_selection 1``): round 0 without target-labelled samples stops
the model predicting that class, a global top share then never selects a target image again, and what the filter
removed holds the poisons that would re-teach the backdoor once the class is back. ``--later_lr`` sets the
learning rate of rounds >= 1 and ``--round_eps`` each round's PGD radius (the paper code keeps ``--adv_eps``; a
dead line in it meant 2/255 from round 2 on). Rounds >= 1 ascend on the cross-entropy of what the detector flagged
(``--unlearn_lambda``, 0 = the paper's plain fine-tuning) where it ranks a confirmed target's split cluster (its
flags are poisons there), and at the weaker ``--unlearn_lambda_unconfirmed`` elsewhere (all2all: its flags hold
clean images too): round 0's adversarial fine-tuning suppresses the backdoor, and clean fine-tuning alone brings
it back (measured with no poisoned sample in any extra set; docs/ablations.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from utils.defenses.aft import AFTSettings, FinetuneSettings, run_aft
from utils.defenses.filtering import FilterSettings, filter_classes_and_decide
from utils.defenses.selection import (INIT_POOLS, POISON_SCORES, bottom_fraction, consistency_scores, detection_stats,
                                      poison_candidates_opt, poison_score_opt, poison_share, resolve_candidates,
                                      resolve_poison_score, shown, top_fraction)
from utils.defenses.session import DefenseJob, DefenseSession
from utils.defenses.target import TargetSettings, choose_target, estimate_target
from utils.defenses.unlearning import (ASCENT_WHERE, POISON_LOSS_BOUND, AscentObjective, ascent_decision,
                                      classifier_layer)
from utils.run import distributed as dist
from utils.run.errors import UserError
from utils.run.stagetimer import stage
from utils.settings import Settings, fraction, opt, require
from utils.training import finetune_epoch, make_optimizer


@dataclass(frozen=True)
class PBESettings(Settings):
    GROUP = "progressive PBE (--progressive: no clean data)"
    progressive: bool = opt(False, "run progressive PBE instead of AFT", action="store_true")
    init_ratio: float = opt(0.05, "round 0's extra set: this share of the training set, drawn at random from "
                                  "--init_pool", type=fraction)
    rounds: int = opt(4, "rounds", type=int)
    round_epochs: int = opt(10, "fine-tuning epochs per round", type=int)
    top_rates: tuple = opt([0.2, 0.5, 0.7, 0.9], "share of the training set kept as the next extra set after each "
                                                 "round but the last", type=fraction, nargs="*")
    partial_batches: int = opt(31, "adversarial batches in the first epoch of rounds >= 1", type=int)
    round_eps: tuple | None = opt(None, "PGD radius per round (the step scales with it)", type=fraction, nargs="+",
                                  shown="--adv_eps in every round")
    later_lr: float | None = opt(None, "learning rate of rounds >= 1", type=fraction, shown="--ft_lr")
    detect_fraction: float = opt(0.1, "lowest-scored share of all samples reported as detected poison", type=fraction)
    init_pool: str = opt("auto", "where round 0's extra set is drawn from: non_target = samples not labelled as "
                                 "the target; filtered = what the per-class filter kept; all = every sample (paper "
                                 "code); auto: non_target if a target is confirmed, else filtered",
                         choices=("auto", *INIT_POOLS))
    argmax_penalty: int = opt(1, "1: consistency score minus 0.5 where the arg-max changed (PUD's score); 0: logit "
                                 "cosine only (paper)", type=int, choices=(0, 1))
    poison_candidates: str = poison_candidates_opt("the detector ranks")
    poison_score: str = poison_score_opt("the detector", "consistency (as --argmax_penalty says)")
    balanced_selection: int = opt(1, "1: the next extra set keeps the top share of every label (a class round 0 "
                                     "stopped predicting comes back); 0: one global top share (paper code)", type=int,
                                  choices=(0, 1))
    later_pool: str = opt("kept", "where rounds >= 1 draw their extra sets from: kept = what the per-class filter "
                                  "kept (what it removed never returns); all = every sample (paper code)",
                          choices=("kept", "all"))
    quarantine: int = opt(1, "1: samples the detector flags stay out of every later extra set; 0: the plain top "
                             "share (paper code)", type=int, choices=(0, 1))
    unlearn_lambda: float = opt(0.1, "rounds >= 1: weight of an ascent on the cross-entropy of every sample the "
                                     "detector has flagged so far, bounded at CE 10 (PUD's unlearning term without "
                                     "its L1 anchor), used when the detector ranks a confirmed target's split "
                                     "cluster: clean fine-tuning revives a backdoor round 0 only suppressed; 0: plain "
                                     "fine-tuning (paper code)", type=fraction)
    unlearn_lambda_unconfirmed: float = opt(0.03, "the ascent's weight where the detector ranks other candidates "
                                                   "than a confirmed target's split cluster (all2all, clean-label: "
                                                   "its flags there were 75-77 %% precise); 0: no ascent there",
                                            type=fraction)
    ascent_bs: int = opt(32, "rounds >= 1: flagged samples joined to each fine-tuning batch for the ascent (the "
                             "whole batch size cost 30 %% more time for no lower ASR)", type=int)
    ascent_head: str = opt("trained", "rounds >= 1: trained = the ascent's gradient reaches the classifier layer too; "
                                      "shielded = it stops below that layer (the clean fine-tuning still trains it), "
                                      "so the ascent cannot lower the target class by reading it less",
                           choices=("trained", "shielded"))
    unlearn_where: str = opt("split", "where rounds >= 1 ascend at --unlearn_lambda: split = only where the "
                                      "detector ranks a confirmed target's split cluster (elsewhere its flags may be "
                                      "clean images: --unlearn_lambda_unconfirmed); always",
                             choices=ASCENT_WHERE)

    def check_for(self, ft: FinetuneSettings) -> None:
        require(0 < self.init_ratio <= 1, f"--init_ratio must be in (0, 1], got {self.init_ratio}")
        require(self.rounds > 0 and self.round_epochs > 0, f"--rounds and --round_epochs must be positive, got "
                                                           f"{self.rounds} and {self.round_epochs}")
        require(len(self.top_rates) >= self.rounds - 1, f"--top_rates needs a keep-fraction for each of the first "
                                                        f"{self.rounds - 1} rounds, got {len(self.top_rates)}")
        require(all(0 < r <= 1 for r in self.top_rates), f"--top_rates must be in (0, 1], got {list(self.top_rates)}")
        require(0 < self.detect_fraction < 1, f"--detect_fraction must be in (0, 1), got {self.detect_fraction}")
        require(self.partial_batches >= 0, f"--partial_batches must be >= 0, got {self.partial_batches}")
        require(self.unlearn_lambda >= 0, f"--unlearn_lambda must be >= 0, got {self.unlearn_lambda}")
        require(self.unlearn_lambda_unconfirmed >= 0,
                f"--unlearn_lambda_unconfirmed must be >= 0, got {self.unlearn_lambda_unconfirmed}")
        require(self.ascent_bs > 0, f"--ascent_bs must be positive, got {self.ascent_bs}")
        require(self.later_lr is None or self.later_lr > 0, f"--later_lr must be positive, got {self.later_lr}")
        if self.round_eps is not None:
            require(len(self.round_eps) == self.rounds,
                    f"--round_eps needs one radius per round (--rounds {self.rounds}), got {len(self.round_eps)}")
            top = 1 if ft.adv_norm == "linf" else float("inf")
            require(all(0 <= e <= top for e in self.round_eps),
                    f"--round_eps must be >= 0 (and <= 1 for linf, pixel units), got {list(self.round_eps)}")


@dataclass(frozen=True, kw_only=True)
class PBEJob(DefenseJob):
    """Repair a backdoor-infected model (a model.pt written by train_blend.py, a model and training set of other
    code with --train_data, or --from_backdoorbench): AFT fine-tunes it on a small clean extra set (--extra_data,
    or a share of the training set's known-clean samples), the first epochs on PGD examples (the default);
    --progressive runs PBE, which needs no clean data, re-selects its extra set by consistency round by round
    and lists its detections in suspects.csv."""

    KEY = "pbe"
    finetune: FinetuneSettings
    aft: AFTSettings
    target: TargetSettings
    filter: FilterSettings
    pbe: PBESettings

    def check(self) -> None:
        super().check()
        self.pbe.check_for(self.finetune)
        require(not (self.pbe.progressive and self.aft.extra_data),
                "--extra_data is AFT's clean set; progressive PBE (--progressive) uses no clean data: drop one of them")
        require(not (self.pbe.progressive and self.aft.window_search),
                "--window_search is AFT's (it searches on the clean extra set); progressive PBE does not use it")
        require(not self.aft.window_search or self.finetune.adv_window > 0,
                "--window_search places PGD windows: it needs --adv_window > 0")
        require(not (self.pbe.progressive and self.aft.reverse_every),
                "--reverse_every is AFT's (it reverses a trigger on the clean extra set); progressive PBE does not "
                "use it")

    def check_for_input(self, src) -> None:
        inp = self.infected
        self.finetune.check_for(inp.input_shape)
        self.target.check_for(inp.num_classes, inp.dataset or src.origin)
        require(self.pbe.progressive or self.aft.extra_data or src.clean_known,
                "AFT needs a clean extra set, and which training samples are clean is unknown: pass --extra_data "
                "(clean images you hold, a folder or tensor file), or --poison_indices, or run --progressive PBE")

    def extra_data(self) -> str | None:
        return self.aft.extra_data

    def for_input(self, src) -> "PBEJob":
        job = super().for_input(src)
        return job.replace(filter=job.filter.for_arch(job.infected.arch))

    def check_model(self, model) -> None:
        if self.pbe.progressive:
            self.filter.check_model(model, self.infected.arch)


def run_pbe_main(job: PBEJob) -> dict:
    """pbe_main.py: PBE with --progressive, else AFT."""
    if job.pbe.progressive:
        return run_pbe(job)
    s = DefenseSession(job, "aft")
    return run_aft(s, s.job.aft, s.job.finetune)


@dataclass
class PBEState:
    """PBE's loop cursor (round, epoch within it) and loop-carried values."""

    round: int = 0
    epoch: int = 0
    epoch_global: int = 0
    target: dict | None = None
    filtered: torch.Tensor | None = None  # what the per-class filter removed
    filtering: dict | None = None  # its record
    split: torch.Tensor | None = None  # what the class split removed (the target's cluster when a target is used)
    extra: torch.Tensor | None = None
    quarantine: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    rounds: list = field(default_factory=list)
    flagged: list = field(default_factory=list)  # each round's detected poison (indices), for suspects.csv


def round_lr(ft_lr: float, later_lr: float | None, r: int) -> float:
    """Round 0 fine-tunes at ``--ft_lr``; later rounds at ``--later_lr`` if given, else also at ``--ft_lr``."""
    return ft_lr if r == 0 or later_lr is None else later_lr


def initial_extra(labels: torch.Tensor, target: int | None, init_pool: str, init_ratio: float,
                  generator: torch.Generator, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Round 0's extra set: a random ``init_ratio`` of the training set's size, drawn from the ``init_pool`` samples
    (``kept``: what the per-class filter kept, for ``filtered``)."""
    pool = INIT_POOLS[init_pool](labels, target, kept)
    if len(pool) == 0:
        raise UserError(f"--init_pool {init_pool} leaves no training sample (every label is the target {target}); "
                        "use --init_pool all")
    k = min(len(pool), max(1, int(round(init_ratio * len(labels)))))
    return pool[torch.randperm(len(pool), generator=generator)[:k]].sort().values


def top_share_outside(scores: torch.Tensor, fraction: float, excluded: torch.Tensor,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """The highest-scored ``fraction`` of all samples (of every label's samples, with ``labels``) that are not
    ``excluded`` (fewer if too few are left), by index."""
    ranked = scores.clone()
    ranked[excluded] = float("-inf")  # ranked last, then dropped: the share stays a share of the whole training set
    sel = top_fraction(ranked, fraction, labels=labels)
    return sel[~torch.isin(sel, excluded)]


def later_excluded(quarantine: torch.Tensor, removed: torch.Tensor, later_pool: str) -> torch.Tensor:
    """The samples a later round may not select: the quarantine and, with ``later_pool`` kept, what the per-class
    filter removed."""
    return torch.cat([quarantine, removed]).unique() if later_pool == "kept" else quarantine


def backdoor_hit_rate(logits: torch.Tensor, labels: torch.Tensor, is_poison: torch.Tensor | None) -> float | None:
    """Share of the truly poisoned training samples the model still gives their backdoor label (a diagnostic);
    None without a ground truth."""
    if is_poison is None or not bool(is_poison.any()):
        return None
    return float((logits.argmax(1)[is_poison] == labels[is_poison]).float().mean())


def run_pbe(job: PBEJob) -> dict:
    """Progressive PBE: rounds of (adversarial) fine-tuning and consistency-based re-selection of the extra set.

    The loop runs from the saved cursor (round, epoch within the round); the state also holds the extra set
    and the per-round records, so a resumed run continues exactly where the state was saved.
    """
    s = DefenseSession(job, "pbe")
    job, inf = s.job, s.inf
    ft, pbe = job.finetune, job.pbe
    truth = inf.truth
    labels = inf.poisoned.train_labels.cpu()
    opt = make_optimizer(inf.model, ft.ft_lr)  # one optimizer across rounds, as in the paper code
    objects = {"model": inf.model, "opt": opt}
    attacks = [ft.pgd(pbe.round_eps[r] if pbe.round_eps else None) for r in range(pbe.rounds)]
    bs, eval_bs = job.run.bs, job.run.eval_bs
    with s.ctl:
        st = s.start(PBEState(), **objects)
        if st.target is None:
            st.target = choose_target(job.target, inf.true_target, lambda: estimate_target(
                inf.reference, inf.poisoned, job.target, inf.num_classes, eval_bs, s.gen, s.cl),
                always_vote=True)
            out = filter_classes_and_decide(inf.reference, inf.poisoned, job.filter, st.target, job.run.seed, eval_bs,
                                            s.cl, s.logits(inf.reference))
            st.filtered, st.filtering, st.split = out.removed, out.record, out.stages.get("class_split")
            target = st.target["used"]
            pool = pbe.init_pool if pbe.init_pool != "auto" else ("non_target" if target is not None else "filtered")
            st.extra = initial_extra(labels, target, pool, pbe.init_ratio, s.gen, out.pool)
            st.filtering["init_pool"] = pool
            s.save("the target estimate", st, **objects)
        target = st.target["used"]
        mode, candidates = resolve_candidates(pbe.poison_candidates, labels, target, st.filtered, st.split)
        st.filtering["poison_candidates"] = mode
        st.filtering["poison_score"] = resolve_poison_score(pbe.poison_score, target)
        st.filtering["ascent"] = {**ascent_decision(pbe.unlearn_lambda, mode, pbe.unlearn_where,
                                                   pbe.unlearn_lambda_unconfirmed),
                                  "bound": POISON_LOSS_BOUND}
        ref_logits = s.logits(inf.reference)
        for r in range(st.round, pbe.rounds):
            purity = poison_share(st.extra, truth)
            if st.epoch == 0:
                print(f"round {r}: extra set {len(st.extra)} samples, {shown(purity, '.3%')} truly poisoned", flush=True)
            lr = round_lr(ft.ft_lr, pbe.later_lr, r)
            for e in range(st.epoch, pbe.round_epochs):
                st.epoch_global += 1
                if r == 0:
                    adv_batches = None  # every batch adversarial
                elif e == 0:
                    adv_batches = pbe.partial_batches
                else:
                    adv_batches = 0
                use = attacks[r] if adv_batches != 0 else None
                for group in opt.param_groups:  # one optimizer across rounds; rounds >= 1 may use --later_lr
                    group["lr"] = lr
                ascent = ascent_objective(s, st, r)
                batches = dist.epoch_batches(inf.poisoned, bs, s.gen, inf.augment, indices=st.extra)
                stats = finetune_epoch(s.train_model, opt, batches, use, adv_batches, None, s.gen, s.cl,
                                       ft.clean_weight, desc=f"pbe r{r} e{e + 1}", stage=f"pbe round {r}",
                                       epoch=st.epoch_global, loss_fn=ascent)
                if ascent is not None:
                    stats.update({**ascent.means(), "ascent_set": len(ascent.poison_set),
                                  "ascent_images": ascent.images,
                                  "ascent_clipped_batches": ascent.clipped_batches})
                rec = {"epoch": st.epoch_global, "round": r, "adversarial": use is not None, "lr": lr, **stats,
                       **s.epoch_eval(st.epoch_global, pbe.rounds * pbe.round_epochs,
                                      stage_end=e == pbe.round_epochs - 1)}
                s.log(rec, f"pbe round {r} epoch {e + 1}/{pbe.round_epochs}")
                st.epoch = e + 1
                s.save(f"pbe round {r} epoch {e + 1}", st, **objects)
            with stage("scoring"):
                info = score_round(s, st, r, purity, ref_logits, candidates, truth, labels)
            st.rounds.append(info)
            s.run.log({"round_summary": info, "epoch": st.epoch_global})
            st.round, st.epoch = r + 1, 0
            s.save(f"pbe round {r}", st, **objects)
        settings = {"init_ratio": pbe.init_ratio, "rounds": pbe.rounds, "round_epochs": pbe.round_epochs,
                    "top_rates": list(pbe.top_rates[:pbe.rounds - 1]), "partial_batches": pbe.partial_batches,
                    "lr": ft.ft_lr, "later_lr": pbe.later_lr if pbe.later_lr is not None else ft.ft_lr,
                    "pgd": [a.settings() for a in attacks], "detect_fraction": pbe.detect_fraction,
                    "target_label": job.target.target_label, "init_pool": pbe.init_pool,
                    "argmax_penalty": pbe.argmax_penalty, "quarantine": pbe.quarantine,
                    "poison_candidates": pbe.poison_candidates, "poison_score": pbe.poison_score,
                    "balanced_selection": pbe.balanced_selection,
                    "later_pool": pbe.later_pool, "unlearn_lambda": pbe.unlearn_lambda,
                    "unlearn_where": pbe.unlearn_where, "ascent_bs": pbe.ascent_bs, "ascent_head": pbe.ascent_head,
                    "unlearn_lambda_unconfirmed": pbe.unlearn_lambda_unconfirmed,
                    "poison_loss_bound": POISON_LOSS_BOUND}
        return s.finish(settings, {"target": st.target, "filtering": st.filtering, "rounds": st.rounds},
                        suspects={f"round {r}": idx for r, idx in enumerate(st.flagged)})


def ascent_objective(s: DefenseSession, st: PBEState, r: int) -> AscentObjective | None:
    """Rounds >= 1 (where ``unlearning.ascent_decision`` allows it): the fine-tuning objective also ascends on what the
    detector flagged in any round so far, so the clean extra set does not revive the backdoor (None: plain
    fine-tuning)."""
    if r == 0 or not st.filtering["ascent"]["used"] or not st.flagged:
        return None
    flagged = torch.cat(st.flagged).unique()
    if len(flagged) == 0:
        return None
    shield = classifier_layer(s.inf.model) if s.job.pbe.ascent_head == "shielded" else None
    return AscentObjective(s.inf.model, s.train_model, s.inf.poisoned, flagged, s.job.pbe.ascent_bs, s.gen,
                           s.inf.augment, s.cl, lam=st.filtering["ascent"]["lambda"], mu=0.0, bound=POISON_LOSS_BOUND,
                           shield=shield)


def score_round(s: DefenseSession, st: PBEState, r: int, purity: float, ref_logits, candidates, truth, labels) -> dict:
    """After round ``r``: score every sample, flag the least consistent as poison, pick the next extra set."""
    pbe = s.job.pbe
    cur_logits = s.logits(s.inf.model)
    scores = consistency_scores(ref_logits, cur_logits, argmax_penalty=bool(pbe.argmax_penalty))
    ranked = POISON_SCORES[st.filtering["poison_score"]](scores, cur_logits, labels)
    flagged = bottom_fraction(ranked, pbe.detect_fraction, candidates)
    st.flagged.append(flagged)
    det = detection_stats(flagged, truth)
    if pbe.quarantine:
        st.quarantine = torch.cat([st.quarantine, flagged]).unique()
    info = {"round": r, "extra_size": len(st.extra), "extra_poison_share": purity,
            "detect_precision": det["precision"], "detect_recall": det["recall"], "detect_fpr": det["fpr"],
            "poison_still_backdoor": backdoor_hit_rate(cur_logits, labels, truth),
            **({f"quarantine_{k}": v for k, v in detection_stats(st.quarantine, truth).items()}
               if pbe.quarantine else {}),
            **{k: s.history[-1][k] for k in ("clean_acc", "asr") if k in s.history[-1]}}
    if r < pbe.rounds - 1:
        removed = st.filtered.cpu() if st.filtered is not None else torch.zeros(0, dtype=torch.long)
        excluded = later_excluded(st.quarantine, removed, pbe.later_pool)
        st.extra = top_share_outside(scores, pbe.top_rates[r], excluded, labels if pbe.balanced_selection else None)
        info["next_extra_size"] = len(st.extra)
        info["next_extra_filter_removed"] = int(torch.isin(st.extra, removed).sum())
        info["next_extra_poison_share"] = poison_share(st.extra, truth)
    if pbe.quarantine:
        print(f"round {r}: quarantine {info['quarantine_flagged']} samples, precision "
              f"{shown(info['quarantine_precision'])} recall {shown(info['quarantine_recall'])}", flush=True)
    nxt = (f"; next extra set {len(st.extra)} ({shown(info['next_extra_poison_share'], '.3%')} poisoned)"
           if "next_extra_size" in info else "")
    print(f"round {r}: lowest {pbe.detect_fraction:.0%} as poison -> precision {shown(det['precision'])} "
          f"recall {shown(det['recall'])}; poisoned samples still given the backdoor label "
          f"{shown(info['poison_still_backdoor'])}{nxt}", flush=True)
    return info
