"""Datasets, triggers, label maps and poisoned training sets, built from parsed arguments.

This is the facade the entry scripts use: ``load_data`` returns the (subset) train/test splits on
the device, ``build_backdoor`` the trigger + label map, ``build_poisoned_train`` the poisoned
training set, ``make_augment`` the batched augmentation. ``backdoor_from_checkpoint`` and
``poisoned_train_from_checkpoint`` rebuild the exact attack a saved model was trained with.
"""
from __future__ import annotations

import torch

from utils.data.augment import Augment
from utils.data.datasets import DATASETS, ImageSet, get_spec, load_split, make_synthetic, seeded_subset
from utils.data.poison import BackdoorSpec, PoisonedTrainSet, draw_poison_indices
from utils.data.streaming import StreamingSplit, resolve_classes
from utils.data.triggers import TRIGGERS, Trigger, backdoor_labels, build_trigger, trigger_from_state

__all__ = ["DATASETS", "TRIGGERS", "ImageSet", "Trigger", "BackdoorSpec", "PoisonedTrainSet", "make_synthetic",
           "backdoor_labels", "build_trigger", "load_data", "build_backdoor", "build_poisoned_train", "make_augment",
           "backdoor_from_checkpoint", "poisoned_train_from_checkpoint"]


def trigger_params(args) -> dict:
    return {"blend_alpha": args.blend_alpha, "blend_image": args.blend_image, "patch_size": args.patch_size,
            "sig_delta": args.sig_delta, "sig_freq": args.sig_freq, "k": args.k, "s": args.s,
            "grid_rescale": args.grid_rescale}


def load_data(args, device, train_indices: torch.Tensor | None = None):
    """(train, test, train_indices): the splits on ``device``; subsets are seeded by ``args.seed``."""
    spec = get_spec(args.dataset)
    download = getattr(args, "download", "auto") != "never"
    if not spec.in_memory:
        # the class names are resolved once and kept in args (-> checkpoint), so defenses read the same classes
        classes = getattr(args, "imagenet_class_names", None) or resolve_classes(
            args.data_root, getattr(args, "imagenet_classes", None), getattr(args, "imagenet_class_list", None))
        args.imagenet_class_names = list(classes)
        train = StreamingSplit(args.data_root, True, spec.size, args.num_workers, device, classes)
        if train_indices is None:
            train_indices = seeded_subset(len(train), args.train_subset, args.seed)
        if train_indices is not None:
            train = StreamingSplit(args.data_root, True, spec.size, args.num_workers, device, classes, keep=train_indices)
        test = StreamingSplit(args.data_root, False, spec.size, args.num_workers, device, classes)
        test_idx = seeded_subset(len(test), args.test_subset, args.seed + 1)
        if test_idx is not None:
            test = StreamingSplit(args.data_root, False, spec.size, args.num_workers, device, classes, keep=test_idx)
        return train, test, train_indices
    train = load_split(args.dataset, args.data_root, True, download)
    test = load_split(args.dataset, args.data_root, False, download)
    if train_indices is None:
        train_indices = seeded_subset(len(train), args.train_subset, args.seed)
    if train_indices is not None:
        train = train.subset(train_indices)
    test_idx = seeded_subset(len(test), args.test_subset, args.seed + 1)
    if test_idx is not None:
        test = test.subset(test_idx)
    return train.to(device), test.to(device), train_indices


def build_backdoor(args) -> BackdoorSpec:
    trig = build_trigger(args.trigger_type, tuple(args.input_shape), seed=args.seed, **trigger_params(args))
    return BackdoorSpec(trig, args.attack_mode, args.target_label, args.num_classes)


def build_poisoned_train(args, train, backdoor: BackdoorSpec) -> PoisonedTrainSet:
    cross = args.cross_ratio if args.trigger_type == "warp" else 0.0
    if args.poison_mode == "fixed":
        pidx, nidx = draw_poison_indices(len(train), args.pc, args.seed, cross)
    else:
        pidx = nidx = None
    return PoisonedTrainSet(train, backdoor, args.poison_mode, args.pc, pidx, nidx, cross)


def make_augment(args) -> Augment:
    return Augment(args.random_crop, args.random_rotation, getattr(args, "random_flip", False))


def backdoor_from_checkpoint(ck: dict) -> BackdoorSpec:
    return BackdoorSpec(trigger_from_state(ck["trigger"]), ck["attack_mode"], ck["target_label"], ck["num_classes"])


def poisoned_train_from_checkpoint(ck: dict, train, backdoor: BackdoorSpec) -> PoisonedTrainSet:
    """The exact poisoned training set a checkpoint's model was trained on (fixed poisoning only)."""
    return PoisonedTrainSet(train, backdoor, ck.get("poison_mode", "fixed"), ck["args"]["pc"], ck.get("poisoned_indices"),
                            ck.get("noise_indices"), ck["args"].get("cross_ratio", 0.0))
