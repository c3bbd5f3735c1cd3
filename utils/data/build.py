"""The data a run uses, from its settings: splits on the device, the backdoor, the poisoned training set.

``DataSettings`` says which dataset, subset and augmentation (the per-dataset defaults are resolved once,
by ``resolve``); ``DataSource`` is the part a defense sets itself (where the data lives, how many test
images), the rest of a defense's data comes from the attack's checkpoint (``data_from_checkpoint``).
``load_data`` returns the (subset) train/test splits on the device, ``build_backdoor`` the trigger and
label map, ``build_poisoned_train`` the poisoned training set; the ``*_from_checkpoint`` functions
rebuild the exact attack a saved model was trained with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from utils.data.augment import Augment
from utils.data.datasets import DATASETS, get_spec, load_split, seeded_subset
from utils.data.poison import BackdoorSpec, PoisonedTrainSet, draw_poison_indices
from utils.data.streaming import StreamingSplit, resolve_classes
from utils.data.triggers import TriggerSettings, build_trigger, trigger_from_state
from utils.settings import Settings, derived, opt, require


@dataclass(frozen=True)
class DataSource(Settings):
    GROUP = "data"
    data_root: str = opt("./data", "folder holding (or receiving) the datasets", metavar="PATH")
    download: str = opt("auto", "auto: let torchvision download missing CIFAR-10/GTSRB/MNIST; never: fail if absent",
                        choices=("auto", "never"))
    num_workers: int = opt(4, "DataLoader workers for streamed datasets (imagenet)", type=int)
    test_subset: int | None = opt(None, "evaluate on a seeded subset of N test images", type=int, shown="all")

    def check(self) -> None:
        require(self.num_workers >= 0, f"--num_workers must be >= 0, got {self.num_workers}")
        require(self.test_subset is None or self.test_subset > 0,
                f"--test_subset must be a positive image count, got {self.test_subset}")


@dataclass(frozen=True)
class DataSettings(DataSource):
    dataset: str = opt("cifar10", f"one of {', '.join(DATASETS)}")
    train_subset: int | None = opt(None, "train on a seeded subset of N training images", type=int, shown="all")
    imagenet_classes: int | None = opt(None, "imagenet: use the first N class folders of <data_root>/imagenet/train "
                                             "in sorted order", type=int, shown="10")
    imagenet_class_list: str | None = opt(None, "imagenet: a text file naming the class folders to use, one per "
                                                "line, in label order", metavar="PATH")
    random_crop: int | None = opt(None, "augmentation: crop padding in pixels", type=int, shown="per dataset")
    random_rotation: float | None = opt(None, "augmentation: largest rotation in degrees", type=float,
                                        shown="per dataset")
    # resolved from the dataset (``resolve``)
    num_classes: int | None = derived()
    input_shape: tuple | None = derived()
    random_flip: bool | None = derived()
    imagenet_class_names: tuple | None = derived()

    def check(self) -> None:
        super().check()
        get_spec(self.dataset)  # an unknown dataset is a UserError
        require(self.train_subset is None or self.train_subset > 0,
                f"--train_subset must be a positive image count, got {self.train_subset}")
        require(self.random_crop is None or self.random_crop >= 0, f"--random_crop must be >= 0, got {self.random_crop}")
        require(self.random_rotation is None or 0 <= self.random_rotation <= 180,
                f"--random_rotation must be in [0, 180] degrees, got {self.random_rotation}")
        if self.dataset != "synthetic" and self.download == "never":
            require(os.path.isdir(self.data_root),
                    f"data folder '{self.data_root}' does not exist; create it or point --data_root at your datasets")

    def resolve(self) -> "DataSettings":
        """The per-dataset defaults filled in: classes, input shape, augmentation, ImageNet class folders."""
        self.check()
        spec = get_spec(self.dataset)
        out = self.replace(num_classes=spec.num_classes, input_shape=(spec.channels, spec.size, spec.size),
                           random_crop=spec.crop_pad if self.random_crop is None else self.random_crop,
                           random_rotation=spec.rotation if self.random_rotation is None else self.random_rotation,
                           random_flip=spec.flip)
        if spec.in_memory:
            return out
        if self.imagenet_class_list:
            require(os.path.isfile(self.imagenet_class_list), f"--imagenet_class_list '{self.imagenet_class_list}' "
                                                              "does not exist; give a text file with one class folder "
                                                              "per line")
        elif self.imagenet_classes is not None:
            require(self.imagenet_classes >= 2, f"--imagenet_classes must be at least 2, got {self.imagenet_classes}")
        names = tuple(resolve_classes(self.data_root, self.imagenet_classes, self.imagenet_class_list))
        return out.replace(num_classes=len(names), imagenet_class_names=names)

    def augment(self) -> Augment:
        return Augment(self.random_crop, self.random_rotation, bool(self.random_flip))


def data_from_checkpoint(ck: dict, source: DataSource) -> DataSettings:
    """The attack's data settings saved in ``ck``, read from where ``source`` says (and on its test subset, if set)."""
    data = DataSettings.from_record(ck["args"])
    return data.replace(data_root=source.data_root, download=source.download, num_workers=source.num_workers,
                        test_subset=data.test_subset if source.test_subset is None else source.test_subset)


def load_data(data: DataSettings, seed: int, device, train_indices: torch.Tensor | None = None):
    """(train, test, train_indices): the splits on ``device``; subsets are seeded by ``seed``."""
    spec = get_spec(data.dataset)
    if not spec.in_memory:
        classes = list(data.imagenet_class_names)
        train = StreamingSplit(data.data_root, True, spec.size, data.num_workers, device, classes)
        if train_indices is None:
            train_indices = seeded_subset(len(train), data.train_subset, seed)
        if train_indices is not None:
            train = StreamingSplit(data.data_root, True, spec.size, data.num_workers, device, classes, keep=train_indices)
        test = StreamingSplit(data.data_root, False, spec.size, data.num_workers, device, classes)
        test_idx = seeded_subset(len(test), data.test_subset, seed + 1)
        if test_idx is not None:
            test = StreamingSplit(data.data_root, False, spec.size, data.num_workers, device, classes, keep=test_idx)
        return train, test, train_indices
    download = data.download != "never"
    train = load_split(data.dataset, data.data_root, True, download)
    test = load_split(data.dataset, data.data_root, False, download)
    if train_indices is None:
        train_indices = seeded_subset(len(train), data.train_subset, seed)
    if train_indices is not None:
        train = train.subset(train_indices)
    test_idx = seeded_subset(len(test), data.test_subset, seed + 1)
    if test_idx is not None:
        test = test.subset(test_idx)
    return train.to(device), test.to(device), train_indices


def build_backdoor(trigger: TriggerSettings, attack_mode: str, target_label: int, data: DataSettings,
                   seed: int) -> BackdoorSpec:
    return BackdoorSpec(build_trigger(trigger.trigger_type, data.input_shape, seed=seed, **trigger.params()),
                        attack_mode, target_label, data.num_classes)


def build_poisoned_train(train, backdoor: BackdoorSpec, poison_mode: str, pc: float, cross_ratio: float,
                         seed: int) -> PoisonedTrainSet:
    """The poisoned training set: ``fixed`` draws the poisoned (and WaNet noise-mode) indices once from ``seed``."""
    cross = cross_ratio if backdoor.trigger.name == "warp" else 0.0
    pidx = nidx = None
    if poison_mode == "fixed":
        pidx, nidx = draw_poison_indices(len(train), pc, seed, cross)
    return PoisonedTrainSet(train, backdoor, poison_mode, pc, pidx, nidx, cross)


def backdoor_from_checkpoint(ck: dict) -> BackdoorSpec:
    return BackdoorSpec(trigger_from_state(ck["trigger"]), ck["attack_mode"], ck["target_label"], ck["num_classes"])


def poisoned_train_from_checkpoint(ck: dict, train, backdoor: BackdoorSpec) -> PoisonedTrainSet:
    """The exact poisoned training set a checkpoint's model was trained on (fixed poisoning only)."""
    return PoisonedTrainSet(train, backdoor, ck["poison_mode"], ck["args"]["pc"], ck["poisoned_indices"],
                            ck["noise_indices"], ck["args"]["cross_ratio"])
