"""PUD: progressive unlearning defense without clean data (reference §8, with the §11.2 bugs fixed).

1. Estimate the backdoor target (most frequent class of untargeted PGD examples) unless given.
2. SPECTRE on the training samples labelled as the target removes the most suspicious share; the rest is the pool.
3. Progressive steps: (adversarial) fine-tuning on an extra set, then every training sample is scored by the
   consistency of the infected and current logits (arg-max disagreement penalised). The most consistent share of
   the pool becomes the next extra set (cleaned once more by SPECTRE on its target part), the least consistent share
   of all samples the poison set.
4. Machine unlearning (CE on the extra set − λ·bounded CE on the poison set + μ·L1 to a frozen copy).
5. Mean-teacher fine-tuning on the extra set (EMA teacher, softmax consistency).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from utils.adversarial import PGD
from utils.checkpoint import load_checkpoint
from utils.defense import (all_logits, bottom_fraction, clean_indices, consistency_scores, detection_stats, finetune_epoch,
                           poison_share, top_fraction)
from utils.errors import UserError
from utils.mean_teacher import ema_update, make_teacher, softmax_consistency
from utils.session import DefenseSession
from utils.progress import progress
from utils.spectre import layer_representations, spectre_filter
from utils.training import DivergenceError, make_optimizer
from utils.unlearning import unlearning_loss

NO_POISON_INDICES = ("PUD needs the training set's poisoned indices; re-train the infected model with train_blend.py "
                     "--poison_mode fixed (the default)")


def estimate_target(s: DefenseSession) -> dict:
    """Most frequent prediction of the infected model on untargeted PGD examples of random clean training images."""
    args, inf = s.args, s.inf
    data = inf.poisoned.data
    n = min(args.target_images, len(data.y))
    idx = torch.randperm(len(data.y), generator=s.gen)[:n].sort().values
    attack = PGD(eps=args.target_eps, alpha=args.target_eps / 4, steps=10, random_start=False)
    preds = []
    for _, x, y in data.batches(args.eval_bs, shuffle=False, indices=idx):
        if s.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x_adv = attack(inf.reference, x, y, generator=s.gen)
        with torch.no_grad():
            preds.append(inf.reference(x_adv).argmax(1).cpu())
    counts = torch.bincount(torch.cat(preds), minlength=inf.backdoor.num_classes)
    est = int(counts.argmax())
    return {"estimate": est, "vote_share": float(counts[est]) / max(n, 1), "images": n, "pgd": attack.settings()}


def spectre_remove(s: DefenseSession, indices: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (subset of ``indices``) SPECTRE flags on the infected model's representations, without augmentation."""
    inf = s.inf
    batches = (x for _, x, _ in inf.poisoned.batches(s.args.eval_bs, shuffle=False, indices=indices))
    try:
        reps = layer_representations(inf.reference, s.args.spectre_layer, batches)
    except ValueError as e:
        raise UserError(f"--spectre_layer: {e}") from None
    res = spectre_filter(reps.double(), fraction)
    return indices[res.flagged_mask.cpu()].sort().values


def spectre_record(removed: torch.Tensor, considered: int, truth: torch.Tensor) -> dict:
    return {"considered": considered, "removed": len(removed),
            "precision": poison_share(removed, truth) if len(removed) else None,
            "removed_poison": int(truth[removed].sum()) if len(removed) else 0}


def run_pud(args) -> dict:
    if load_checkpoint(args.model_path).get("poisoned_indices") is None:  # before any output is written
        raise UserError(NO_POISON_INDICES)
    s = DefenseSession(args, "pud")
    inf = s.inf
    n = len(inf.poisoned)
    truth = inf.poisoned.is_poison.cpu()
    labels = inf.poisoned.train_labels.cpu()
    s.start()

    # 1. target class
    if args.target_label == "auto":
        target = estimate_target(s)
    else:
        target = {"estimate": None, "vote_share": None, "given": int(args.target_label)}
    t = target["estimate"] if args.target_label == "auto" else int(args.target_label)
    target["used"] = t
    target["true"] = inf.backdoor.target_label if inf.ck["attack_mode"] == "all2one" else None
    print(f"target class {t}" + (f" (estimated, vote share {target['vote_share']:.1%})" if args.target_label == "auto" else ""),
          flush=True)

    # 2. initial SPECTRE on the target class
    tidx = torch.nonzero(labels == t).flatten()
    removed = spectre_remove(s, tidx, args.spectre_remove) if len(tidx) > 1 else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    pool = torch.nonzero(keep).flatten()
    spectre_initial = {**spectre_record(removed, len(tidx), truth), "recall": detection_stats(removed, truth)["recall"],
                       "pool_size": len(pool), "pool_poison_share": poison_share(pool, truth)}
    print(f"initial SPECTRE: removed {len(removed)} of {len(tidx)} target-labelled samples "
          f"({spectre_initial['removed_poison']} truly poisoned); pool {len(pool)}", flush=True)

    # 3. progressive steps
    if args.model_repair:
        clean = clean_indices(inf.poisoned)
        pick = clean
    else:
        pick = pool
    k0 = max(1, int(round(args.init_ratio * len(pick))))
    extra = pick[torch.randperm(len(pick), generator=s.gen)[:k0]].sort().values
    poison_set = torch.zeros(0, dtype=torch.long)
    ref_logits = all_logits(inf.reference, inf.poisoned, args.eval_bs, s.cl)
    model = inf.model
    opt = make_optimizer(model, args.pud_lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.pud_milestones, gamma=0.1)
    steps = []
    epoch_global = 0
    attack = None
    for st in range(args.steps):
        attack = PGD(eps=args.step_eps[st], alpha=args.step_eps[st] / args.step_alpha_div[st], steps=args.step_pgd_steps,
                     random_start=False)
        info = {"step": st, "extra_size": len(extra), "extra_poison_share": poison_share(extra, truth),
                "spectre": None}
        # per-step SPECTRE on the extra set's target part (steps >= 1)
        if st > 0:
            ext_t = extra[labels[extra] == t]
            if len(ext_t) >= args.spectre_min:
                rm = spectre_remove(s, ext_t, args.spectre_step_remove)
                extra = extra[~torch.isin(extra, rm)]
                info["spectre"] = spectre_record(rm, len(ext_t), truth)
            else:
                info["spectre"] = {"considered": len(ext_t), "removed": 0, "skipped": True}
            info["extra_size_after_spectre"] = len(extra)
            info["extra_poison_share_after_spectre"] = poison_share(extra, truth)
        print(f"step {st}: extra set {len(extra)} samples, {poison_share(extra, truth):.3%} truly poisoned", flush=True)
        partial = bool(args.step_partial[st])
        for e in range(args.step_epochs[st]):
            epoch_global += 1
            adv = e < args.step_adv_epochs[st]
            adv_batches = (args.partial_batches if partial else None) if adv else 0
            stats = finetune_epoch(model, opt, inf.poisoned.batches(args.bs, shuffle=True, generator=s.gen, indices=extra,
                                                                    augment=inf.augment),
                                   attack if adv else None, adv_batches, None, s.gen, s.cl, desc=f"pud s{st} e{e + 1}")
            sched.step()
            last = e == args.step_epochs[st] - 1
            rec = {"epoch": epoch_global, "step": st, "adversarial": adv, "lr": opt.param_groups[0]["lr"], **stats,
                   **s.evaluate(robust=last)}
            s.log(rec, f"pud step {st} epoch {e + 1}/{args.step_epochs[st]}{' (adv)' if adv else ''}")
        if args.step_epochs[st] == 0:
            rec = {"epoch": epoch_global, "step": st, **s.evaluate(robust=True)}
            s.log(rec, f"pud step {st} (no epochs)")
        # score every training sample; next extra set from the pool, poison set from all samples
        scores = consistency_scores(ref_logits, all_logits(model, inf.poisoned, args.eval_bs, s.cl), argmax_penalty=True)
        poison_set = bottom_fraction(scores, args.poison_fraction)
        det = detection_stats(poison_set, truth)
        info.update({"poison_set_size": len(poison_set), "poison_precision": det["precision"], "poison_recall": det["recall"],
                     **{k: s.history[-1].get(k) for k in ("clean_acc", "asr", "robust_acc")}})
        if st < args.steps - 1:
            extra = top_fraction(scores, args.top_rates[st], among=pool)
            info["next_extra_size"] = len(extra)
            info["next_extra_poison_share"] = poison_share(extra, truth)
        steps.append(info)
        s.run.log({"step_summary": info, "epoch": epoch_global})
        print(f"step {st}: poison set {len(poison_set)} precision {det['precision']:.3f} recall {det['recall']:.3f}", flush=True)

    # 4. machine unlearning on the last extra set (clean part) and the poison set
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    unlearning = {"epochs": args.unlearn_epochs, "extra_size": len(extra), "poison_set_size": len(poison_set),
                  "clipped_batches": 0, "batches": 0, "history": []}
    for e in range(args.unlearn_epochs):
        epoch_global += 1
        parts_sum = {"clean_ce": 0.0, "poison_ce": 0.0, "loss": 0.0}
        nb = 0
        model.train()
        poison_iter = iter(())
        for _, xc, yc in progress(inf.poisoned.batches(args.bs, shuffle=True, generator=s.gen, indices=extra,
                                                       augment=inf.augment), desc=f"unlearn {e + 1}"):
            batch = next(poison_iter, None)
            if batch is None:
                poison_iter = iter(inf.poisoned.batches(args.bs, shuffle=True, generator=s.gen, indices=poison_set,
                                                        augment=inf.augment))
                batch = next(poison_iter)
            _, xp, yp = batch
            x = torch.cat([xc, xp])
            if s.cl:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            loss, parts = unlearning_loss(logits[:len(yc)], yc, logits[len(yc):], yp, model, reference,
                                          lam=args.unlearn_lambda, mu=args.unlearn_mu,
                                          poison_loss_bound=args.poison_loss_bound)
            if not math.isfinite(parts["loss"]):
                raise DivergenceError(f"non-finite unlearning loss ({parts['loss']}) at batch {nb} of unlearning epoch {e + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k in parts_sum:
                parts_sum[k] += parts[k]
            unlearning["clipped_batches"] += int(parts["poison_clipped"])
            nb += 1
        unlearning["batches"] += nb
        rec = {"epoch": epoch_global, "stage": "unlearning", **{k: v / max(nb, 1) for k, v in parts_sum.items()},
               **s.evaluate()}
        unlearning["history"].append({k: rec[k] for k in ("epoch", "clean_ce", "poison_ce", "loss", "clean_acc", "asr")
                                      if k in rec})
        s.log(rec, f"pud unlearning {e + 1}/{args.unlearn_epochs}")
    unlearning["clipped"] = unlearning["clipped_batches"] > 0

    # 5. mean teacher
    teacher = make_teacher(model)
    gstep = 0
    for e in range(args.mt_epochs):
        epoch_global += 1
        model.train()
        loss_sum, n_seen = 0.0, 0
        for _, x, y in progress(inf.poisoned.batches(args.bs, shuffle=True, generator=s.gen, indices=extra,
                                                     augment=inf.augment), desc=f"mean teacher {e + 1}"):
            if s.cl:
                x = x.contiguous(memory_format=torch.channels_last)
            if args.mt_adv:
                x = attack(teacher, x, y, generator=s.gen)
            logits = model(x)
            with torch.no_grad():
                t_logits = teacher(x)
            loss = F.cross_entropy(logits, y) + args.mt_weight * softmax_consistency(logits, t_logits)
            if not math.isfinite(loss.item()):
                raise DivergenceError(f"non-finite mean-teacher loss ({loss.item()}) in epoch {e + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(teacher, model, args.ema_decay, gstep)
            gstep += 1
            loss_sum += loss.item() * len(y)
            n_seen += len(y)
        rec = {"epoch": epoch_global, "stage": "mean_teacher", "loss": loss_sum / max(n_seen, 1), **s.evaluate()}
        s.log(rec, f"pud mean teacher {e + 1}/{args.mt_epochs}")
    if args.return_teacher and args.mt_epochs > 0:
        model.load_state_dict(teacher.state_dict())

    settings = {k: getattr(args, k) for k in (
        "target_label", "target_eps", "target_images", "spectre_layer", "spectre_remove", "spectre_step_remove",
        "spectre_min", "steps", "step_epochs", "step_adv_epochs", "step_partial", "step_eps", "step_alpha_div",
        "step_pgd_steps", "partial_batches", "init_ratio", "top_rates", "poison_fraction", "pud_lr", "pud_milestones",
        "unlearn_epochs", "unlearn_lambda", "unlearn_mu", "poison_loss_bound", "mt_epochs", "mt_weight", "ema_decay",
        "mt_adv", "return_teacher", "model_repair")}
    return s.finish(settings, {"target": target, "spectre_initial": spectre_initial, "steps": steps,
                               "unlearning": unlearning},
                    panels={"accuracy": ["clean_acc", "robust_acc"], "attack success": ["asr"]})
