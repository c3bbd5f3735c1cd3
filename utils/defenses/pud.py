"""PUD: Progressive Unified Defense, without clean data. ``run_pud`` follows the paper's Algorithm 1:

1. ``find_target``: the backdoor target (the most frequent class of untargeted PGD examples) unless given.
2. ``filter_training_set``: SPECTRE on the training samples labelled as the target removes the most
   suspicious share, and (``--class_split``, this toolkit's addition, ``class_split``) a two-way split of
   that class removes the cluster that looks like images of the other classes; the rest is the pool. Both
   run on every class, and ``filtering.decide_target`` decides from that evidence and the vote whether one
   target is confirmed: if none is (all2all, a wrong ``--target_label``), every class is filtered and the
   later stages work class-agnostically (the poison set from what the filter removed, per-class SPECTRE on
   the extra sets, the mean-teacher set refreshed on every label).
3. ``progressive_steps``: (adversarial) fine-tuning on an extra set, then every training sample is scored by
   the consistency of the infected and current logits (arg-max disagreement penalised). The most consistent
   share of the pool becomes the next extra set (cleaned once more by SPECTRE on its target part), the
   least consistent share of the candidates the poison set (from a confirmed target's split cluster at least
   half of it, ``--split_poison_share``; without a confirmed target the candidates whose own label the model
   now finds least likely, ``--poison_score``).
4. ``unlearn``: CE on the extra set − λ·bounded CE on the poison set + μ·L1 to a frozen copy; the ascent term
   only where the poison set was ranked within a confirmed target's split cluster (``--unlearn_where``), or among
   a confirmed target's samples when the model mostly gives them another label (``--disowned_poisons``; from
   step 1 on, those samples also stay out of the next extra set).
5. ``mean_teacher``: fine-tuning on the extra set with an EMA teacher and a softmax-consistency term; where
   unlearning ascended, its ascent goes on (``--mt_ascent``): clean epochs alone let a BadNets patch back.
   While either stage ascends, the classifier layer is held (``--hold_head``, ``unlearning.HeldLayer``).

How this departs from the authors' code, and why, is in docs/pud.md. Under torchrun every training epoch
is data-parallel (each rank its share of the extra set, and in unlearning and the mean teacher of the poison
set; DDP averages the gradients); scores, SPECTRE flags, the class split and selections are the same on every
rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models import frozen_copy
from utils.adversarial import PGD
from utils.defenses.filtering import (FilterSettings, class_representations, filter_classes_and_decide,
                                      removed_record, spectre_flags)
from utils.defenses.mean_teacher import ema_update, softmax_consistency
from utils.defenses.selection import (NO_CLEAN_KNOWN, POISON_SCORES, bottom_fraction, clean_indices, consistency_scores,
                                      detection_stats, poison_candidates_opt, poison_count, poison_score_opt,
                                      poison_share, resolve_candidates, resolve_poison_score, shown, top_fraction)
from utils.defenses.session import DefenseJob, DefenseSession
from utils.defenses.target import TargetSettings, choose_target, estimate_target
from utils.defenses.unlearning import (ASCENT_WHERE, POISON_LOSS_BOUND, AscentObjective, HeldLayer, PoisonStream,
                                       ascent_decision, balanced_class_weights, bounded_poison_ce, classifier_layer,
                                       disowned_enough, joined_forward)
from utils.run import distributed as dist
from utils.run.errors import UserError
from utils.run.stagetimer import stage
from utils.settings import Settings, fraction, opt, require
from utils.training import finetune_epoch, make_optimizer, train_epoch

NO_POISON_INDICES = ("PUD needs the training set's poisoned indices; re-train the infected model with train_blend.py "
                     "--poison_mode fixed (the default)")


@dataclass(frozen=True)
class PUDSettings(Settings):
    GROUP = "PUD"
    spectre_step_remove: float = opt(0.1, "per-step SPECTRE: share removed from the extra set's target part (no "
                                          "confirmed target: from each class of it)", type=fraction)
    spectre_min: int = opt(100, "per-step SPECTRE runs only on at least this many samples of a class", type=int)
    steps: int = opt(5, "progressive steps", type=int)
    step_epochs: tuple = opt([10, 10, 10, 10, 30], "fine-tuning epochs per step", type=int, nargs="+")
    step_adv_epochs: tuple = opt([10, 2, 1, 1, 1], "adversarial epochs per step (the first ones)", type=int, nargs="+")
    step_partial: tuple = opt([0, 0, 0, 1, 1], "per step, 1: its adversarial epochs are partial (the first "
                                               "--partial_batches batches)", type=int, nargs="+")
    step_eps: tuple = opt([6 / 255] * 4 + [4 / 255], "PGD radius per step", type=fraction, nargs="+")
    step_alpha_div: tuple = opt([5, 5, 5, 6, 6], "PGD step = radius / this, per step", type=fraction, nargs="+")
    step_pgd_steps: int = opt(7, "PGD iterations of the fine-tuning attack", type=int)
    partial_batches: int = opt(31, "adversarial batches of a partial adversarial epoch", type=int)
    step_robust: int = opt(0, "1: also PGD robust accuracy at the end of every progressive step (0: before and "
                              "after the defense only; it does not change the run's other numbers)", type=int,
                           choices=(0, 1))
    init_ratio: float = opt(0.05, "step 0's extra set: this random share of the pool", type=fraction)
    top_rates: tuple = opt([0.2, 0.4, 0.7, 0.8], "share of the pool kept as the next extra set after each step but "
                                                 "the last", type=fraction, nargs="*")
    balanced_selection: int = opt(1, "1: the next extra set keeps the top share of every label; 0: one global top "
                                     "share (paper code)", type=int, choices=(0, 1))
    poison_candidates: str = poison_candidates_opt("the poison set is drawn from")
    poison_score: str = poison_score_opt("the poison set")
    poison_fraction: float = opt(0.01, "poison set: this lowest-ranked share of all samples (--poison_score)",
                                 type=fraction)
    split_poison_share: float = opt(0.5, "where the poison set is drawn from a confirmed target's split cluster (all "
                                         "poisons on every all2one cell of the quick grids), it is at least this "
                                         "least consistent share of that cluster (0: --poison_fraction alone)",
                                    type=fraction)
    pud_lr: float = opt(0.01, "SGD learning rate", type=fraction)
    pud_milestones: tuple = opt([30, 60], "MultiStepLR milestones over the progressive epochs (decay 0.1)",
                                type=int, nargs="+")
    unlearn_epochs: int = opt(30, "unlearning epochs", type=int)
    unlearn_lambda: float = opt(0.003, "unlearning: weight of the poison-CE ascent term", type=fraction)
    unlearn_where: str = opt("split", "when unlearning ascends on the poison set: split = only when it was ranked "
                                      "within a confirmed target's split cluster (elsewhere, e.g. all2all, it holds "
                                      "clean images: the stage then trains on the clean term and the L1 anchor); "
                                      "always (paper code)", choices=ASCENT_WHERE)
    disowned_poisons: float = opt(0.75, "with a confirmed target but no split cluster (the poison set drawn from the "
                                         "target's samples): when the model gives at least this share of the poison "
                                         "set another label, the target samples it disowns are taken for dirty-label "
                                         "poisons: from step 1 on they stay out of the next extra set, and "
                                         "unlearning ascends on them (dirty-label SIG: 0.96-1.00; clean-label "
                                         "SIG's set of the class's own images: up to 0.50); 0: never",
                                  type=fraction)
    unlearn_mu: float = opt(1e-4, "unlearning: weight of the L1 distance to the frozen copy", type=fraction)
    poison_loss_bound: float = opt(POISON_LOSS_BOUND, "unlearning: the ascent term is clipped at this CE", type=fraction)
    step_balanced: int = opt(1, "1: the progressive steps' cross-entropy weighs every label of the extra set alike (a "
                                "target class the filtering thinned and the PGD epochs suppressed, e.g. on 43 "
                                "GTSRB-like classes, is learnt back); 0: plain mean (paper code)", type=int,
                             choices=(0, 1))
    unlearn_balanced: int = opt(1, "1: unlearning's clean term weighs every label of the extra set alike (a target "
                                   "class the filtering thinned is not forgotten); 0: plain mean (paper code)",
                                type=int, choices=(0, 1))
    mt_epochs: int = opt(30, "mean-teacher epochs", type=int)
    mt_weight: float = opt(0.05, "mean teacher: weight of the softmax consistency", type=fraction)
    ema_decay: float = opt(0.99, "mean teacher: EMA decay of the teacher", type=fraction)
    mt_refresh: int = opt(1, "1: before the mean teacher, drop target-labelled extra samples the unlearned model no "
                             "longer predicts as the target (0: the paper code)", type=int, choices=(0, 1))
    mt_ascent: int = opt(1, "1: the mean-teacher epochs keep unlearning's ascent on the poison set (where unlearning "
                            "used it, with its weight and bound), so that fine-tuning on clean samples does not let "
                            "the backdoor back; 0: plain mean teacher (paper code)", type=int, choices=(0, 1))
    hold_head: int = opt(1, "1: while unlearning and the mean teacher ascend on the poison set, the classifier layer "
                            "is held where the progressive steps left it, so the ascent changes how the network "
                            "sees the trigger instead of reading the target class less (43-class patch: the target "
                            "class ends unlearning at 89.8 %%, not 79.6); 0: every layer trained (paper code)",
                         type=int, choices=(0, 1))
    mt_adv: bool = opt(False, "mean teacher: the student trains on the teacher's PGD examples", action="store_true")
    return_teacher: bool = opt(False, "keep the teacher instead of the student", action="store_true")
    model_repair: bool = opt(False, "step 0 uses a known clean extra set (the model-repair setting)",
                             action="store_true")

    def check(self) -> None:
        for name in ("init_ratio", "poison_fraction"):
            v = getattr(self, name)
            require(0 < v <= 1, f"--{name} must be in (0, 1], got {v}")
        require(0 <= self.split_poison_share <= 1, f"--split_poison_share must be in [0, 1], got "
                                                   f"{self.split_poison_share}")
        require(0 < self.spectre_step_remove < 1,
                f"--spectre_step_remove must be in (0, 1), got {self.spectre_step_remove}")
        require(self.spectre_min > 0, f"--spectre_min must be positive, got {self.spectre_min}")
        require(self.steps > 0, f"--steps must be positive, got {self.steps}")
        for name in ("step_epochs", "step_adv_epochs", "step_partial", "step_eps", "step_alpha_div"):
            v = getattr(self, name)
            require(len(v) == self.steps, f"--{name} needs one value per step (--steps {self.steps}), got {len(v)}")
        require(len(self.top_rates) == self.steps - 1, f"--top_rates needs one value per step but the last "
                                                       f"({self.steps - 1} for --steps {self.steps}), got "
                                                       f"{len(self.top_rates)}")
        require(all(0 < r <= 1 for r in self.top_rates), f"--top_rates must be in (0, 1], got {list(self.top_rates)}")
        require(all(e >= 0 for e in self.step_epochs), f"--step_epochs must be non-negative, got {list(self.step_epochs)}")
        for i, (a, e) in enumerate(zip(self.step_adv_epochs, self.step_epochs)):
            require(0 <= a <= e, f"--step_adv_epochs {a} of step {i} must be between 0 and its --step_epochs {e}")
        require(all(v in (0, 1) for v in self.step_partial),
                f"--step_partial takes 0 or 1 per step, got {list(self.step_partial)}")
        require(all(0 <= v <= 1 for v in self.step_eps),
                f"--step_eps must be in [0, 1] (pixel units), got {list(self.step_eps)}")
        require(all(v > 0 for v in self.step_alpha_div),
                f"--step_alpha_div must be positive, got {list(self.step_alpha_div)}")
        require(self.step_pgd_steps >= 0, f"--step_pgd_steps must be >= 0, got {self.step_pgd_steps}")
        require(self.partial_batches >= 0, f"--partial_batches must be >= 0, got {self.partial_batches}")
        require(self.pud_lr > 0, f"--pud_lr must be positive, got {self.pud_lr}")
        require(all(m > 0 for m in self.pud_milestones),
                f"--pud_milestones must be positive epochs, got {list(self.pud_milestones)}")
        require(self.unlearn_epochs >= 0 and self.mt_epochs >= 0, f"--unlearn_epochs and --mt_epochs must be "
                                                                   f"non-negative, got {self.unlearn_epochs} and "
                                                                   f"{self.mt_epochs}")
        require(self.unlearn_lambda >= 0 and self.unlearn_mu >= 0, f"--unlearn_lambda and --unlearn_mu must be >= 0, "
                                                                   f"got {self.unlearn_lambda} and {self.unlearn_mu}")
        require(self.poison_loss_bound > 0, f"--poison_loss_bound must be positive, got {self.poison_loss_bound}")
        require(self.mt_weight >= 0, f"--mt_weight must be >= 0, got {self.mt_weight}")
        require(0 <= self.ema_decay <= 1, f"--ema_decay must be in [0, 1], got {self.ema_decay}")

    @property
    def total_epochs(self) -> int:
        """The run's training epochs: the progressive steps', unlearning's and the mean teacher's."""
        return sum(self.step_epochs) + self.unlearn_epochs + self.mt_epochs

    def step_pgd(self, st: int) -> PGD:
        """Step ``st``'s fine-tuning PGD (from the image, no random start)."""
        return PGD(eps=self.step_eps[st], alpha=self.step_eps[st] / self.step_alpha_div[st], steps=self.step_pgd_steps,
                   random_start=False)


@dataclass(frozen=True, kw_only=True)
class PUDJob(DefenseJob):
    """Purify a backdoor-infected model without clean data (a model.pt written by train_blend.py, a model and
    training set of other code with --train_data, or --from_backdoorbench): PUD filters the target class
    (SPECTRE and a class split), fine-tunes progressively on PGD examples of a growing, re-scored extra set,
    unlearns the identified poisons and ends with a mean-teacher stage; suspects.csv lists what it flagged."""

    KEY = "pud"
    target: TargetSettings
    filter: FilterSettings
    pud: PUDSettings

    def check_for_input(self, src) -> None:
        if src.ck is not None and src.ck["poisoned_indices"] is None:
            raise UserError(NO_POISON_INDICES)
        require(not self.pud.model_repair or src.clean_known,
                f"--model_repair draws step 0's extra set from the clean training samples, but {NO_CLEAN_KNOWN}; pass "
                "--poison_indices or drop --model_repair")
        self.target.check_for(self.infected.num_classes, self.infected.dataset or src.origin)

    def for_input(self, src) -> "PUDJob":
        job = super().for_input(src)
        return job.replace(filter=job.filter.for_arch(job.infected.arch))

    def check_model(self, model) -> None:
        self.filter.check_model(model, self.infected.arch)


STAGES = ("target", "spectre", "steps", "unlearning", "mean_teacher", "done")


@dataclass
class PUDState:
    """PUD's loop cursor and loop-carried values: everything a resumed run needs besides model/optimizer/scheduler."""

    stage: str = "target"
    epoch_global: int = 0
    target: dict | None = None
    spectre_initial: dict | None = None
    pool: torch.Tensor | None = None
    filtered: torch.Tensor | None = None
    extra: torch.Tensor | None = None
    poison_set: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    step: int = 0
    epoch: int = 0  # within the current step or stage
    step_info: dict | None = None  # the started step's record
    steps: list = field(default_factory=list)
    unlearning: dict | None = None
    mt_refresh: dict | None = None
    reference: dict | None = None  # the frozen copy's weights, taken when unlearning began
    teacher: dict | None = None
    gstep: int = 0  # EMA steps of the teacher
    removed: dict = field(default_factory=dict)  # the initial filtering's removals per stage, for suspects.csv


def run_pud(job: PUDJob) -> dict:
    """PUD, stage by stage (Algorithm 1); each stage runs from the saved cursor in the state."""
    s = DefenseSession(job, "pud")
    pud = s.job.pud
    model = s.inf.model
    opt = make_optimizer(model, pud.pud_lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(pud.pud_milestones), gamma=0.1)
    objects = {"model": model, "opt": opt, "sched": sched}
    with s.ctl:
        st = s.start(PUDState(), **objects)
        if st.stage == "target":
            st.target = find_target(s)
            st.stage = "spectre"
            s.save("the target estimate", st, **objects)
        if st.stage == "spectre":
            filter_training_set(s, st)
            st.stage = "steps"
            s.save("the initial SPECTRE", st, **objects)
        if st.stage == "steps":
            progressive_steps(s, st, objects)
            st.stage, st.epoch = "unlearning", 0
            s.save("the progressive steps", st, **objects)
        if st.stage == "unlearning":
            unlearn(s, st, objects)
            if pud.mt_refresh:
                with stage("scoring"):
                    st.mt_refresh = refresh_before_teacher(s, st)
            st.stage, st.epoch, st.reference = "mean_teacher", 0, None
            s.save("unlearning", st, **objects)
        if st.stage == "mean_teacher":
            mean_teacher(s, st, objects)
        settings = {**s.job.target.as_dict(), **s.job.filter.as_dict(), **pud.as_dict()}
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
        return s.finish(settings, {"target": st.target, "spectre_initial": st.spectre_initial, "steps": st.steps,
                                   "unlearning": st.unlearning, "mt_refresh": st.mt_refresh,
                                   "mean_teacher": {"ascent": teacher_ascent(pud, st)}},
                        suspects={**st.removed, "poison_set": st.poison_set})


def extra_label_weights(s: DefenseSession, extra: torch.Tensor) -> torch.Tensor:
    """Class weights under which every label of the extra set counts alike (the steps' and unlearning's CE), made
    once per stage on the device, not per batch."""
    return balanced_class_weights(s.inf.poisoned.train_labels.cpu()[extra], s.inf.num_classes).to(s.device)


# ----- 1. the target ------------------------------------------------------------------------------------------

def find_target(s: DefenseSession) -> dict:
    """The PGD vote (also when a target is given: it is evidence for the decision after the filtering)."""
    inf, job = s.inf, s.job
    return choose_target(job.target, inf.true_target, lambda: estimate_target(
        inf.reference, inf.poisoned, job.target, inf.num_classes, job.run.eval_bs, s.gen, s.cl),
        always_vote=True)


# ----- 2. the initial filtering -------------------------------------------------------------------------------

def filter_training_set(s: DefenseSession, st: PUDState) -> None:
    """The initial filtering (``filtering.filter_training_set``); the rest is the pool, and step 0's extra set is
    drawn from it (from the known clean images with ``--model_repair``)."""
    pud, inf = s.job.pud, s.inf
    out = filter_classes_and_decide(inf.reference, inf.poisoned, s.job.filter, st.target, s.job.run.seed,
                                    s.job.run.eval_bs, s.cl, s.logits(inf.reference))
    st.pool, st.filtered, st.spectre_initial, st.removed = out.pool, out.removed, out.record, out.stages
    pick = clean_indices(inf.poisoned, "--model_repair") if pud.model_repair else out.pool
    k0 = max(1, int(round(pud.init_ratio * len(pick))))
    st.extra = pick[torch.randperm(len(pick), generator=s.gen)[:k0]].sort().values


# ----- 3. the progressive steps -------------------------------------------------------------------------------

def progressive_steps(s: DefenseSession, st: PUDState, objects: dict) -> None:
    """The steps from the cursor (step, epoch within the step); ``step_info`` marks a started step."""
    pud, inf = s.job.pud, s.inf
    truth = inf.truth
    labels = inf.poisoned.train_labels.cpu()
    ref_logits = s.logits(inf.reference)
    target = st.target["used"]
    mode, candidates = resolve_candidates(pud.poison_candidates, labels, target, st.filtered,
                                          st.removed.get("class_split"))
    st.spectre_initial["poison_candidates"] = mode
    st.spectre_initial["poison_score"] = resolve_poison_score(pud.poison_score, target)
    for step in range(st.step, pud.steps):
        if st.step_info is None:
            with stage("filtering"):
                start_step(s, st, step, truth, labels)
        train_step(s, st, step, objects)
        with stage("scoring"):
            score_step(s, st, step, ref_logits, candidates, truth, labels)
        st.step, st.epoch, st.step_info = step + 1, 0, None
        if step < pud.steps - 1:
            s.save(f"pud step {step}", st, **objects)


def start_step(s: DefenseSession, st: PUDState, step: int, truth: torch.Tensor | None, labels: torch.Tensor) -> None:
    """A step's start: from step 1 on, SPECTRE on the extra set's target part removes its most suspicious share."""
    pud = s.job.pud
    extra, target = st.extra, st.target["used"]
    info = {"step": step, "extra_size": len(extra), "extra_poison_share": poison_share(extra, truth), "spectre": None}
    if step > 0:
        classes = [target] if target is not None else list(range(s.inf.num_classes))
        parts = [extra[labels[extra] == c] for c in classes]
        parts = [p for p in parts if len(p) >= pud.spectre_min]
        considered = sum(len(p) for p in parts)
        if parts:
            rm = torch.cat([spectre_flags(class_representations(s.inf.reference, s.inf.poisoned, s.job.filter.spectre_layer,
                                                                p, s.job.run.eval_bs), p, pud.spectre_step_remove)
                            for p in parts]).sort().values
            extra = extra[~torch.isin(extra, rm)]
            info["spectre"] = removed_record(rm, considered, truth)
        else:
            info["spectre"] = {"considered": len(extra[labels[extra] == target]) if target is not None else 0,
                               "removed": 0, "skipped": True}
        info["extra_size_after_spectre"] = len(extra)
        info["extra_poison_share_after_spectre"] = poison_share(extra, truth)
    st.extra, st.step_info = extra, info
    print(f"step {step}: extra set {len(extra)} samples, {shown(poison_share(extra, truth), '.3%')} truly poisoned",
          flush=True)


def train_step(s: DefenseSession, st: PUDState, step: int, objects: dict) -> None:
    """The step's epochs from the cursor: the first ``step_adv_epochs`` on PGD examples (partial if asked)."""
    pud, inf = s.job.pud, s.inf
    opt, sched = objects["opt"], objects["sched"]
    attack = pud.step_pgd(step)
    partial = bool(pud.step_partial[step])
    weight = extra_label_weights(s, st.extra) if pud.step_balanced else None  # the step's extra set is fixed
    for e in range(st.epoch, pud.step_epochs[step]):
        st.epoch_global += 1
        adv = e < pud.step_adv_epochs[step]
        adv_batches = (pud.partial_batches if partial else None) if adv else 0
        batches = dist.epoch_batches(inf.poisoned, s.job.run.bs, s.gen, inf.augment, indices=st.extra)
        stats = finetune_epoch(s.train_model, opt, batches, attack if adv else None, adv_batches, None, s.gen, s.cl,
                               desc=f"pud s{step} e{e + 1}", stage=f"pud step {step}", epoch=st.epoch_global,
                               class_weight=weight)
        sched.step()
        last = e == pud.step_epochs[step] - 1
        rec = {"epoch": st.epoch_global, "step": step, "adversarial": adv, "lr": opt.param_groups[0]["lr"], **stats,
               **s.epoch_eval(st.epoch_global, pud.total_epochs, stage_end=last,
                              robust=last and bool(pud.step_robust))}
        s.log(rec, f"pud step {step} epoch {e + 1}/{pud.step_epochs[step]}{' (adv)' if adv else ''}")
        st.epoch = e + 1
        s.save(f"pud step {step} epoch {e + 1}", st, **objects)
    if pud.step_epochs[step] == 0:
        rec = {"epoch": st.epoch_global, "step": step, **s.evaluate(robust=bool(pud.step_robust))}
        s.log(rec, f"pud step {step} (no epochs)")


def poison_set_fraction(pud: PUDSettings, mode: str, candidates: torch.Tensor | None, n: int) -> float:
    """The poison set's share of all ``n`` samples: ``--poison_fraction``, and from a confirmed target's split cluster
    at least ``--split_poison_share`` of it. The cluster is poisons by construction, and unlearning that ascends on
    a fifth of them (the grid's 2 %) leaves a BadNets patch at 9-10 % ASR where half of them take it to 5-6 %."""
    if mode != "split" or candidates is None:
        return pud.poison_fraction
    return max(pud.poison_fraction, pud.split_poison_share * len(candidates) / n)


def score_step(s: DefenseSession, st: PUDState, step: int, ref_logits, candidates, truth, labels) -> None:
    """Score every training sample; the poison set from the candidates, the next extra set from the pool."""
    pud, inf = s.job.pud, s.inf
    info = st.step_info
    cur_logits = s.logits(inf.model)
    scores = consistency_scores(ref_logits, cur_logits, argmax_penalty=True)
    ranked = POISON_SCORES[st.spectre_initial["poison_score"]](scores, cur_logits, labels)
    st.poison_set = bottom_fraction(ranked, poison_set_fraction(pud, st.spectre_initial["poison_candidates"],
                                                                candidates, len(scores)), candidates)
    det = detection_stats(st.poison_set, truth)
    info.update({"poison_set_size": len(st.poison_set), "poison_precision": det["precision"],
                 "poison_recall": det["recall"], **{k: s.history[-1].get(k) for k in ("clean_acc", "asr", "robust_acc")}})
    if step < pud.steps - 1:
        pool = st.pool
        if step >= 1:  # the step-0 model's PGD epochs suppress the target class: its share says nothing
            share, disowned = disowned_poisons(pud, st, cur_logits, labels)
            if disowned is not None:
                pool = pool[~disowned.to(pool.device)[pool]]
                info["disowned"] = {"share": share, "kept_out": int(disowned.sum()),
                                    "kept_out_poison": poison_count(torch.nonzero(disowned).flatten(), truth)}
        st.extra = top_fraction(scores, pud.top_rates[step], among=pool,
                                labels=labels if pud.balanced_selection else None)
        info["next_extra_size"] = len(st.extra)
        info["next_extra_poison_share"] = poison_share(st.extra, truth)
    st.steps.append(info)
    s.run.log({"step_summary": info, "epoch": st.epoch_global})
    print(f"step {step}: poison set {len(st.poison_set)} precision {shown(det['precision'])} recall "
          f"{shown(det['recall'])}", flush=True)


# ----- 4. unlearning ------------------------------------------------------------------------------------------

def unlearn(s: DefenseSession, st: PUDState, objects: dict) -> None:
    """Machine unlearning on the last extra set and the poison set, against a frozen copy kept in the state."""
    pud, inf, bs = s.job.pud, s.inf, s.job.run.bs
    model, opt = objects["model"], objects["opt"]
    extra, poison_set = st.extra, st.poison_set
    reference = frozen_copy(model, st.reference)  # the copy taken when unlearning began, also after a resume
    weight = extra_label_weights(s, extra) if pud.unlearn_balanced else None
    st.reference = reference.state_dict()
    if st.unlearning is None:
        ascent = decide_ascent(s, st, model)
        poison_set = st.poison_set
        st.unlearning = {"epochs": pud.unlearn_epochs, "extra_size": len(extra), "poison_set_size": len(poison_set),
                         "clipped_batches": 0, "batches": 0, "history": [], "ascent": ascent}
    record = st.unlearning
    record.setdefault("classifier_layer", head_use(pud, record["ascent"], model))
    lam = record["ascent"]["lambda"] if record["ascent"]["used"] else 0.0
    held = held_layer(model, record["classifier_layer"])
    for e in range(st.epoch, pud.unlearn_epochs):
        st.epoch_global += 1
        ep = st.epoch_global
        objective = AscentObjective(model, s.train_model, inf.poisoned, poison_set, bs, s.gen, inf.augment, s.cl,
                                    lam=lam, mu=pud.unlearn_mu, bound=pud.poison_loss_bound,
                                    reference=reference, class_weight=weight)
        batches = dist.epoch_batches(inf.poisoned, bs, s.gen, inf.augment, indices=extra)
        stats = train_epoch(s.train_model, opt, batches, loss_fn=objective, desc=f"unlearn {e + 1}",
                            stage="pud unlearning", epoch=ep, what="unlearning", timing="unlearning",
                            after_step=held.restore if held else None)
        record["batches"] += objective.batches
        record["clipped_batches"] += objective.clipped_batches
        parts_mean = objective.means()
        rec = {"epoch": ep, "stage": "unlearning", **parts_mean, "images": stats["images"],
               **s.epoch_eval(ep, pud.total_epochs, stage_end=e == pud.unlearn_epochs - 1)}
        record["history"].append({k: rec[k] for k in ("epoch", "clean_ce", "poison_ce", "loss", "clean_acc", "asr")
                                  if k in rec})
        s.log(rec, f"pud unlearning {e + 1}/{pud.unlearn_epochs}")
        st.epoch = e + 1
        s.save(f"pud unlearning epoch {e + 1}", st, **objects)
    record["clipped"] = record["clipped_batches"] > 0
    if held:
        held.release(opt)


def decide_ascent(s: DefenseSession, st: PUDState, model) -> dict:
    """Whether unlearning ascends (``unlearning.ascent_decision``). Where that rests on the model disowning a
    confirmed target's poison set, the poison set becomes every target-labelled sample the model disowns (on SIG's
    two-class poisons 490 samples, 460 of them poisons, against the 100 the ranking drew)."""
    pud = s.job.pud
    share, disowned = disowned_poisons(pud, st, s.logits(model), s.inf.poisoned.train_labels.cpu())
    ascent = ascent_decision(pud.unlearn_lambda, st.spectre_initial["poison_candidates"], pud.unlearn_where,
                             disowned=share, disowned_min=pud.disowned_poisons)
    if "disowned" in ascent:
        st.poison_set = torch.nonzero(disowned).flatten().to(st.poison_set.device)
        det = detection_stats(st.poison_set, s.inf.truth)
        ascent.update({"poison_set": f"the {len(st.poison_set)} target-labelled samples the model gives another "
                                     "label", "poison_precision": det["precision"], "poison_recall": det["recall"]})
    return ascent


def disowned_poisons(pud: PUDSettings, st: PUDState, logits: torch.Tensor,
                     labels: torch.Tensor) -> tuple[float | None, torch.Tensor | None]:
    """Where the poison set was drawn from a confirmed target's samples: the share of it the model (``logits`` of
    every training sample) gives another label, and, when that is at least ``--disowned_poisons``, the mask of
    every target-labelled sample it gives another label (else None). Dirty-label poisons are images of other
    classes: a model that no longer follows the backdoor disowns them, while the class's own images keep their
    label (clean-label SIG's set: 18 % disowned)."""
    if st.spectre_initial["poison_candidates"] != "target" or not len(st.poison_set):
        return None, None
    disowned = logits.argmax(1) != labels
    share = float(disowned[st.poison_set.cpu()].float().mean())
    if not disowned_enough(share, pud.disowned_poisons):
        return share, None
    return share, disowned & (labels == st.target["used"])


def head_use(pud: PUDSettings, ascent: dict, model) -> str:
    """``held`` where a stage ascends and ``--hold_head`` is 1 (``HeldLayer``), else ``trained`` (for summary.json;
    a model without an ``nn.Linear`` layer has none to hold, and the record says so)."""
    if not (pud.hold_head and ascent.get("used")):
        return "trained"
    return "held" if classifier_layer(model) is not None else "trained: the model has no nn.Linear layer to hold"


def held_layer(model, use: str | None) -> HeldLayer | None:
    """The stage's ``HeldLayer`` where its record (``head_use``) says ``held``, else None."""
    return HeldLayer(classifier_layer(model)) if use == "held" else None


def refresh_extra(extra: torch.Tensor, labels: torch.Tensor, is_poison: torch.Tensor | None, target: int | None,
                  predictions: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Drop the target-labelled extra samples the model (``predictions`` of every training sample) no longer calls
    the target (with no confirmed target, ``None``: every extra sample it no longer gives its label); returns the
    kept extra set and a record.

    The last extra set still holds the poisoned images whose backdoor survived the progressive steps (they looked
    consistent); right after unlearning the backdoor is gone, so those images now flip away from the target while
    genuine target-class images keep it. Without this the mean-teacher epochs re-learn the backdoor from them.
    """
    if target is None:
        drop = predictions[extra] != labels[extra]
    else:
        drop = (labels[extra] == target) & (predictions[extra] != target)
    info = {"dropped": int(drop.sum()), "dropped_poison": poison_count(extra[drop], is_poison),
            "extra_poison_share_before": poison_share(extra, is_poison)}
    kept = extra[~drop]
    info["extra_poison_share_after"] = poison_share(kept, is_poison)
    return kept, info


def refresh_before_teacher(s: DefenseSession, st: PUDState) -> dict:
    inf = s.inf
    preds = s.logits(inf.model).argmax(1)
    st.extra, info = refresh_extra(st.extra, inf.poisoned.train_labels.cpu(), inf.truth,
                                   st.target["used"], preds)
    what = "target-labelled samples no longer predicted as the target" if st.target["used"] is not None else \
        "samples no longer predicted as their label"
    print(f"mean-teacher set: dropped {info['dropped']} {what} ({shown(info['dropped_poison'], 'd')} truly poisoned); "
          f"{shown(info['extra_poison_share_after'], '.3%')} poisoned remain", flush=True)
    return info


# ----- 5. the mean teacher ------------------------------------------------------------------------------------

def teacher_ascent(pud: PUDSettings, st: PUDState) -> dict:
    """Whether the mean-teacher epochs go on ascending on the poison set (``--mt_ascent``), with unlearning's weight,
    and why (for ``summary.json``)."""
    ascent = (st.unlearning or {}).get("ascent", {})
    if not pud.mt_ascent:
        return {"used": False, "lambda": 0.0, "why": "--mt_ascent 0"}
    if not ascent.get("used") or not len(st.poison_set):
        return {"used": False, "lambda": 0.0, "why": "unlearning did not ascend"}
    return {"used": True, "lambda": ascent["lambda"], "classifier_layer": st.unlearning.get("classifier_layer"),
            "why": "unlearning ascended; clean epochs alone let the backdoor back"}


def mean_teacher(s: DefenseSession, st: PUDState, objects: dict) -> None:
    """Mean-teacher fine-tuning on the extra set (with unlearning's ascent, ``teacher_ascent``); the teacher's weights
    and the EMA step are in the state."""
    pud, inf = s.job.pud, s.inf
    model, opt = objects["model"], objects["opt"]
    attack = pud.step_pgd(pud.steps - 1)
    teacher = frozen_copy(model, st.teacher)
    ascent = teacher_ascent(pud, st)
    lam = ascent["lambda"]
    held = held_layer(model, ascent.get("classifier_layer"))
    for e in range(st.epoch, pud.mt_epochs):
        st.epoch_global += 1
        ep = st.epoch_global
        # restarted every epoch, as in unlearning, so that a run resumed at an epoch boundary goes on identically
        poison = PoisonStream(inf.poisoned, st.poison_set, s.job.run.bs, s.gen, inf.augment) if lam > 0 else None
        seen = {"loss": 0.0, "n": 0}

        def loss_fn(i, x, y):
            if pud.mt_adv:
                with stage("train_pgd"):
                    x = attack(teacher, x, y, generator=s.gen)
            if poison is None:
                logits = s.train_model(x)
            else:  # unlearning's ascent goes on: the poison batch joins the clean one
                _, xp, yp = poison.next()
                logits, logits_p = joined_forward(s.train_model, x, xp, s.cl)
            with torch.no_grad():
                t_logits = teacher(x)
            loss = F.cross_entropy(logits, y) + pud.mt_weight * softmax_consistency(logits, t_logits)
            seen["loss"] += loss.item() * len(y)
            seen["n"] += len(y)
            if poison is not None:
                loss = loss - lam * bounded_poison_ce(logits_p, yp, pud.poison_loss_bound)[0]
            return loss, None

        def after_step(i):
            if held:  # before the EMA: the teacher follows the held layer too
                held.restore()
            ema_update(teacher, model, pud.ema_decay, st.gstep)
            st.gstep += 1

        batches = dist.epoch_batches(inf.poisoned, s.job.run.bs, s.gen, inf.augment, indices=st.extra)
        stats = train_epoch(s.train_model, opt, batches, channels_last=s.cl, loss_fn=loss_fn, after_step=after_step,
                            desc=f"mean teacher {e + 1}", stage="pud mean teacher", epoch=ep, what="mean-teacher",
                            timing="mean_teacher")
        dist.sync_buffers(teacher)  # its EMA of the student's per-rank BatchNorm statistics
        rec = {"epoch": ep, "stage": "mean_teacher", **dist.mean_over_ranks({"loss": seen["loss"] / max(seen["n"], 1)}),
               "images": stats["images"], **s.epoch_eval(ep, pud.total_epochs, stage_end=e == pud.mt_epochs - 1)}
        s.log(rec, f"pud mean teacher {e + 1}/{pud.mt_epochs}")
        st.epoch = e + 1
        st.teacher = teacher.state_dict()
        s.save(f"pud mean-teacher epoch {e + 1}", st, **objects)
    if held:
        held.release(opt)
    if pud.return_teacher and pud.mt_epochs > 0:
        model.load_state_dict(teacher.state_dict())
