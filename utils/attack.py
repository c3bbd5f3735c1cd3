"""Attack training: train a classifier on a poisoned training set and save the one-file checkpoint."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields

import torch

from models import build_model
from models.speed import ModelSettings, amp_choice, prepare_model
from utils.adversarial import RobustEvalSettings
from utils.autoattack import final_robustness
from utils.data.build import DataSettings, build_backdoor, build_poisoned_train, load_data
from utils.data.datasets import get_spec
from utils.data.poison import POISON_MODES
from utils.data.triggers import LABEL_MAPS, TriggerSettings
from utils.evaluation import evaluate, log_line
from utils.figures import write_figures
from utils.run import distributed as dist
from utils.run.checkpoint import checkpoint_payload, load_checkpoint, save_checkpoint
from utils.run.errors import UserError
from utils.run.resume import NOT_COMPARED, RunControl, default_args, prepare_out_dir, setting_differences
from utils.run.runlog import RunDir
from utils.run.runtime import RunSettings, pick_device, seed_everything
from utils.run.stagetimer import stage
from utils.settings import Job, Settings, fraction, opt, require
from utils.training import make_optimizer, train_epoch

FINAL_KEYS = ("clean_acc", "target_class_acc", "asr", "asr_incl_target", "noise_acc", "robust_acc", "loss",
              "per_class_acc")


@dataclass(frozen=True)
class AttackSettings(Settings):
    GROUP = "attack"
    attack_mode: str = opt("all2one", "all2one (every triggered image -> the target) or all2all (y -> y+1 mod C)")
    target_label: int = opt(0, "the all2one target class", type=int)
    pc: float = opt(0.1, "poisoning rate, in [0, 1); 0 trains a clean model that keeps the trigger, so its ASR is "
                         "what the trigger does to a model that never saw a poisoned image", type=fraction)
    poison_mode: str = opt("fixed", "fixed: seeded poisoned indices saved with the model; batch: the first pc*bs "
                                    "images of every batch, as in the paper code")
    lr_C: float = opt(0.01, "SGD learning rate", type=fraction)
    schedulerC_milestones: tuple = opt([30, 60], "MultiStepLR milestones (epochs)", type=int, nargs="+")
    schedulerC_lambda: float = opt(0.1, "MultiStepLR decay factor", type=float)
    n_iters: int = opt(60, "training epochs", type=int)
    clean_label: bool = opt(False, "clean-label poisoning (all2one): the poisoned images are drawn from the target "
                                   "class only and keep their labels, as Barni et al.'s SIG and BackdoorBench run it",
                            action="store_true")
    eval_every: int = opt(1, "evaluate every N epochs (the last epoch always)", type=int)
    clean_model_from: str | None = opt(None, "with --pc 0: the weights of this clean model (the model.pt of a --pc 0 "
                                              "run with the same data, model and training settings; a clean model "
                                              "does not depend on the trigger) instead of training them again, scored "
                                              "with this run's trigger", metavar="PATH")
    eval_robust: bool = opt(True, "report PGD robust accuracy of the final model (the defenses of this model reuse "
                                  "the figure when they evaluate on the same test images with the same settings)",
                            action=argparse.BooleanOptionalAction)

    def check_for(self, data: DataSettings, trigger: TriggerSettings) -> None:
        require(self.attack_mode in LABEL_MAPS,
                f"unknown attack mode '{self.attack_mode}'; choose one of {', '.join(LABEL_MAPS)}")
        require(self.poison_mode in POISON_MODES,
                f"unknown --poison_mode '{self.poison_mode}'; choose one of {', '.join(POISON_MODES)}")
        require(0 <= self.pc < 1, f"--pc must be in [0, 1), got {self.pc}")
        require(0 <= self.target_label < data.num_classes,
                f"--target_label {self.target_label} is not a class of {data.dataset} "
                f"(classes 0..{data.num_classes - 1})")
        require(self.n_iters > 0, f"--n_iters must be a positive number of epochs, got {self.n_iters}")
        require(self.lr_C > 0, f"--lr_C must be positive, got {self.lr_C}")
        require(all(m > 0 for m in self.schedulerC_milestones),
                f"--schedulerC_milestones must be positive epochs, got {list(self.schedulerC_milestones)}")
        require(0 < self.schedulerC_lambda <= 1,
                f"--schedulerC_lambda (the LR decay factor) must be in (0, 1], got {self.schedulerC_lambda}")
        require(self.eval_every > 0, f"--eval_every must be positive, got {self.eval_every}")
        require(not self.clean_label or (self.attack_mode == "all2one" and self.poison_mode == "fixed"),
                "--clean_label draws the poisons from the target class: it needs --attack_mode all2one and "
                "--poison_mode fixed")
        require(self.clean_model_from is None or self.pc == 0,
                f"--clean_model_from takes a clean model's weights: it needs --pc 0, got --pc {self.pc}")
        require(self.clean_model_from is None or os.path.isfile(self.clean_model_from),
                f"--clean_model_from '{self.clean_model_from}' does not exist; pass the model.pt of a --pc 0 run")
        if trigger.trigger_type == "warp":
            require(self.pc * (1 + trigger.cross_ratio) <= 1, f"--pc {self.pc} with --cross_ratio {trigger.cross_ratio} "
                                                               "would poison or warp more than the whole training set")


@dataclass(frozen=True, kw_only=True)
class AttackJob(Job):
    """Train a backdoor-infected classifier (any trigger, despite the name: --trigger_type). The run folder
    holds the one-file checkpoint (model.pt) that pbe_main.py and PUD.py defend."""

    KEY = "attack"
    run: RunSettings
    data: DataSettings
    model: ModelSettings
    trigger: TriggerSettings
    attack: AttackSettings
    robust: RobustEvalSettings

    def resolve(self) -> "AttackJob":
        data = self.data.resolve()
        model = self.model if self.model.arch is not None else self.model.replace(arch=get_spec(data.dataset).arch)
        return self.replace(data=data, model=model)

    def check(self) -> None:
        super().check()
        self.attack.check_for(self.data, self.trigger)


# What a clean model's (--pc 0) weights do not depend on: the trigger, its label map and target (no image carries
# it) and the run's bookkeeping. Every other setting counts (tests/test_attack.py trains one with two triggers).
NOT_TRAINING = (*NOT_COMPARED, *(f.name for f in fields(TriggerSettings)), "attack_mode", "target_label",
                "clean_label", "clean_model_from")


def clean_training(record: dict) -> dict:
    """The settings a clean model's weights follow from, out of a run's flat settings (``Job.flat()``, a
    checkpoint's ``args``), as JSON values: two runs with the same record train the same clean model."""
    return json.loads(json.dumps({k: v for k, v in record.items() if k not in NOT_TRAINING}, default=str))


def load_clean_weights(job: AttackJob, model) -> dict:
    """``--clean_model_from``: load the weights of a clean model trained with this run's settings but another
    trigger; refuse (naming the settings) a model whose training differs or that saw poisoned images. Returns
    its final metrics (its robust accuracy does not depend on the trigger: ``robust_eval`` reuses it)."""
    path = job.attack.clean_model_from
    ck = load_checkpoint(path)
    # a setting the model's run did not know (added to the toolkit since) counts as its default
    diff = setting_differences(clean_training(ck["args"]), clean_training(job.flat()),
                               clean_training(default_args(job)))
    if diff:
        raise UserError(f"--clean_model_from '{path}' was trained with other settings: {', '.join(diff[:4])}"
                        + (f" and {len(diff) - 4} more" if len(diff) > 4 else "") + "; train this run instead")
    model.load_state_dict(ck["state_dict"])
    return ck["metrics"]


def checkpoint_meta(job: AttackJob) -> dict:
    """The fields a checkpoint carries besides weights, trigger and poisoning: enough to rebuild the model and data."""
    return {"arch": job.model.arch, "arch_kwargs": {"num_classes": job.data.num_classes,
                                                    "in_channels": job.data.input_shape[0]},
            "dataset": job.data.dataset, "num_classes": job.data.num_classes, "input_size": list(job.data.input_shape),
            "seed": job.run.seed, "args": job.flat()}


def run_attack(job: AttackJob) -> dict:
    """Train the infected model; with ``--resume`` continue the run in ``--out_dir`` from its saved state."""
    run_s, data_s = job.run, job.data
    run_s.apply_threads()
    device = dist.init(pick_device(run_s.device))  # torchrun: join the process group, this rank's device
    loaded = prepare_out_dir("attack", job)
    gen = seed_everything(run_s.seed)
    backdoor = build_backdoor(job.trigger, job.attack.attack_mode, job.attack.target_label, data_s, run_s.seed)
    train, test, train_indices = load_data(data_s, run_s.seed, device)
    poisoned = build_poisoned_train(train, backdoor, job.attack.poison_mode, job.attack.pc, job.trigger.cross_ratio,
                                    run_s.seed, job.attack.clean_label)
    spec = get_spec(data_s.dataset)
    model = build_model(job.model.arch, data_s.num_classes, data_s.input_shape[0], spec.mean, spec.std).to(device)
    reused, earlier = job.attack.clean_model_from, None
    if reused:
        earlier = load_clean_weights(job, model)
    model = prepare_model(model, job.model, device)  # channels_last, bf16 autocast, torch.compile
    train_model = dist.wrap(model, device)  # DistributedDataParallel under torchrun, else model
    opt = make_optimizer(model, job.attack.lr_C)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(job.attack.schedulerC_milestones),
                                                 job.attack.schedulerC_lambda)
    augment = data_s.augment()
    cl = job.model.use_channels_last
    objects = {"model": model, "opt": opt, "sched": sched}
    meta = checkpoint_meta(job)

    run = RunDir(run_s.out_dir)
    with RunControl("attack", job, run, gen, loaded) as ctl:
        if ctl.resuming:
            carry = ctl.restore(**objects)
        else:
            run.start(dict(job.flat(), device_used=str(device), amp_used=amp_choice(job.model.amp, device)))
            carry = {"epoch": 0, "rec": {}}
            ctl.save("set-up (no epoch done)", carry, **objects)
        print(f"attack: {job.trigger.trigger_type} {job.attack.attack_mode} on {data_s.dataset} ({len(poisoned)} "
              f"train, {len(test)} test, {len(poisoned.poison_idx)} poisoned) with {job.model.arch} on {device}; "
              f"writing to {run_s.out_dir}" + (f"; the weights of the clean model {reused}, not trained again"
                                               if reused else ""), flush=True)
        n_iters = job.attack.n_iters

        def trained(epoch: int) -> dict:  # one epoch of SGD on the poisoned set; its record
            stats = train_epoch(train_model, opt, dist.epoch_batches(poisoned, run_s.bs, gen, augment),
                                generator=gen, channels_last=cl, desc=f"epoch {epoch}", stage="attack", epoch=epoch)
            sched.step()
            return {"epoch": epoch, "lr": opt.param_groups[0]["lr"], **stats, "seconds": ctl.elapsed()}

        # a reused clean model is scored once, as the last epoch of its training
        for epoch in (n_iters,) if reused else range(carry["epoch"] + 1, n_iters + 1):
            rec = {"epoch": epoch, "clean_model_from": reused, "seconds": ctl.elapsed()} if reused else trained(epoch)
            if epoch % job.attack.eval_every == 0 or epoch == n_iters:
                with stage("eval_clean"):
                    rec.update(evaluate(model, test, backdoor, run_s.eval_bs, noise_seed=run_s.seed,
                                        channels_last=cl,
                                        num_classes=data_s.num_classes if epoch == n_iters else None))
            print(log_line(f"epoch {epoch}/{n_iters}", rec), flush=True)
            with stage("saving"):
                run.log(rec)
                save_checkpoint(run.file("model.pt"), checkpoint_payload(meta, model, backdoor, poisoned,
                                                                         train_indices, rec))
            carry = {"epoch": epoch, "rec": rec}
            ctl.save(f"epoch {epoch}", carry, **objects)
        final = {k: v for k, v in carry["rec"].items() if k in FINAL_KEYS}
        if job.attack.eval_robust:
            with stage("eval_robust"):
                final.update(final_robustness(model, test, job.robust, run_s.seed, run_s.eval_bs, cl,
                                              amp_choice(job.model.amp, device)["amp"], earlier))
            with stage("saving"):
                save_checkpoint(run.file("model.pt"), checkpoint_payload(meta, model, backdoor, poisoned,
                                                                         train_indices, final))
        summary = {"final": final, "epochs": n_iters, **({"clean_model_from": reused} if reused else {}),
                   "amp": amp_choice(job.model.amp, device),
                   "torch_threads": torch.get_num_threads(),  # float sums in another order: another result
                   "poisoned": len(poisoned.poison_idx),
                   "train_size": len(poisoned), "test_size": len(test)}
        if run_s.figures:
            with stage("figures"):
                write_figures(run_s.out_dir, run.records(), summary, job.flat(), test, backdoor, {"infected": model},
                              cl)
        summary["stages"] = ctl.stages()
        summary["seconds"] = summary["stages"]["wall"]
        run.write_json("summary.json", summary)
        ctl.finish()
    print(log_line(f"done in {summary['seconds']:.0f}s", final) + f" | {run_s.out_dir}", flush=True)
    return summary
