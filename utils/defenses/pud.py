"""PUD: progressive unlearning defense without clean data (reference §8, with the §11.2 bugs fixed).

1. Estimate the backdoor target (most frequent class of untargeted PGD examples) unless given.
2. SPECTRE on the training samples labelled as the target removes the most suspicious share and (``--class_split``,
   this toolkit's addition, ``utils.defenses.class_split``) a two-way split of that class removes the cluster that looks
   like images of the other classes; the rest is the pool.
3. Progressive steps: (adversarial) fine-tuning on an extra set, then every training sample is scored by the
   consistency of the infected and current logits (arg-max disagreement penalised). The most consistent share of
   the pool becomes the next extra set (cleaned once more by SPECTRE on its target part), the least consistent share
   of all samples the poison set.
4. Machine unlearning (CE on the extra set − λ·bounded CE on the poison set + μ·L1 to a frozen copy).
5. Mean-teacher fine-tuning on the extra set (EMA teacher, softmax consistency).

Under torchrun every training epoch is data-parallel (each rank its share of the extra set, and in
unlearning of the poison set; DDP averages the gradients); scores, SPECTRE flags, the class split and
selections are rank 0's, broadcast.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from utils.run import distributed as dist
from utils.adversarial import PGD
from utils.run.checkpoint import load_checkpoint
from utils.defenses.class_split import split_target_class
from utils.defenses.common import (all_logits, bottom_fraction, choose_target, clean_indices, consistency_scores, detection_stats,
                           finetune_epoch, poison_candidates, poison_share, top_fraction)
from utils.run.errors import UserError
from utils.defenses.mean_teacher import ema_update, make_teacher, softmax_consistency
from utils.defenses.session import DefenseSession
from utils.run.progress import progress
from utils.defenses.spectre import layer_representations, spectre_filter
from utils.training import batch_start, checked_loss, make_optimizer
from utils.defenses.unlearning import unlearning_loss

NO_POISON_INDICES = ("PUD needs the training set's poisoned indices; re-train the infected model with train_blend.py "
                     "--poison_mode fixed (the default)")


def representations(s: DefenseSession, indices: torch.Tensor) -> torch.Tensor:
    """The infected model's ``--spectre_layer`` outputs of the training samples ``indices``, without augmentation."""
    batches = (x for _, x, _ in s.inf.poisoned.batches(s.args.eval_bs, shuffle=False, indices=indices))
    try:
        return layer_representations(s.inf.reference, s.args.spectre_layer, batches)
    except ValueError as e:
        raise UserError(f"--spectre_layer: {e}") from None


def spectre_remove(s: DefenseSession, indices: torch.Tensor, fraction: float,
                   reps: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (subset of ``indices``) SPECTRE flags on the infected model's representations."""
    reps = representations(s, indices) if reps is None else reps
    res = spectre_filter(reps.double(), fraction)
    return dist.broadcast(indices[res.flagged_mask.cpu()].sort().values)  # torchrun: rank 0's (a fixed count)


def split_remove(s: DefenseSession, indices: torch.Tensor, target: int, reps: torch.Tensor,
                 truth: torch.Tensor) -> tuple:
    """The target class's suspicious cluster (``utils.defenses.class_split``): its indices and a record for the summary."""
    logits = all_logits(s.inf.reference, s.inf.poisoned, s.args.eval_bs, s.cl)[indices]  # the same on every rank
    # its own seeded generator: a split that is not applied leaves the run identical to --class_split 0
    res = split_target_class(reps, logits, target, min_spread=s.args.class_split_spread,
                             confidence_tie=s.args.class_split_tie,
                             generator=torch.Generator().manual_seed(s.args.seed))
    flagged = indices[dist.broadcast(res.flagged_mask.to(torch.uint8)).bool()]  # torchrun: rank 0's cluster
    rec = {**spectre_record(flagged, len(indices), truth), "recall": detection_stats(flagged, truth)["recall"],
           "applied": res.applied, "cluster_sizes": list(res.sizes),
           "cluster_confidence": [round(c, 4) for c in res.confidence], "cluster_spread": [round(c, 2) for c in res.spread],
           "suspicious_cluster": res.flagged_cluster, "separation": round(res.separation, 3)}
    return flagged, rec


def spectre_record(removed: torch.Tensor, considered: int, truth: torch.Tensor) -> dict:
    return {"considered": considered, "removed": len(removed),
            "precision": poison_share(removed, truth) if len(removed) else None,
            "removed_poison": int(truth[removed].sum()) if len(removed) else 0}


STAGES = ("target", "spectre", "steps", "unlearning", "mean_teacher", "done")


def step_attack(args, st: int) -> PGD:
    return PGD(eps=args.step_eps[st], alpha=args.step_eps[st] / args.step_alpha_div[st], steps=args.step_pgd_steps,
               random_start=False)


def frozen_copy(model: torch.nn.Module, state_dict: dict | None = None) -> torch.nn.Module:
    """A frozen eval-mode copy of ``model`` (optionally with saved weights): the unlearning reference."""
    ref = copy.deepcopy(model).eval()
    if state_dict is not None:
        ref.load_state_dict(state_dict)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def initial_carry() -> dict:
    """PUD's loop cursor and loop-carried values: everything a resumed run needs besides model/optimizer/scheduler."""
    return {"stage": "target", "epoch_global": 0, "target": None, "spectre_initial": None, "pool": None,
            "filtered": None, "extra": None, "poison_set": torch.zeros(0, dtype=torch.long), "step": 0, "epoch": 0,
            "step_info": None, "steps": [], "unlearning": None, "mt_refresh": None, "reference": None, "teacher": None, "gstep": 0}


def run_pud(args) -> dict:
    """PUD, stage by stage; each stage runs from the saved cursor in the carry (see ``initial_carry``)."""
    if load_checkpoint(args.model_path).get("poisoned_indices") is None:  # before any output is written
        raise UserError(NO_POISON_INDICES)
    s = DefenseSession(args, "pud")
    model = s.inf.model
    opt = make_optimizer(model, args.pud_lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.pud_milestones, gamma=0.1)
    objects = {"model": model, "opt": opt, "sched": sched}
    with s.ctl:
        c = s.start(initial_carry(), **objects)
        if c["stage"] == "target":
            c["target"] = choose_target(s)
            c["stage"] = "spectre"
            s.save("the target estimate", c, **objects)
        if c["stage"] == "spectre":
            initial_spectre(s, c)
            c["stage"] = "steps"
            s.save("the initial SPECTRE", c, **objects)
        if c["stage"] == "steps":
            progressive_steps(s, c, objects)
            c.update(stage="unlearning", epoch=0)
            s.save("the progressive steps", c, **objects)
        if c["stage"] == "unlearning":
            unlearn(s, c, objects)
            if args.mt_refresh:
                c["mt_refresh"] = refresh_extra(s, c, objects["model"])
            c.update(stage="mean_teacher", epoch=0, reference=None)
            s.save("unlearning", c, **objects)
        if c["stage"] == "mean_teacher":
            mean_teacher(s, c, objects)
        settings = {k: getattr(args, k) for k in (
            "target_label", "target_eps", "target_images", "spectre_layer", "spectre_remove", "spectre_step_remove",
            "spectre_min", "class_split", "class_split_spread", "class_split_tie", "steps", "step_epochs",
            "step_adv_epochs", "step_partial", "step_eps", "step_alpha_div", "step_pgd_steps", "partial_batches",
            "init_ratio", "top_rates", "poison_fraction", "poison_candidates", "balanced_selection", "mt_refresh", "pud_lr", "pud_milestones",
            "unlearn_epochs", "unlearn_lambda", "unlearn_mu", "poison_loss_bound", "mt_epochs", "mt_weight", "ema_decay",
            "mt_adv", "return_teacher", "model_repair")}
        return s.finish(settings, {"target": c["target"], "spectre_initial": c["spectre_initial"], "steps": c["steps"],
                                   "unlearning": c["unlearning"], "mt_refresh": c["mt_refresh"]},
                        panels={"accuracy": ["clean_acc", "robust_acc"], "attack success": ["asr"]},
                        more_rows=[(step_records(c["steps"], c["spectre_initial"]), STEP_PANELS, "step")])


STEP_PANELS = {"per step: accuracy and attack": ["clean_acc", "robust_acc", "asr"],
               "per step: filtering": ["extra_poison_share", "poison_precision", "poison_recall"],
               "per step: SPECTRE": ["spectre_precision", "spectre_removed_share"]}


def step_records(steps: list[dict], spectre_initial: dict | None) -> list[dict]:
    """One record per progressive step for curves.png's second row (all fractions).

    ``extra_poison_share``: the share of poisoned images in the set the step trained on (after its SPECTRE);
    ``poison_*``: the step's identified poison set; ``spectre_*``: the step's SPECTRE on the extra set's target
    part (step 0: the initial filtering, class split included), its precision and the share it removed.
    """
    recs = []
    for info in steps:
        if info["step"] == 0:  # the initial filtering: SPECTRE and the class split together
            sp = spectre_initial or {}
            removed, precision = sp.get("filtered"), sp.get("filtered_precision")
        else:
            sp = info.get("spectre") or {}
            removed, precision = sp.get("removed"), sp.get("precision")
        recs.append({"step": info["step"],
                     "extra_poison_share": info.get("extra_poison_share_after_spectre", info["extra_poison_share"]),
                     **{k: info.get(k) for k in ("poison_precision", "poison_recall", "clean_acc", "robust_acc", "asr")},
                     "spectre_precision": precision,
                     "spectre_removed_share": removed / sp["considered"] if removed is not None and sp["considered"]
                     else None})
    return recs


def initial_spectre(s: DefenseSession, c: dict) -> None:
    """2. SPECTRE on the target-labelled samples; the rest is the pool. Also draws the step-0 extra set."""
    args, inf = s.args, s.inf
    n = len(inf.poisoned)
    truth = inf.poisoned.is_poison.cpu()
    tidx = torch.nonzero(inf.poisoned.train_labels.cpu() == c["target"]["used"]).flatten()
    removed, reps = torch.zeros(0, dtype=torch.long), None
    if len(tidx) > 1:
        reps = representations(s, tidx)  # read once: SPECTRE and the class split use the same representations
        removed = spectre_remove(s, tidx, args.spectre_remove, reps)
    record = {**spectre_record(removed, len(tidx), truth), "recall": detection_stats(removed, truth)["recall"]}
    print(f"initial SPECTRE: removed {len(removed)} of {len(tidx)} target-labelled samples "
          f"({record['removed_poison']} truly poisoned)", flush=True)
    if args.class_split and reps is not None:
        split, record["class_split"] = split_remove(s, tidx, c["target"]["used"], reps, truth)
        sp = record["class_split"]
        print(f"target-class split: clusters {sp['cluster_sizes']}, non-target confidence {sp['cluster_confidence']}, "
              f"spread over {sp['cluster_spread']} classes; " + (
                  f"removed cluster {sp['suspicious_cluster']}: {sp['removed']} samples "
                  f"({sp['removed_poison']} truly poisoned)"
                  if sp["applied"] else "not applied (the more confident cluster does not spread over more classes)"),
              flush=True)
        removed = torch.unique(torch.cat([removed, split]))
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    pool = torch.nonzero(keep).flatten()
    c["pool"], c["filtered"] = pool, removed
    c["spectre_initial"] = {**record, "filtered": len(removed), "filtered_precision": poison_share(removed, truth),
                            "filtered_recall": detection_stats(removed, truth)["recall"],
                            "pool_size": len(pool), "pool_poison_share": poison_share(pool, truth)}
    print(f"pool {len(pool)} samples, {c['spectre_initial']['pool_poison_share']:.3%} truly poisoned", flush=True)
    pick = clean_indices(inf.poisoned) if args.model_repair else pool
    k0 = max(1, int(round(args.init_ratio * len(pick))))
    c["extra"] = pick[torch.randperm(len(pick), generator=s.gen)[:k0]].sort().values


def progressive_steps(s: DefenseSession, c: dict, objects: dict) -> None:
    """3. Progressive steps from the cursor (step, epoch within the step); ``step_info`` marks a started step."""
    args, inf = s.args, s.inf
    model, opt, sched = objects["model"], objects["opt"], objects["sched"]
    truth = inf.poisoned.is_poison.cpu()
    labels = inf.poisoned.train_labels.cpu()
    t = c["target"]["used"]
    ref_logits = all_logits(inf.reference, inf.poisoned, args.eval_bs, s.cl)
    candidates = poison_candidates(args.poison_candidates, labels, t, c["filtered"])
    for st in range(c["step"], args.steps):
        attack = step_attack(args, st)
        if c["step_info"] is None:  # the step's start: per-step SPECTRE on the extra set's target part (steps >= 1)
            extra = c["extra"]
            info = {"step": st, "extra_size": len(extra), "extra_poison_share": poison_share(extra, truth), "spectre": None}
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
            c["extra"], c["step_info"] = extra, info
            print(f"step {st}: extra set {len(extra)} samples, {poison_share(extra, truth):.3%} truly poisoned", flush=True)
        info = c["step_info"]
        partial = bool(args.step_partial[st])
        for e in range(c["epoch"], args.step_epochs[st]):
            c["epoch_global"] += 1
            adv = e < args.step_adv_epochs[st]
            adv_batches = (args.partial_batches if partial else None) if adv else 0
            batches = dist.epoch_batches(inf.poisoned, args.bs, s.gen, inf.augment, indices=c["extra"])
            stats = finetune_epoch(s.train_model, opt, batches, attack if adv else None, adv_batches, None, s.gen, s.cl,
                                   desc=f"pud s{st} e{e + 1}", stage=f"pud step {st}", epoch=c["epoch_global"])
            sched.step()
            last = e == args.step_epochs[st] - 1
            rec = {"epoch": c["epoch_global"], "step": st, "adversarial": adv, "lr": opt.param_groups[0]["lr"], **stats,
                   **s.evaluate(robust=last)}
            s.log(rec, f"pud step {st} epoch {e + 1}/{args.step_epochs[st]}{' (adv)' if adv else ''}")
            c["epoch"] = e + 1
            s.save(f"pud step {st} epoch {e + 1}", c, **objects)
        if args.step_epochs[st] == 0:
            rec = {"epoch": c["epoch_global"], "step": st, **s.evaluate(robust=True)}
            s.log(rec, f"pud step {st} (no epochs)")
        # score every training sample; next extra set from the pool, poison set from all samples
        scores = consistency_scores(ref_logits, all_logits(model, inf.poisoned, args.eval_bs, s.cl), argmax_penalty=True)
        c["poison_set"] = bottom_fraction(scores, args.poison_fraction, candidates)
        det = detection_stats(c["poison_set"], truth)
        info.update({"poison_set_size": len(c["poison_set"]), "poison_precision": det["precision"],
                     "poison_recall": det["recall"], **{k: s.history[-1].get(k) for k in ("clean_acc", "asr", "robust_acc")}})
        if st < args.steps - 1:
            c["extra"] = top_fraction(scores, args.top_rates[st], among=c["pool"],
                                      labels=labels if args.balanced_selection else None)
            info["next_extra_size"] = len(c["extra"])
            info["next_extra_poison_share"] = poison_share(c["extra"], truth)
        c["steps"].append(info)
        s.run.log({"step_summary": info, "epoch": c["epoch_global"]})
        print(f"step {st}: poison set {len(c['poison_set'])} precision {det['precision']:.3f} recall {det['recall']:.3f}",
              flush=True)
        c.update(step=st + 1, epoch=0, step_info=None)
        if st < args.steps - 1:
            s.save(f"pud step {st}", c, **objects)


def unlearn(s: DefenseSession, c: dict, objects: dict) -> None:
    """4. Machine unlearning on the last extra set and the poison set, against a frozen copy saved in the carry."""
    args, inf = s.args, s.inf
    model, opt = objects["model"], objects["opt"]
    extra, poison_set = c["extra"], c["poison_set"]
    reference = frozen_copy(model, c["reference"])  # the copy taken when unlearning began, also after a resume
    c["reference"] = reference.state_dict()
    if c["unlearning"] is None:
        c["unlearning"] = {"epochs": args.unlearn_epochs, "extra_size": len(extra), "poison_set_size": len(poison_set),
                           "clipped_batches": 0, "batches": 0, "history": []}
    unlearning = c["unlearning"]
    for e in range(c["epoch"], args.unlearn_epochs):
        c["epoch_global"] += 1
        ep = c["epoch_global"]
        parts_sum = {"clean_ce": 0.0, "poison_ce": 0.0, "loss": 0.0}
        nb = images = 0
        model.train()
        poison_iter = iter(())
        for _, xc, yc in progress(dist.epoch_batches(inf.poisoned, args.bs, s.gen, inf.augment, indices=extra),
                                  desc=f"unlearn {e + 1}"):
            batch_start("pud unlearning", ep, nb)
            batch = next(poison_iter, None)
            if batch is None:  # torchrun: every rank restarts its poison shard at the same batch (equal shards)
                poison_iter = iter(dist.epoch_batches(inf.poisoned, args.bs, s.gen, inf.augment, indices=poison_set))
                batch = next(poison_iter)
            _, xp, yp = batch
            x = torch.cat([xc, xp])
            if s.cl:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = s.train_model(x)  # DDP under torchrun: each rank its shard, gradients averaged
            loss, parts = unlearning_loss(logits[:len(yc)], yc, logits[len(yc):], yp, model, reference,
                                          lam=args.unlearn_lambda, mu=args.unlearn_mu,
                                          poison_loss_bound=args.poison_loss_bound)
            loss = checked_loss(loss, "pud unlearning", ep, nb, what="unlearning")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k in parts_sum:
                parts_sum[k] += parts[k]
            unlearning["clipped_batches"] += int(parts["poison_clipped"])
            nb += 1
            images += len(yc)
        dist.sync_buffers(model)
        unlearning["batches"] += nb
        parts_mean = dist.mean_over_ranks({k: v / max(nb, 1) for k, v in parts_sum.items()})
        rec = {"epoch": ep, "stage": "unlearning", **parts_mean, "images": images, **s.evaluate()}
        unlearning["history"].append({k: rec[k] for k in ("epoch", "clean_ce", "poison_ce", "loss", "clean_acc", "asr")
                                      if k in rec})
        s.log(rec, f"pud unlearning {e + 1}/{args.unlearn_epochs}")
        c["epoch"] = e + 1
        s.save(f"pud unlearning epoch {e + 1}", c, **objects)
    unlearning["clipped"] = unlearning["clipped_batches"] > 0


def refresh_extra(s: DefenseSession, c: dict, model) -> dict:
    """Between unlearning and the mean teacher: drop target-labelled extra samples the model no longer calls target.

    The last extra set still holds the poisoned images whose backdoor survived the progressive steps (they looked
    consistent); right after unlearning the backdoor is gone, so those images now flip away from the target while
    genuine target-class images keep it. Without this the mean-teacher epochs re-learn the backdoor from them.
    """
    inf, t = s.inf, c["target"]["used"]
    extra = c["extra"]
    pred = all_logits(model, inf.poisoned, s.args.eval_bs, s.cl).argmax(1)[extra]
    drop = (inf.poisoned.train_labels.cpu()[extra] == t) & (pred != t)
    truth = inf.poisoned.is_poison.cpu()
    info = {"dropped": int(drop.sum()), "dropped_poison": int(truth[extra[drop]].sum()),
            "extra_poison_share_before": poison_share(extra, truth)}
    c["extra"] = extra[~drop]
    info["extra_poison_share_after"] = poison_share(c["extra"], truth)
    print(f"mean-teacher set: dropped {info['dropped']} target-labelled samples no longer predicted as the target "
          f"({info['dropped_poison']} truly poisoned); {info['extra_poison_share_after']:.3%} poisoned remain", flush=True)
    return info


def mean_teacher(s: DefenseSession, c: dict, objects: dict) -> None:
    """5. Mean-teacher fine-tuning on the extra set; the teacher's weights and the EMA step are in the carry."""
    args, inf = s.args, s.inf
    model, opt = objects["model"], objects["opt"]
    attack = step_attack(args, args.steps - 1)
    teacher = make_teacher(model)
    if c["teacher"] is not None:
        teacher.load_state_dict(c["teacher"])
    for e in range(c["epoch"], args.mt_epochs):
        c["epoch_global"] += 1
        ep = c["epoch_global"]
        model.train()
        loss_sum, n_seen = 0.0, 0
        for i, (_, x, y) in enumerate(progress(dist.epoch_batches(inf.poisoned, args.bs, s.gen, inf.augment,
                                                                  indices=c["extra"]), desc=f"mean teacher {e + 1}")):
            batch_start("pud mean teacher", ep, i)
            if s.cl:
                x = x.contiguous(memory_format=torch.channels_last)
            if args.mt_adv:
                x = attack(teacher, x, y, generator=s.gen)
            logits = s.train_model(x)
            with torch.no_grad():
                t_logits = teacher(x)
            loss = F.cross_entropy(logits, y) + args.mt_weight * softmax_consistency(logits, t_logits)
            loss = checked_loss(loss, "pud mean teacher", ep, i, what="mean-teacher")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(teacher, model, args.ema_decay, c["gstep"])
            c["gstep"] += 1
            loss_sum += loss.item() * len(y)
            n_seen += len(y)
        dist.sync_buffers(model)
        dist.sync_buffers(teacher)  # its EMA of the student's per-rank BatchNorm statistics
        rec = {"epoch": ep, "stage": "mean_teacher", **dist.mean_over_ranks({"loss": loss_sum / max(n_seen, 1)}),
               "images": n_seen, **s.evaluate()}
        s.log(rec, f"pud mean teacher {e + 1}/{args.mt_epochs}")
        c["epoch"] = e + 1
        c["teacher"] = teacher.state_dict()
        s.save(f"pud mean-teacher epoch {e + 1}", c, **objects)
    if args.return_teacher and args.mt_epochs > 0:
        model.load_state_dict(teacher.state_dict())
