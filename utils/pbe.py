"""Model-repair defenses: AFT (clean extra set) and progressive PBE (no clean data).

AFT fine-tunes the infected model on a small clean extra set, the first epochs on untargeted PGD
examples of the current model. PBE starts from a random share of the poisoned training set and,
round by round, fine-tunes, scores every training sample by the cosine similarity of the infected
and current models' logits and keeps the most consistent ones as the next extra set.
"""
from __future__ import annotations

import time

import torch

from utils.adversarial import PGD
from utils.attack import checkpoint_payload, log_line
from utils.checkpoint import save_checkpoint
from utils.defense import (InfectedRun, all_logits, bottom_fraction, clean_indices, consistency_scores, detection_stats,
                           finetune_epoch, load_infected, poison_share, top_fraction)
from utils.evaluation import evaluate
from utils.plots import plot_curves
from utils.robust import robust_acc_from_args
from utils.runlog import RunDir, check_out_dir
from utils.runtime import pick_device, seed_everything
from utils.training import make_optimizer


class DefenseSession:
    """Set-up, evaluation and outputs shared by the defense scripts (AFT, PBE, PUD)."""

    def __init__(self, args, name: str):
        self.args, self.name = args, name
        self.device = pick_device(args.device)
        check_out_dir(args.out_dir, args.overwrite)
        self.gen = seed_everything(args.seed)
        self.inf: InfectedRun = load_infected(args, self.device)
        self.cl = args.channels_last != "off"
        self.run = RunDir(args.out_dir)
        self.t0 = time.time()
        self.history: list[dict] = []

    def start(self) -> dict:
        self.run.start(dict(vars(self.args), defense=self.name, device_used=str(self.device)))
        print(f"{self.name}: {self.inf.ck['trigger']['type']} {self.inf.ck['attack_mode']} {self.inf.ck['dataset']} "
              f"model from {self.args.model_path} on {self.device}; writing to {self.args.out_dir}", flush=True)
        self.initial = self.evaluate(robust=True)
        print(log_line("initial", self.initial), flush=True)
        return self.initial

    def evaluate(self, robust: bool = False) -> dict:
        m = self.inf.model
        out = evaluate(m, self.inf.test, self.inf.backdoor, self.args.eval_bs, generator=self.gen, channels_last=self.cl)
        if robust:
            out.update(robust_acc_from_args(m, self.inf.test, self.args))
        return out

    def log(self, rec: dict, prefix: str) -> None:
        rec["seconds"] = round(time.time() - self.t0, 2)
        self.history.append(rec)
        self.run.log(rec)
        print(log_line(prefix, rec), flush=True)

    def finish(self, settings: dict, extra_summary: dict | None = None, panels: dict | None = None) -> dict:
        final = self.evaluate(robust=True)
        keys = ("clean_acc", "asr", "asr_incl_target", "robust_acc", "noise_acc")
        summary = {"defense": self.name, "initial": {k: self.initial[k] for k in keys if k in self.initial},
                   "final": {k: final[k] for k in keys if k in final}, "robust_eval": final.get("robust_eval"),
                   "settings": settings, "seconds": round(time.time() - self.t0, 2), **(extra_summary or {})}
        inf = self.inf
        payload = checkpoint_payload(inf.attack_args, inf.model, inf.backdoor, inf.poisoned, inf.ck.get("train_indices"),
                                     summary["final"], {"defense": {"name": self.name, "settings": settings,
                                                                    "history": self.history, "source": self.args.model_path}})
        save_checkpoint(self.run.file("model.pt"), payload)
        plot_curves(self.run.records(), self.run.file("curves.png"),
                    panels or {"accuracy": ["clean_acc", "robust_acc"], "attack success": ["asr"]})
        self.run.write_json("summary.json", summary)
        print(log_line(f"final ({summary['seconds']:.0f}s)", summary["final"]) + f" | {self.args.out_dir}", flush=True)
        return summary


def finetune_attack(args) -> PGD:
    return PGD(eps=args.adv_eps, alpha=args.adv_alpha, steps=args.adv_steps, random_start=args.adv_random_start)


def run_aft(args) -> dict:
    """AFT: fine-tune on a clean extra set, the first ``adv_epochs`` epochs on PGD examples."""
    s = DefenseSession(args, "aft")
    inf = s.inf
    clean = clean_indices(inf.poisoned)
    n_extra = max(1, int(round(args.extra_ratio * len(inf.poisoned))))
    if n_extra > len(clean):
        raise_extra(n_extra, len(clean))
    extra = clean[torch.randperm(len(clean), generator=s.gen)[:n_extra]].sort().values
    s.start()
    opt = make_optimizer(inf.model, args.ft_lr)
    attack = finetune_attack(args)
    data = inf.poisoned.data  # the clean images themselves: extra indices were never poisoned
    for epoch in range(1, args.aft_epochs + 1):
        adv = epoch <= args.adv_epochs
        stats = finetune_epoch(inf.model, opt, data.batches(args.bs, shuffle=True, generator=s.gen, indices=extra),
                               attack if adv else None, None, inf.augment, s.gen, s.cl, args.clean_weight,
                               desc=f"aft {epoch}")
        rec = {"epoch": epoch, "adversarial": adv, **stats, **s.evaluate()}
        s.log(rec, f"aft epoch {epoch}/{args.aft_epochs}{' (adv)' if adv else ''}")
    settings = {"extra_size": n_extra, "extra_ratio": args.extra_ratio, "aft_epochs": args.aft_epochs,
                "adv_epochs": args.adv_epochs, "lr": args.ft_lr, "pgd": attack.settings(), "clean_weight": args.clean_weight}
    return s.finish(settings)


def raise_extra(need: int, have: int):
    from utils.errors import UserError

    raise UserError(f"--extra_ratio asks for {need} clean images but only {have} training images are unpoisoned; lower --extra_ratio")


def run_pbe(args) -> dict:
    """Progressive PBE: rounds of (adversarial) fine-tuning and consistency-based re-selection of the extra set."""
    s = DefenseSession(args, "pbe")
    inf = s.inf
    n = len(inf.poisoned)
    truth = inf.poisoned.is_poison.cpu()
    extra = torch.randperm(n, generator=s.gen)[:max(1, int(round(args.init_ratio * n)))].sort().values
    s.start()
    ref_logits = all_logits(inf.reference, inf.poisoned, args.eval_bs, s.cl)
    opt = make_optimizer(inf.model, args.ft_lr)  # one optimizer across rounds, as in the paper code
    attack = finetune_attack(args)
    rounds = []
    epoch_global = 0
    for r in range(args.rounds):
        purity = poison_share(extra, truth)
        print(f"round {r}: extra set {len(extra)} samples, {purity:.3%} truly poisoned", flush=True)
        for e in range(args.round_epochs):
            epoch_global += 1
            if r == 0:
                adv_batches = None  # every batch adversarial
            elif e == 0:
                adv_batches = args.partial_batches
            else:
                adv_batches = 0
            use = attack if adv_batches != 0 else None
            stats = finetune_epoch(inf.model, opt, inf.poisoned.batches(args.bs, shuffle=True, generator=s.gen, indices=extra,
                                                                        augment=inf.augment),
                                   use, adv_batches, None, s.gen, s.cl, args.clean_weight, desc=f"pbe r{r} e{e + 1}")
            rec = {"epoch": epoch_global, "round": r, **stats, **s.evaluate()}
            s.log(rec, f"pbe round {r} epoch {e + 1}/{args.round_epochs}")
        scores = consistency_scores(ref_logits, all_logits(inf.model, inf.poisoned, args.eval_bs, s.cl))
        det = detection_stats(bottom_fraction(scores, args.detect_fraction), truth)
        info = {"round": r, "extra_size": len(extra), "extra_poison_share": purity,
                "detect_precision": det["precision"], "detect_recall": det["recall"], "detect_fpr": det["fpr"],
                **{k: s.history[-1][k] for k in ("clean_acc", "asr") if k in s.history[-1]}}
        if r < args.rounds - 1:
            extra = top_fraction(scores, args.top_rates[r])
            info["next_extra_size"] = len(extra)
            info["next_extra_poison_share"] = poison_share(extra, truth)
        rounds.append(info)
        s.run.log({"round_summary": info, "epoch": epoch_global})
        print(f"round {r}: lowest {args.detect_fraction:.0%} as poison -> precision {det['precision']:.3f} "
              f"recall {det['recall']:.3f}" + (f"; next extra set {len(extra)} ({info['next_extra_poison_share']:.3%} poisoned)"
                                               if "next_extra_size" in info else ""), flush=True)
    settings = {"init_ratio": args.init_ratio, "rounds": args.rounds, "round_epochs": args.round_epochs,
                "top_rates": args.top_rates[:args.rounds - 1], "partial_batches": args.partial_batches, "lr": args.ft_lr,
                "pgd": attack.settings(), "detect_fraction": args.detect_fraction}
    summary = s.finish(settings, {"rounds": rounds}, panels={"accuracy": ["clean_acc"], "attack success": ["asr"]})
    plot_rounds(rounds, s.run.file("rounds.png"))
    return summary


def plot_rounds(rounds: list[dict], path: str) -> None:
    recs = [{"round": r["round"], "extra_poison_share": r["extra_poison_share"], "detect_precision": r["detect_precision"],
             "detect_recall": r["detect_recall"]} for r in rounds]
    plot_curves(recs, path, {"extra-set purity and detection": ["extra_poison_share", "detect_precision", "detect_recall"]},
                x_key="round")
