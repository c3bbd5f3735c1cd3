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

from utils.datasets import DATASETS, get_spec
from utils.errors import UserError
from utils.poison import POISON_MODES
from utils.triggers import LABEL_MAPS, TRIGGERS


def fraction(text: str) -> float:
    """A float that may be written as a fraction: ``6/255`` or ``0.0235``."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number or a fraction like 8/255") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2), like every other bad input."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


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
    g.add_argument("--overwrite", action="store_true", help="allow writing into a folder with a finished run")
    g.add_argument("--train_subset", type=int, default=None, help="use a seeded subset of N training images")
    g.add_argument("--test_subset", type=int, default=None, help="evaluate on a seeded subset of N test images")
    g.add_argument("--bs", type=int, default=128, help="batch size")
    g.add_argument("--eval_bs", type=int, default=512, help="evaluation batch size")
    g.add_argument("--num_workers", type=int, default=4, help="DataLoader workers for streamed datasets (imagenet)")
    g.add_argument("--channels_last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last memory format (auto: on; measured faster for conv nets on CPU and GPU)")
    g.add_argument("--random_crop", type=int, default=None, help="crop padding in pixels (default: per dataset)")
    g.add_argument("--random_rotation", type=float, default=None, help="max rotation in degrees (default: per dataset)")
    g.add_argument("--model_path", default=None, help="checkpoint to load (defenses) or continue from")


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


PARSER_PARTS = {"attack": (_add_common, _add_attack)}


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


def validate_common(args: argparse.Namespace) -> None:
    from models import ARCHS

    _require(args.arch in ARCHS, f"unknown arch '{args.arch}'; choose one of {', '.join(ARCHS)}")
    _require(args.bs > 0, f"--bs must be positive, got {args.bs}")
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
    _require(0 < args.blend_alpha <= 1, f"--blend_alpha must be in (0, 1], got {args.blend_alpha}")
    _require(0 < args.sig_delta <= 1, f"--sig_delta is in pixel units and must be in (0, 1], e.g. 10/255; got {args.sig_delta}")
    _require(args.patch_size is None or args.patch_size > 0, f"--patch_size must be positive, got {args.patch_size}")
    _require(args.cross_ratio >= 0, f"--cross_ratio must be >= 0, got {args.cross_ratio}")
    _require(args.eval_every > 0, f"--eval_every must be positive, got {args.eval_every}")
    if args.blend_image is not None:
        _require(os.path.isfile(args.blend_image), f"--blend_image '{args.blend_image}' does not exist; give a PNG/JPEG file")


def default_out_dir(script: str, args: argparse.Namespace) -> str:
    tag = "-".join(str(getattr(args, k)) for k in ("dataset", "trigger_type", "attack_mode") if getattr(args, k, None))
    return os.path.join("runs", f"{script}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")


VALIDATORS = {"attack": (validate_common, validate_attack)}


def parse_args(script: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, fill per-dataset defaults and validate; raises ``UserError`` on bad input."""
    args = build_parser(script).parse_args(argv)
    fill_dataset_defaults(args)
    for check in VALIDATORS[script]:
        check(args)
    if args.out_dir is None:
        args.out_dir = default_out_dir(script, args)
    return args
