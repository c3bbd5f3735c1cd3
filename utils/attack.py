"""Attack training: train a classifier on a poisoned training set and save the one-file checkpoint."""
from __future__ import annotations

import torch

from dataloader import build_backdoor, build_poisoned_train, load_data, make_augment
from models import build_model
from utils.run import distributed as dist
from utils.run.checkpoint import save_checkpoint
from utils.data.datasets import get_spec
from utils.evaluation import evaluate
from utils.run.plots import plot_curves, plot_samples
from utils.run.resume import RunControl, prepare_out_dir
from utils.run.runlog import RunDir
from utils.run.runtime import pick_device, prepare_model, seed_everything
from utils.training import make_optimizer, train_epoch


def use_channels_last(args) -> bool:
    return args.channels_last != "off"


def model_for(args, device) -> torch.nn.Module:
    spec = get_spec(args.dataset)
    model = build_model(args.arch, args.num_classes, args.input_shape[0], spec.mean, spec.std).to(device)
    return prepare_model(model, args, device)  # channels_last, bf16 autocast, torch.compile


def checkpoint_payload(args, model, backdoor, poisoned, train_indices, metrics: dict, extra: dict | None = None) -> dict:
    """The fields every checkpoint carries (design.md): enough to rebuild and re-evaluate without flags."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": args.arch, "arch_kwargs": {"num_classes": args.num_classes, "in_channels": args.input_shape[0]},
        "dataset": args.dataset, "num_classes": args.num_classes, "input_size": list(args.input_shape),
        "trigger": backdoor.trigger.state(), "attack_mode": backdoor.attack_mode, "target_label": backdoor.target_label,
        "poison_mode": poisoned.mode if poisoned is not None else None,
        "poisoned_indices": poisoned.poison_idx.clone() if poisoned is not None and poisoned.mode == "fixed" else None,
        "noise_indices": poisoned.noise_idx.clone() if poisoned is not None and poisoned.mode == "fixed" else None,
        "train_indices": train_indices, "seed": args.seed, "args": dict(vars(args)), "metrics": metrics,
    }
    payload.update(extra or {})
    return payload


def log_line(prefix: str, rec: dict) -> str:
    keys = [k for k in ("loss", "clean_acc", "target_class_acc", "asr", "asr_incl_target", "noise_acc", "robust_acc")
            if k in rec]
    return prefix + " | " + " ".join(f"{k} {rec[k]:.4f}" for k in keys)


def run_attack(args) -> dict:
    """Train the infected model; with ``args.resume`` continue the run in ``args.out_dir`` from its saved state."""
    device = dist.init(pick_device(args.device))  # torchrun: join the process group, this rank's device
    loaded = prepare_out_dir("attack", args)
    gen = seed_everything(args.seed)
    train, test, train_indices = load_data(args, device)
    backdoor = build_backdoor(args)
    poisoned = build_poisoned_train(args, train, backdoor)
    model = model_for(args, device)
    train_model = dist.wrap(model, device)  # DistributedDataParallel under torchrun, else model
    opt = make_optimizer(model, args.lr_C)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.schedulerC_milestones, args.schedulerC_lambda)
    augment = make_augment(args)
    cl = use_channels_last(args)
    objects = {"model": model, "opt": opt, "sched": sched}

    run = RunDir(args.out_dir)
    with RunControl("attack", args, run, gen, loaded) as ctl:
        if ctl.resuming:
            carry = ctl.restore(**objects)
        else:
            run.start(dict(vars(args), device_used=str(device)))
            carry = {"epoch": 0, "rec": {}}
            ctl.save("set-up (no epoch done)", carry, **objects)
        print(f"attack: {args.trigger_type} {args.attack_mode} on {args.dataset} ({len(poisoned)} train, {len(test)} test, "
              f"{len(poisoned.poison_idx)} poisoned) with {args.arch} on {device}; writing to {args.out_dir}", flush=True)
        n_batches = -(-len(poisoned) // args.bs)
        for epoch in range(carry["epoch"] + 1, args.n_iters + 1):
            stats = train_epoch(train_model, opt, dist.epoch_batches(poisoned, args.bs, gen, augment),
                                generator=gen, channels_last=cl, desc=f"epoch {epoch}", total=n_batches,
                                stage="attack", epoch=epoch)
            sched.step()
            rec = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], **stats, "seconds": ctl.elapsed()}
            if epoch % args.eval_every == 0 or epoch == args.n_iters:
                rec.update(evaluate(model, test, backdoor, args.eval_bs, generator=gen, channels_last=cl))
            run.log(rec)
            print(log_line(f"epoch {epoch}/{args.n_iters}", rec), flush=True)
            save_checkpoint(run.file("model.pt"), checkpoint_payload(args, model, backdoor, poisoned, train_indices, rec))
            carry = {"epoch": epoch, "rec": rec}
            ctl.save(f"epoch {epoch}", carry, **objects)
        rec = carry["rec"]
        final = {k: v for k, v in rec.items() if k in ("clean_acc", "target_class_acc", "asr", "asr_incl_target", "noise_acc",
                                                         "robust_acc", "loss")}
        if getattr(args, "eval_robust", False):
            from utils.robust import robust_acc_from_args
            final.update(robust_acc_from_args(model, test, args))
            save_checkpoint(run.file("model.pt"), checkpoint_payload(args, model, backdoor, poisoned, train_indices, final))
        summary = {"final": final, "epochs": args.n_iters, "seconds": ctl.elapsed(),
                   "poisoned": len(poisoned.poison_idx), "train_size": len(poisoned), "test_size": len(test)}
        plot_curves(run.records(), run.file("curves.png"), {"accuracy": ["clean_acc", "noise_acc"], "attack success": ["asr", "asr_incl_target"]})
        _, x, _ = next(test.batches(8))
        plot_samples(x, backdoor.trigger(x), run.file("samples.png"))
        run.write_json("summary.json", summary)
        ctl.finish()
    print(log_line(f"done in {summary['seconds']:.0f}s", final) + f" | {args.out_dir}", flush=True)
    dist.finish()
    return summary
