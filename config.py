"""The one argument parser every entry script shares, with per-dataset defaults and validation.

Option names follow the paper code (``--dataset --attack_mode --trigger_type --pc --bs --lr_C
--n_iters --model_path ...``) with correct types. ``parse_args(script, argv)`` parses, fills the
dataset's defaults (classes, size, arch, augmentation) and validates every value *before* any work
is done, raising ``UserError`` with a one-line fix. Bad usage never prints a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from fractions import Fraction

from utils.data.datasets import DATASETS, get_spec
from utils.defenses.common import INIT_POOLS, POISON_CANDIDATES
from utils.run.errors import OneLineParser, UserError
from utils.data.poison import POISON_MODES
from utils.run.resume import SCRIPT_FILES
from utils.data.triggers import LABEL_MAPS, TRIGGERS


def fraction(text: str) -> float:
    """A float that may be written as a fraction: ``6/255`` or ``0.0235``."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number or a fraction like 8/255") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data_root", default="./data", help="folder holding (or receiving) the datasets")
    g.add_argument("--download", choices=("auto", "never"), default="auto",
                   help="auto: let torchvision download missing CIFAR-10/GTSRB/MNIST; never: fail if absent")
    g.add_argument("--arch", default=None, help="preactresnet18 | resnet18 | cnn (default: per dataset)")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out_dir", default=None, help="run folder (default: a new folder under runs/)")
    g.add_argument("--overwrite", action="store_true", help="start over in a folder holding a finished or interrupted run")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out_dir from its last saved state (same arguments otherwise)")
    g.add_argument("--train_subset", type=int, default=None, help="use a seeded subset of N training images")
    g.add_argument("--test_subset", type=int, default=None, help="evaluate on a seeded subset of N test images")
    g.add_argument("--bs", type=int, default=128, help="batch size")
    g.add_argument("--eval_bs", type=int, default=512, help="evaluation batch size")
    g.add_argument("--num_workers", type=int, default=4, help="DataLoader workers for streamed datasets (imagenet)")
    g.add_argument("--imagenet_classes", type=int, default=None,
                   help="imagenet: use the first N class folders of <data_root>/imagenet/train in sorted order (default 10)")
    g.add_argument("--imagenet_class_list", default=None,
                   help="imagenet: a text file naming the class folders to use, one per line, in label order")
    g.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last memory format (auto: on; measured faster for every arch here, CPU included)")
    g.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast in the model (auto: on for CUDA only; 'on' also works on CPUs with bf16 support)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the trained model's forward (first batches are slow while it compiles)")
    g.add_argument("--random_crop", type=int, default=None, help="crop padding in pixels (default: per dataset)")
    g.add_argument("--random_rotation", type=float, default=None, help="max rotation in degrees (default: per dataset)")


def _add_model_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", default=None, help="the infected model: a model.pt written by train_blend.py")


def _add_attack(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attack")
    g.add_argument("--attack_mode", default="all2one", help="all2one | all2all")
    g.add_argument("--trigger_type", default="blend", help=f"one of {', '.join(TRIGGERS)}")
    g.add_argument("--target_label", type=int, default=0)
    g.add_argument("--pc", type=fraction, default=0.1, help="poisoning rate, in (0, 1)")
    g.add_argument("--poison_mode", default="fixed", help="fixed: seeded indices saved with the model; batch: per-batch as in the paper code")
    g.add_argument("--lr_C", type=fraction, default=None, help="SGD learning rate (default: per dataset, 0.01)")
    g.add_argument("--schedulerC_milestones", type=int, nargs="+", default=[30, 60], help="MultiStepLR epochs")
    g.add_argument("--schedulerC_lambda", type=float, default=0.1, help="MultiStepLR gamma")
    g.add_argument("--n_iters", type=int, default=60, help="training epochs")
    g.add_argument("--blend_alpha", type=fraction, default=0.1)
    g.add_argument("--blend_image", default=None, help="image file for the blend trigger (default: a fixed noise pattern)")
    g.add_argument("--sig_delta", type=fraction, default=10 / 255, help="SIG amplitude in pixel units (10/255 as in the paper code)")
    g.add_argument("--sig_freq", type=float, default=6.0)
    g.add_argument("--patch_size", type=int, default=None, help="BadNets cell size in pixels (default: image size / 32)")
    g.add_argument("--k", type=int, default=4, help="WaNet control-grid size")
    g.add_argument("--s", type=fraction, default=0.5, help="WaNet warp strength")
    g.add_argument("--grid-rescale", dest="grid_rescale", type=fraction, default=1.0, help="WaNet grid rescale")
    g.add_argument("--cross_ratio", type=fraction, default=2.0, help="WaNet noise-mode images per poisoned image")
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (the last epoch always)")


def _add_robust_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("robust-accuracy evaluation (PGD, L-inf, pixel units)")
    g.add_argument("--eval_robust", action="store_true", help="train_blend.py: also report PGD robust accuracy")
    g.add_argument("--eval_eps", type=fraction, default=8 / 255)
    g.add_argument("--eval_alpha", type=fraction, default=2 / 255)
    g.add_argument("--eval_steps", type=int, default=20)


def _add_finetune(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adversarial fine-tuning (AFT)")
    g.add_argument("--extra_ratio", type=fraction, default=0.05, help="AFT: clean extra set as a fraction of the training set")
    g.add_argument("--aft_epochs", type=int, default=20, help="AFT: fine-tuning epochs")
    g.add_argument("--adv_epochs", type=int, default=3, help="AFT: how many of the first epochs use PGD examples")
    g.add_argument("--ft_lr", type=fraction, default=0.001, help="fine-tuning SGD learning rate")
    g.add_argument("--adv_norm", choices=("linf", "l2"), default="linf",
                   help="PGD norm for fine-tuning (measured: l2 does not remove a patch trigger either; see --adv_window)")
    g.add_argument("--adv_eps", type=fraction, default=6 / 255, help="PGD radius for fine-tuning")
    g.add_argument("--adv_alpha", type=fraction, default=1.2 / 255, help="PGD step for fine-tuning")
    g.add_argument("--adv_steps", type=int, default=7, help="PGD steps for fine-tuning")
    g.add_argument("--adv_random_start", action="store_true", help="random start for fine-tuning PGD (paper code: none)")
    g.add_argument("--adv_window", type=int, default=0,
                   help="confine each fine-tuning PGD example to one random KxK pixel window (0: whole image, the paper); "
                        "with --adv_eps 1 a patch-shaped example that reaches BadNets-style patch triggers")
    g.add_argument("--adv_eps_outside", type=fraction, default=0.0,
                   help="with --adv_window (L-inf): the PGD budget outside the window, e.g. 6/255 for a patch-shaped "
                        "and an ordinary example in one (0: only the window moves)")
    g.add_argument("--clean_weight", type=fraction, default=0.0, help="mix w*CE(clean) into adversarial batches (paper: 0)")


def target_label_arg(text: str):
    """``auto`` or a class index."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'auto' or a class index") from None


def _add_target_estimate(g) -> None:
    """The backdoor target: given, or estimated by PGD (PUD and PBE share this and ``utils.defenses.common.choose_target``)."""
    g.add_argument("--target_label", type=target_label_arg, default="auto",
                   help="backdoor target class, or auto: the most frequent class of untargeted PGD examples")
    g.add_argument("--target_eps", type=fraction, default=8 / 255, help="PGD radius for the target estimate")
    g.add_argument("--target_images", type=int, default=1000, help="training images attacked for the target estimate")


def _add_balanced_selection(g, default: int) -> None:
    g.add_argument("--balanced_selection", type=int, choices=(0, 1), default=default,
                   help="1: the next extra set keeps the top share of every label; 0: a global top share (paper code)")


def _add_pbe(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("progressive PBE (no clean data)")
    g.add_argument("--progressive", action="store_true", help="run progressive PBE instead of AFT")
    g.add_argument("--init_ratio", type=fraction, default=0.05, help="random share of the poisoned training set used in round 0")
    g.add_argument("--rounds", type=int, default=4)
    g.add_argument("--round_epochs", type=int, default=10)
    g.add_argument("--top_rates", type=fraction, nargs="*", default=[0.2, 0.5, 0.7, 0.9],
                   help="share of training samples kept as the next extra set after each round")
    g.add_argument("--partial_batches", type=int, default=31, help="adversarial batches in the first epoch of rounds >= 1")
    g.add_argument("--round_eps", type=fraction, nargs="+", default=None,
                   help="PGD radius per round (the step scales with it; default: --adv_eps in every round, as the paper "
                        "code runs; its dead line meant 2/255 from round 2 on: 6/255 6/255 2/255 2/255)")
    g.add_argument("--later_lr", type=fraction, default=None,
                   help="learning rate of rounds >= 1 (default: --ft_lr, as in the paper code); their extra sets are 4-18x "
                        "round 0's, so a raised --ft_lr for round 0 need not carry over")
    g.add_argument("--detect_fraction", type=fraction, default=0.1, help="lowest-scored share reported as detected poison")
    _add_target_estimate(g)
    g.add_argument("--init_pool", choices=tuple(INIT_POOLS), default="non_target",
                   help="round 0's random extra set is drawn from: non_target = samples not labelled as the (estimated) "
                        "target, so no all2one poison is in it; all = every sample (paper code)")
    g.add_argument("--argmax_penalty", type=int, choices=(0, 1), default=1,
                   help="1: consistency score minus 0.5 where the arg-max changed (PUD's score); 0: logit cosine only (paper)")
    g.add_argument("--poison_candidates", choices=("target", "all"), default="target",
                   help="the detector flags the lowest --detect_fraction (of all samples) among the samples labelled as "
                        "the target (all2one) or among all samples (paper code)")
    _add_balanced_selection(g, 0)  # PBE: 1 brings poisons back with the target class (measured, README)
    g.add_argument("--quarantine", type=int, choices=(0, 1), default=1,
                   help="1: every sample the detector flags after a round is kept out of all later extra sets; "
                        "0: the next extra set is the plain top share (paper code)")


PUD_SPECTRE_LAYERS = {"cnn": "net.features", "preactresnet18": "net.layer4.0", "resnet18": "net.layer2.1"}


def _add_pud(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PUD (progressive unlearning defense, no clean data)")
    _add_target_estimate(g)
    g.add_argument("--spectre_layer", default=None, help="module whose output SPECTRE uses (default: per arch)")
    g.add_argument("--spectre_remove", type=fraction, default=0.25, help="initial SPECTRE: share of the target class removed")
    g.add_argument("--spectre_step_remove", type=fraction, default=0.1, help="per-step SPECTRE: share of the extra set's target part removed")
    g.add_argument("--class_split", type=int, choices=(0, 1), default=1,
                   help="1: also split the target class in two clusters of representations and drop the one the infected "
                        "model, target logit masked, finds most like other classes (for poisons that are the class's "
                        "majority, where SPECTRE fails; this toolkit's addition); 0: SPECTRE only (the paper)")
    g.add_argument("--class_split_spread", type=fraction, default=1.25,
                   help="the split is applied only if the removed cluster's non-target predictions spread over this many "
                        "times as many classes as the other cluster's (poisons are images of many classes)")
    g.add_argument("--class_split_tie", type=fraction, default=0.05,
                   help="clusters whose mean non-target confidences differ by at most this much are told apart by "
                        "their spread alone (overconfident models)")
    g.add_argument("--spectre_min", type=int, default=100, help="per-step SPECTRE runs only on at least this many target samples")
    g.add_argument("--steps", type=int, default=5, help="progressive steps")
    g.add_argument("--step_epochs", type=int, nargs="+", default=[10, 10, 10, 10, 30], help="fine-tuning epochs per step")
    g.add_argument("--step_adv_epochs", type=int, nargs="+", default=[10, 2, 1, 1, 1], help="adversarial epochs per step")
    g.add_argument("--step_partial", type=int, nargs="+", default=[0, 0, 0, 1, 1],
                   help="1: the adversarial epochs of that step are partial (first --partial_batches batches)")
    g.add_argument("--step_eps", type=fraction, nargs="+", default=[6 / 255] * 4 + [4 / 255], help="PGD radius per step")
    g.add_argument("--step_alpha_div", type=fraction, nargs="+", default=[5, 5, 5, 6, 6], help="PGD step = eps / this, per step")
    g.add_argument("--step_pgd_steps", type=int, default=7, help="PGD iterations of the fine-tuning attack")
    g.add_argument("--partial_batches", type=int, default=31, help="adversarial batches of a partial adversarial epoch")
    g.add_argument("--init_ratio", type=fraction, default=0.05, help="random share of the pool used as extra set in step 0")
    g.add_argument("--top_rates", type=fraction, nargs="*", default=[0.2, 0.4, 0.7, 0.8],
                   help="share of the pool kept as the next extra set after each step but the last")
    _add_balanced_selection(g, 1)  # PUD: its filtered pool is clean; a global share costs clean accuracy (README)
    g.add_argument("--poison_candidates", choices=tuple(POISON_CANDIDATES), default="target",
                   help="draw the poison set from the samples labelled as the target (all2one), from those the initial "
                        "filtering removed (filtered), or from all (paper code)")
    g.add_argument("--poison_fraction", type=fraction, default=0.01, help="least consistent share of all samples used as poison set")
    g.add_argument("--pud_lr", type=fraction, default=0.01, help="SGD learning rate")
    g.add_argument("--pud_milestones", type=int, nargs="+", default=[30, 60], help="MultiStepLR epochs (gamma 0.1)")
    g.add_argument("--unlearn_epochs", type=int, default=30)
    g.add_argument("--unlearn_lambda", type=fraction, default=0.003, help="weight of the poison-CE ascent term")
    g.add_argument("--unlearn_mu", type=fraction, default=1e-4, help="weight of the L1 distance to the reference")
    g.add_argument("--poison_loss_bound", type=fraction, default=10.0, help="clip the ascent term at this CE")
    g.add_argument("--mt_epochs", type=int, default=30, help="mean-teacher epochs")
    g.add_argument("--mt_weight", type=fraction, default=0.05, help="weight of the softmax consistency")
    g.add_argument("--ema_decay", type=fraction, default=0.99)
    g.add_argument("--mt_refresh", type=int, choices=(0, 1), default=1,
                   help="1: before the mean teacher, drop target-labelled extra samples the unlearned model no longer "
                        "predicts as the target (0: the paper code)")
    g.add_argument("--mt_adv", action="store_true", help="mean teacher: the student trains on the teacher's PGD examples")
    g.add_argument("--return_teacher", action="store_true", help="keep the teacher instead of the student")
    g.add_argument("--model_repair", action="store_true", help="step 0 uses a known clean extra set")


PARSER_PARTS = {"attack": (_add_common, _add_attack, _add_robust_eval),
                "pbe": (_add_common, _add_model_path, _add_robust_eval, _add_finetune, _add_pbe),
                "pud": (_add_common, _add_model_path, _add_robust_eval, _add_pud)}


def build_parser(script: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"{script}", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for add in PARSER_PARTS[script]:
        add(p)
    return p


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def fill_dataset_defaults(args: argparse.Namespace) -> None:
    """Resolve per-dataset defaults (classes, channels, size, arch, augmentation) into ``args``."""
    spec = get_spec(args.dataset)
    args.num_classes = spec.num_classes
    args.input_shape = [spec.channels, spec.size, spec.size]
    if args.arch is None:
        args.arch = spec.arch
    if args.random_crop is None:
        args.random_crop = spec.crop_pad
    if args.random_rotation is None:
        args.random_rotation = spec.rotation
    args.random_flip = spec.flip
    if not spec.in_memory and getattr(args, "imagenet_class_list", None):
        _require(os.path.isfile(args.imagenet_class_list),
                 f"--imagenet_class_list '{args.imagenet_class_list}' does not exist; give a text file with one class folder per line")
        with open(args.imagenet_class_list) as f:
            args.num_classes = sum(1 for line in f if line.strip() and not line.lstrip().startswith("#"))
        _require(args.num_classes > 0, f"--imagenet_class_list '{args.imagenet_class_list}' lists no class names")
    elif not spec.in_memory and getattr(args, "imagenet_classes", None) is not None:
        _require(args.imagenet_classes >= 2, f"--imagenet_classes must be at least 2, got {args.imagenet_classes}")
        args.num_classes = args.imagenet_classes


def validate_common(args: argparse.Namespace) -> None:
    from models import ARCHS
    from utils.run.runtime import pick_device

    pick_device(args.device)  # an unknown or absent device is a UserError
    _require(not (args.resume and args.overwrite),
             "--resume continues the run in --out_dir and --overwrite starts it over; pass only one of them")
    _require(not args.resume or args.out_dir is not None, "--resume needs the --out_dir of the interrupted run")
    _require(args.out_dir is None or not os.path.isfile(args.out_dir),
             f"--out_dir '{args.out_dir}' is a file, not a folder; choose another --out_dir")
    _require(args.arch in ARCHS, f"unknown arch '{args.arch}'; choose one of {', '.join(ARCHS)}")
    _require(args.bs > 0, f"--bs must be positive, got {args.bs}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _require(args.bs % world == 0, f"--bs {args.bs} is the global batch size and must divide by the {world} processes; "
                                   f"use a multiple of {world}")
    _require(args.eval_bs > 0, f"--eval_bs must be positive, got {args.eval_bs}")
    _require(args.num_workers >= 0, f"--num_workers must be >= 0, got {args.num_workers}")
    for name in ("train_subset", "test_subset"):
        v = getattr(args, name)
        _require(v is None or v > 0, f"--{name} must be a positive image count, got {v}")
    _require(args.random_crop >= 0, f"--random_crop must be >= 0, got {args.random_crop}")
    _require(0 <= args.random_rotation <= 180, f"--random_rotation must be in [0, 180] degrees, got {args.random_rotation}")
    if args.dataset != "synthetic" and args.download == "never":
        _require(os.path.isdir(args.data_root), f"data folder '{args.data_root}' does not exist; create it or point --data_root at your datasets")


def validate_attack(args: argparse.Namespace) -> None:
    _require(args.trigger_type in TRIGGERS, f"unknown trigger '{args.trigger_type}'; choose one of {', '.join(TRIGGERS)}")
    _require(args.attack_mode in LABEL_MAPS, f"unknown attack mode '{args.attack_mode}'; choose one of {', '.join(LABEL_MAPS)}")
    _require(args.poison_mode in POISON_MODES, f"unknown --poison_mode '{args.poison_mode}'; choose one of {', '.join(POISON_MODES)}")
    _require(0 < args.pc < 1, f"--pc must be in (0, 1), got {args.pc}")
    _require(0 <= args.target_label < args.num_classes,
             f"--target_label {args.target_label} is not a class of {args.dataset} (classes 0..{args.num_classes - 1})")
    _require(args.n_iters > 0, f"--n_iters must be a positive number of epochs, got {args.n_iters}")
    if args.lr_C is None:
        args.lr_C = 0.01
    _require(args.lr_C > 0, f"--lr_C must be positive, got {args.lr_C}")
    _require(all(m > 0 for m in args.schedulerC_milestones),
             f"--schedulerC_milestones must be positive epochs, got {args.schedulerC_milestones}")
    _require(0 < args.schedulerC_lambda <= 1, f"--schedulerC_lambda (the LR decay factor) must be in (0, 1], got {args.schedulerC_lambda}")
    _require(0 < args.blend_alpha <= 1, f"--blend_alpha must be in (0, 1], got {args.blend_alpha}")
    _require(0 < args.sig_delta <= 1, f"--sig_delta is in pixel units and must be in (0, 1], e.g. 10/255; got {args.sig_delta}")
    _require(args.patch_size is None or args.patch_size > 0, f"--patch_size must be positive, got {args.patch_size}")
    _require(args.sig_freq > 0, f"--sig_freq must be positive, got {args.sig_freq}")
    _require(args.cross_ratio >= 0, f"--cross_ratio must be >= 0, got {args.cross_ratio}")
    if args.trigger_type == "warp":
        _require(args.pc * (1 + args.cross_ratio) <= 1,
                 f"--pc {args.pc} with --cross_ratio {args.cross_ratio} would poison or warp more than the whole training set")
    _require(args.eval_every > 0, f"--eval_every must be positive, got {args.eval_every}")
    if args.blend_image is not None:
        _require(os.path.isfile(args.blend_image), f"--blend_image '{args.blend_image}' does not exist; give a PNG/JPEG file")
    from dataloader import build_backdoor

    build_backdoor(args)  # the trigger's own checks (image file, patch size, WaNet grid) before any data is loaded


def default_out_dir(script: str, args: argparse.Namespace) -> str:
    tag = "-".join(str(getattr(args, k)) for k in ("dataset", "trigger_type", "attack_mode") if getattr(args, k, None))
    return os.path.join("runs", f"{script}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")


def fill_from_checkpoint(args: argparse.Namespace) -> None:
    """Defenses take dataset, arch and input shape from the checkpoint; a mismatching flag is an error later."""
    from utils.run.checkpoint import load_checkpoint

    ck = load_checkpoint(args.model_path)
    args.dataset = args.dataset or ck["dataset"]
    args.arch = args.arch or ck["arch"]
    fill_dataset_defaults(args)
    args.num_classes = ck["num_classes"]  # e.g. an ImageNet subset of another size than the default 10
    if args.dataset != ck["dataset"] or args.arch != ck["arch"]:
        raise UserError(f"'{args.model_path}' is a {ck['dataset']}/{ck['arch']} model but --dataset {args.dataset} "
                        f"--arch {args.arch} was asked; drop those flags or pass the matching checkpoint")
    args.trigger_type, args.attack_mode = ck["trigger"]["type"], ck["attack_mode"]


def validate_robust_eval(args: argparse.Namespace) -> None:
    _require(0 <= args.eval_eps <= 1, f"--eval_eps must be in [0, 1], got {args.eval_eps}")
    _require(args.eval_alpha >= 0, f"--eval_alpha must be >= 0, got {args.eval_alpha}")
    _require(args.eval_steps >= 0, f"--eval_steps must be >= 0, got {args.eval_steps}")


def validate_finetune(args: argparse.Namespace) -> None:
    _require(0 < args.extra_ratio <= 1, f"--extra_ratio must be in (0, 1], got {args.extra_ratio}")
    _require(args.aft_epochs > 0, f"--aft_epochs must be positive, got {args.aft_epochs}")
    _require(0 <= args.adv_epochs <= args.aft_epochs,
             f"--adv_epochs {args.adv_epochs} must be between 0 and --aft_epochs {args.aft_epochs}")
    _require(args.ft_lr > 0, f"--ft_lr must be positive, got {args.ft_lr}")
    if getattr(args, "adv_norm", "linf") == "linf":
        _require(0 <= args.adv_eps <= 1, f"--adv_eps must be in [0, 1] (pixel units, e.g. 6/255), got {args.adv_eps}")
    else:
        _require(args.adv_eps >= 0, f"--adv_eps must be >= 0, got {args.adv_eps}")
    _require(args.adv_alpha >= 0, f"--adv_alpha must be >= 0, got {args.adv_alpha}")
    _require(args.adv_steps >= 0, f"--adv_steps must be >= 0, got {args.adv_steps}")
    size = min(args.input_shape[1:])
    _require(0 <= args.adv_window <= size,
             f"--adv_window must be between 0 (whole image) and the image size {size}, got {args.adv_window}")
    if args.adv_eps_outside != 0:
        _require(args.adv_window > 0 and args.adv_norm == "linf",
                 "--adv_eps_outside is the budget outside --adv_window: it needs --adv_window > 0 and --adv_norm linf")
        _require(0 < args.adv_eps_outside <= args.adv_eps,
                 f"--adv_eps_outside must be in (0, --adv_eps {args.adv_eps}], got {args.adv_eps_outside}")
    _require(0 <= args.clean_weight < 1, f"--clean_weight must be in [0, 1), got {args.clean_weight}")


def validate_target_estimate(args: argparse.Namespace) -> None:
    t = args.target_label
    _require(t == "auto" or 0 <= t < args.num_classes,
             f"--target_label {t} is not a class of {args.dataset} (classes 0..{args.num_classes - 1}) nor 'auto'")
    _require(0 <= args.target_eps <= 1, f"--target_eps must be in [0, 1] (pixel units), got {args.target_eps}")
    _require(args.target_images > 0, f"--target_images must be positive, got {args.target_images}")


def validate_pbe(args: argparse.Namespace) -> None:
    _require(0 < args.init_ratio <= 1, f"--init_ratio must be in (0, 1], got {args.init_ratio}")
    _require(args.rounds > 0 and args.round_epochs > 0, "--rounds and --round_epochs must be positive")
    _require(len(args.top_rates) >= args.rounds - 1,
             f"--top_rates needs a keep-fraction for each of the first {args.rounds - 1} rounds, got {len(args.top_rates)}")
    _require(all(0 < r <= 1 for r in args.top_rates), f"--top_rates must be in (0, 1], got {args.top_rates}")
    _require(0 < args.detect_fraction < 1, f"--detect_fraction must be in (0, 1), got {args.detect_fraction}")
    _require(args.partial_batches >= 0, f"--partial_batches must be >= 0, got {args.partial_batches}")
    _require(args.later_lr is None or args.later_lr > 0, f"--later_lr must be positive, got {args.later_lr}")
    if args.round_eps is not None:
        _require(len(args.round_eps) == args.rounds,
                 f"--round_eps needs one radius per round (--rounds {args.rounds}), got {len(args.round_eps)}")
        _require(all(0 <= e <= (1 if args.adv_norm == "linf" else float("inf")) for e in args.round_eps),
                 f"--round_eps must be >= 0 (and <= 1 for linf, pixel units), got {args.round_eps}")


def validate_pud(args: argparse.Namespace) -> None:
    if args.spectre_layer is None:
        args.spectre_layer = PUD_SPECTRE_LAYERS.get(args.arch, "net")
    else:  # checked now rather than after the initial evaluation has written the run folder
        from models import build_model

        names = [n for n, _ in build_model(args.arch, args.num_classes, args.input_shape[0]).named_modules() if n]
        _require(args.spectre_layer in names, f"--spectre_layer '{args.spectre_layer}' is not a module of {args.arch}; "
                                              f"choose one of {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}")
    for name in ("init_ratio", "poison_fraction"):
        v = getattr(args, name)
        _require(0 < v <= 1, f"--{name} must be in (0, 1], got {v}")
    for name in ("spectre_remove", "spectre_step_remove"):
        v = getattr(args, name)
        _require(0 < v < 1, f"--{name} must be in (0, 1), got {v}")
    _require(args.class_split_spread > 0, f"--class_split_spread must be positive, got {args.class_split_spread}")
    _require(0 <= args.class_split_tie < 1, f"--class_split_tie must be in [0, 1), got {args.class_split_tie}")
    _require(args.spectre_min > 0, f"--spectre_min must be positive, got {args.spectre_min}")
    _require(args.steps > 0, f"--steps must be positive, got {args.steps}")
    for name in ("step_epochs", "step_adv_epochs", "step_partial", "step_eps", "step_alpha_div"):
        v = getattr(args, name)
        _require(len(v) == args.steps, f"--{name} needs one value per step (--steps {args.steps}), got {len(v)}")
    _require(len(args.top_rates) == args.steps - 1,
             f"--top_rates needs one value per step but the last ({args.steps - 1} for --steps {args.steps}), got {len(args.top_rates)}")
    _require(all(0 < r <= 1 for r in args.top_rates), f"--top_rates must be in (0, 1], got {args.top_rates}")
    _require(all(e >= 0 for e in args.step_epochs), f"--step_epochs must be non-negative, got {args.step_epochs}")
    for i, (a, e) in enumerate(zip(args.step_adv_epochs, args.step_epochs)):
        _require(0 <= a <= e, f"--step_adv_epochs {a} of step {i} must be between 0 and its --step_epochs {e}")
    _require(all(v in (0, 1) for v in args.step_partial), f"--step_partial takes 0 or 1 per step, got {args.step_partial}")
    _require(all(0 <= v <= 1 for v in args.step_eps), f"--step_eps must be in [0, 1] (pixel units), got {args.step_eps}")
    _require(all(v > 0 for v in args.step_alpha_div), f"--step_alpha_div must be positive, got {args.step_alpha_div}")
    _require(args.step_pgd_steps >= 0, f"--step_pgd_steps must be >= 0, got {args.step_pgd_steps}")
    _require(args.partial_batches >= 0, f"--partial_batches must be >= 0, got {args.partial_batches}")
    _require(args.pud_lr > 0, f"--pud_lr must be positive, got {args.pud_lr}")
    _require(all(m > 0 for m in args.pud_milestones), f"--pud_milestones must be positive epochs, got {args.pud_milestones}")
    _require(args.unlearn_epochs >= 0 and args.mt_epochs >= 0,
             f"--unlearn_epochs and --mt_epochs must be non-negative, got {args.unlearn_epochs} and {args.mt_epochs}")
    _require(args.unlearn_lambda >= 0 and args.unlearn_mu >= 0, "--unlearn_lambda and --unlearn_mu must be >= 0")
    _require(args.poison_loss_bound > 0, f"--poison_loss_bound must be positive, got {args.poison_loss_bound}")
    _require(args.mt_weight >= 0, f"--mt_weight must be >= 0, got {args.mt_weight}")
    _require(0 <= args.ema_decay <= 1, f"--ema_decay must be in [0, 1], got {args.ema_decay}")


VALIDATORS = {"attack": (validate_common, validate_attack, validate_robust_eval),
              "pbe": (validate_common, validate_robust_eval, validate_finetune, validate_pbe, validate_target_estimate),
              "pud": (validate_common, validate_robust_eval, validate_target_estimate, validate_pud)}
FROM_CHECKPOINT = {"pbe", "pud"}


def parse_args(script: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, fill per-dataset defaults and validate; raises ``UserError`` on bad input."""
    parser = build_parser(script)
    if script in FROM_CHECKPOINT:
        parser.set_defaults(dataset=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command = [SCRIPT_FILES[script], *argv]  # recorded in args.json; the resume hint is built from it
    if script in FROM_CHECKPOINT:
        fill_from_checkpoint(args)
    else:
        fill_dataset_defaults(args)
    for check in VALIDATORS[script]:
        check(args)
    if args.out_dir is None:
        args.out_dir = default_out_dir(script, args)
    return args
