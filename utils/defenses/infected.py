"""The infected run a defense starts from: its checkpoint, model, trigger, exact poisoned training set and test set.

``DefenseInput`` is the defense's ``--model_path`` (and optional ``--dataset``/``--arch``, which must match
the checkpoint); ``resolve`` reads what the checkpoint fixes (dataset, arch, classes, input shape, trigger,
mode). ``load_infected`` rebuilds everything the checkpoint describes, so a defense needs no other flag.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models import frozen_copy, model_from_checkpoint
from models.speed import SpeedSettings, prepare_model
from utils.data.build import (DataSettings, DataSource, backdoor_from_checkpoint, data_from_checkpoint, load_data,
                              poisoned_train_from_checkpoint)
from utils.data.poison import BackdoorSpec, PoisonedTrainSet
from utils.run.errors import UserError
from utils.settings import Settings, derived, opt, require


@dataclass(frozen=True)
class DefenseInput(Settings):
    GROUP = "infected model"
    model_path: str | None = opt(None, "the infected model: a model.pt written by train_blend.py", metavar="PATH")
    dataset: str | None = opt(None, "must match the checkpoint's (it is read from there)", shown="the checkpoint's")
    arch: str | None = opt(None, "must match the checkpoint's (it is read from there)", shown="the checkpoint's")
    # read from the checkpoint (``resolve``)
    num_classes: int | None = derived()
    input_shape: tuple | None = derived()
    trigger_type: str | None = derived()
    attack_mode: str | None = derived()

    def check(self) -> None:
        require(bool(self.model_path),
                "no checkpoint given; pass --model_path PATH to a model.pt written by train_blend.py")

    def resolve(self, ck: dict) -> "DefenseInput":
        """The checkpoint's dataset, arch, classes, input shape, trigger and mode; a mismatching flag is an error."""
        if (self.dataset or ck["dataset"]) != ck["dataset"] or (self.arch or ck["arch"]) != ck["arch"]:
            asked = " ".join(f"--{k} {v}" for k, v in (("dataset", self.dataset), ("arch", self.arch)) if v)
            raise UserError(f"'{self.model_path}' is a {ck['dataset']}/{ck['arch']} model but {asked} was asked; "
                            "drop those flags or pass the matching checkpoint")
        return self.replace(dataset=ck["dataset"], arch=ck["arch"], num_classes=ck["num_classes"],
                            input_shape=tuple(ck["input_size"]), trigger_type=ck["trigger"]["type"],
                            attack_mode=ck["attack_mode"])


@dataclass
class InfectedRun:
    ck: dict
    model: torch.nn.Module
    reference: torch.nn.Module  # frozen copy of the infected model
    backdoor: BackdoorSpec
    poisoned: PoisonedTrainSet  # the training data as the attacker left it
    test: object
    augment: object  # the attack's training augmentation
    data: DataSettings  # the attack's data settings, read from the defense's --data_root


def load_infected(ck: dict, source: DataSource, speed: SpeedSettings, device) -> InfectedRun:
    """Rebuild the checkpoint's model (with the speed switches) and data (where ``source`` says)."""
    data = data_from_checkpoint(ck, source)
    train, test, _ = load_data(data, ck["args"]["seed"], device, train_indices=ck["train_indices"])
    pidx = ck["poisoned_indices"]
    if pidx is not None and len(pidx) and int(pidx.max()) >= len(train):
        raise UserError(f"the training data under '{source.data_root}' has {len(train)} images, fewer than the "
                        "checkpoint's poisoned indices need; point --data_root at the data the model was trained on")
    backdoor = backdoor_from_checkpoint(ck)
    poisoned = poisoned_train_from_checkpoint(ck, train, backdoor)
    model = prepare_model(model_from_checkpoint(ck, device), speed, device)  # channels_last, bf16, compile
    return InfectedRun(ck, model, frozen_copy(model), backdoor, poisoned, test, data.augment(), data)
