"""Model-repair defenses: AFT (clean extra set) and progressive PBE (no clean data).

AFT fine-tunes the infected model on a small clean extra set, the first epochs on untargeted PGD
examples of the current model. PBE starts from a random share of the poisoned training set and,
round by round, fine-tunes, scores every training sample by the cosine similarity of the infected
and current models' logits and keeps the most consistent ones as the next extra set.

Departures from the paper code, each an option whose other value is the paper's (see config.py):
round 0's random share is drawn from the samples not labelled as the PGD-estimated target
(``--init_pool non_target``: with a random 5 % the ~10 % all2one poisons among it keep their
target label in PGD copies and re-teach the backdoor); the score subtracts 0.5 on arg-max
disagreement (``--argmax_penalty``, PUD's score); the detector ranks among target-labelled
samples (``--poison_candidates target``) and what it flags stays out of every later extra set
(``--quarantine``). ``--later_lr`` sets the learning rate of rounds >= 1 (default ``--ft_lr``) and
``--round_eps`` the PGD radius of each round (default ``--adv_eps`` throughout; the paper code's dead
line meant 2/255 from round 2 on).
"""
from __future__ import annotations

import torch

from utils.run import distributed as dist
from utils.adversarial import PGD
from utils.defenses.common import (INIT_POOLS, all_logits, bottom_fraction, choose_target, clean_indices, consistency_scores,
                           detection_stats, finetune_epoch, poison_candidates, poison_share, top_fraction)
from utils.run.errors import UserError
from utils.run.plots import plot_curves
from utils.defenses.session import DefenseSession
from utils.training import make_optimizer


def finetune_attack(args, eps: float | None = None) -> PGD:
    """The fine-tuning PGD; ``eps`` replaces ``--adv_eps`` and scales the step (and ``--adv_eps_outside``) with it
    (PBE's per-round radius)."""
    scale = 1.0 if eps is None or args.adv_eps == 0 else eps / args.adv_eps
    return PGD(eps=args.adv_eps if eps is None else eps, alpha=args.adv_alpha * scale, steps=args.adv_steps,
               norm=args.adv_norm, random_start=args.adv_random_start, window=args.adv_window,
               eps_outside=args.adv_eps_outside * scale)


def run_aft(args) -> dict:
    """AFT: fine-tune on a clean extra set, the first ``adv_epochs`` epochs on PGD examples."""
    s = DefenseSession(args, "aft")
    inf = s.inf
    clean = clean_indices(inf.poisoned)
    n_extra = max(1, int(round(args.extra_ratio * len(inf.poisoned))))
    if n_extra > len(clean):
        raise UserError(f"--extra_ratio asks for {n_extra} clean images but only {len(clean)} training images are "
                        "unpoisoned; lower --extra_ratio")
    extra = clean[torch.randperm(len(clean), generator=s.gen)[:n_extra]].sort().values
    opt = make_optimizer(inf.model, args.ft_lr)
    objects = {"model": inf.model, "opt": opt}
    attack = finetune_attack(args)
    data = inf.poisoned.data  # the clean images themselves: extra indices were never poisoned
    with s.ctl:
        c = s.start({"epoch": 0, "extra": extra}, **objects)
        for epoch in range(c["epoch"] + 1, args.aft_epochs + 1):
            adv = epoch <= args.adv_epochs
            stats = finetune_epoch(s.train_model, opt, dist.epoch_batches(data, args.bs, s.gen, indices=c["extra"]),
                                   attack if adv else None, None, inf.augment, s.gen, s.cl, args.clean_weight,
                                   desc=f"aft {epoch}", stage="aft", epoch=epoch)
            rec = {"epoch": epoch, "adversarial": adv, **stats, **s.evaluate()}
            s.log(rec, f"aft epoch {epoch}/{args.aft_epochs}{' (adv)' if adv else ''}")
            c["epoch"] = epoch
            s.save(f"aft epoch {epoch}", c, **objects)
        settings = {"extra_size": n_extra, "extra_ratio": args.extra_ratio, "aft_epochs": args.aft_epochs,
                    "adv_epochs": args.adv_epochs, "lr": args.ft_lr, "pgd": attack.settings(), "clean_weight": args.clean_weight}
        return s.finish(settings)


def run_pbe(args) -> dict:
    """Progressive PBE: rounds of (adversarial) fine-tuning and consistency-based re-selection of the extra set.

    The loop runs from the saved cursor (round, epoch within the round); the carry also holds the extra
    set and the per-round records, so a resumed run continues exactly where the state was saved.
    """
    s = DefenseSession(args, "pbe")
    inf = s.inf
    truth = inf.poisoned.is_poison.cpu()
    labels = inf.poisoned.train_labels.cpu()
    opt = make_optimizer(inf.model, args.ft_lr)  # one optimizer across rounds, as in the paper code
    objects = {"model": inf.model, "opt": opt}
    attacks = [finetune_attack(args, args.round_eps[r] if args.round_eps else None) for r in range(args.rounds)]
    with s.ctl:
        c = s.start({"round": 0, "epoch": 0, "epoch_global": 0, "target": None, "extra": None,
                     "quarantine": torch.zeros(0, dtype=torch.long), "rounds": []}, **objects)
        if c["target"] is None:
            c["target"] = choose_target(s)
            c["extra"] = initial_extra(s, labels, c["target"]["used"])
            s.save("the target estimate", c, **objects)
        candidates = poison_candidates(args.poison_candidates, labels, c["target"]["used"])
        ref_logits = all_logits(inf.reference, inf.poisoned, args.eval_bs, s.cl)
        for r in range(c["round"], args.rounds):
            purity = poison_share(c["extra"], truth)
            if c["epoch"] == 0:
                print(f"round {r}: extra set {len(c['extra'])} samples, {purity:.3%} truly poisoned", flush=True)
            for e in range(c["epoch"], args.round_epochs):
                c["epoch_global"] += 1
                if r == 0:
                    adv_batches = None  # every batch adversarial
                elif e == 0:
                    adv_batches = args.partial_batches
                else:
                    adv_batches = 0
                use = attacks[r] if adv_batches != 0 else None
                for group in opt.param_groups:  # one optimizer across rounds; rounds >= 1 may use --later_lr
                    group["lr"] = round_lr(args, r)
                batches = dist.epoch_batches(inf.poisoned, args.bs, s.gen, inf.augment, indices=c["extra"])
                stats = finetune_epoch(s.train_model, opt, batches, use, adv_batches, None, s.gen, s.cl, args.clean_weight,
                                       desc=f"pbe r{r} e{e + 1}", stage=f"pbe round {r}", epoch=c["epoch_global"])
                rec = {"epoch": c["epoch_global"], "round": r, "adversarial": use is not None, "lr": round_lr(args, r),
                       **stats, **s.evaluate()}
                s.log(rec, f"pbe round {r} epoch {e + 1}/{args.round_epochs}")
                c["epoch"] = e + 1
                s.save(f"pbe round {r} epoch {e + 1}", c, **objects)
            cur_logits = all_logits(inf.model, inf.poisoned, args.eval_bs, s.cl)
            scores = consistency_scores(ref_logits, cur_logits, argmax_penalty=bool(args.argmax_penalty))
            flagged = bottom_fraction(scores, args.detect_fraction, candidates)
            det = detection_stats(flagged, truth)
            if args.quarantine:
                c["quarantine"] = torch.cat([c["quarantine"], flagged]).unique()
            info = {"round": r, "extra_size": len(c["extra"]), "extra_poison_share": purity,
                    "detect_precision": det["precision"], "detect_recall": det["recall"], "detect_fpr": det["fpr"],
                    "poison_still_backdoor": backdoor_hit_rate(cur_logits, labels, truth),
                    **({f"quarantine_{k}": v for k, v in detection_stats(c["quarantine"], truth).items()}
                       if args.quarantine else {}),
                    **{k: s.history[-1][k] for k in ("clean_acc", "asr") if k in s.history[-1]}}
            if r < args.rounds - 1:
                c["extra"] = top_share_outside(scores, args.top_rates[r], c["quarantine"],
                                               labels if args.balanced_selection else None)
                info["next_extra_size"] = len(c["extra"])
                info["next_extra_poison_share"] = poison_share(c["extra"], truth)
            c["rounds"].append(info)
            s.run.log({"round_summary": info, "epoch": c["epoch_global"]})
            if args.quarantine:
                print(f"round {r}: quarantine {info['quarantine_flagged']} samples, precision {info['quarantine_precision']:.3f} "
                      f"recall {info['quarantine_recall']:.3f}", flush=True)
            hit = info["poison_still_backdoor"]
            print(f"round {r}: lowest {args.detect_fraction:.0%} as poison -> precision {det['precision']:.3f} "
                  f"recall {det['recall']:.3f}; poisoned samples still given the backdoor label "
                  f"{'-' if hit is None else f'{hit:.3f}'}" + (f"; next extra set {len(c['extra'])} ({info['next_extra_poison_share']:.3%} "
                                                   "poisoned)" if "next_extra_size" in info else ""), flush=True)
            c.update(round=r + 1, epoch=0)
            s.save(f"pbe round {r}", c, **objects)
        settings = {"init_ratio": args.init_ratio, "rounds": args.rounds, "round_epochs": args.round_epochs,
                    "top_rates": args.top_rates[:args.rounds - 1], "partial_batches": args.partial_batches, "lr": args.ft_lr,
                    "later_lr": args.later_lr if args.later_lr is not None else args.ft_lr,
                    "pgd": [a.settings() for a in attacks], "detect_fraction": args.detect_fraction, "target_label": args.target_label,
                    "init_pool": args.init_pool, "argmax_penalty": args.argmax_penalty, "quarantine": args.quarantine,
                    "poison_candidates": args.poison_candidates}
        plot_rounds(c["rounds"], s.run.file("rounds.png"))
        return s.finish(settings, {"target": c["target"], "rounds": c["rounds"]},
                        panels={"accuracy": ["clean_acc"], "attack success": ["asr"]})


def round_lr(args, r: int) -> float:
    """Round 0 fine-tunes at ``--ft_lr``; later rounds at ``--later_lr`` if given, else also at ``--ft_lr``."""
    return args.ft_lr if r == 0 or args.later_lr is None else args.later_lr


def initial_extra(s: DefenseSession, labels: torch.Tensor, target: int) -> torch.Tensor:
    """Round 0's extra set: a random ``init_ratio`` of the training set's size, drawn from the ``--init_pool`` samples."""
    pool = INIT_POOLS[s.args.init_pool](labels, target)
    if len(pool) == 0:
        raise UserError(f"--init_pool {s.args.init_pool} leaves no training sample (every label is the target {target}); "
                        "use --init_pool all")
    k = min(len(pool), max(1, int(round(s.args.init_ratio * len(labels)))))
    return pool[torch.randperm(len(pool), generator=s.gen)[:k]].sort().values


def top_share_outside(scores: torch.Tensor, fraction: float, excluded: torch.Tensor,
                      labels: torch.Tensor | None = None) -> torch.Tensor:
    """The highest-scored ``fraction`` of all samples (of every label's samples, with ``labels``) that are not
    ``excluded`` (fewer if too few are left), by index."""
    ranked = scores.clone()
    ranked[excluded] = float("-inf")  # ranked last, then dropped: the share stays a share of the whole training set
    sel = top_fraction(ranked, fraction, labels=labels)
    return sel[~torch.isin(sel, excluded)]


def backdoor_hit_rate(logits: torch.Tensor, labels: torch.Tensor, is_poison: torch.Tensor) -> float | None:
    """Share of the truly poisoned training samples the model still gives their backdoor label (a diagnostic)."""
    if not bool(is_poison.any()):
        return None
    return float((logits.argmax(1)[is_poison] == labels[is_poison]).float().mean())


def plot_rounds(rounds: list[dict], path: str) -> None:
    recs = [{"round": r["round"], "extra_poison_share": r["extra_poison_share"], "detect_precision": r["detect_precision"],
             "detect_recall": r["detect_recall"]} for r in rounds]
    plot_curves(recs, path, {"extra-set purity and detection": ["extra_poison_share", "detect_precision", "detect_recall"]},
                x_key="round")
