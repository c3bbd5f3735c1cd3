"""Datasets, triggers, label maps and poisoned training sets: the data side of the toolkit in one import.

The code lives in ``utils.data``; this module gathers what a script or a notebook needs, e.g.::

    from dataloader import DataSettings, load_data, build_trigger, PoisonedTrainSet
"""
from utils.data.augment import Augment
from utils.data.build import (DataSettings, DataSource, backdoor_from_checkpoint, build_backdoor, build_poisoned_train,
                              data_from_checkpoint, load_data, poisoned_train_from_checkpoint)
from utils.data.datasets import DATASETS, ImageSet, make_synthetic
from utils.data.poison import BackdoorSpec, PoisonedTrainSet, draw_poison_indices
from utils.data.triggers import LABEL_MAPS, TRIGGERS, Trigger, TriggerSettings, backdoor_labels, build_trigger

__all__ = ["Augment", "BackdoorSpec", "DATASETS", "DataSettings", "DataSource", "ImageSet", "LABEL_MAPS",
           "PoisonedTrainSet", "TRIGGERS", "Trigger", "TriggerSettings", "backdoor_from_checkpoint", "backdoor_labels",
           "build_backdoor", "build_poisoned_train", "build_trigger", "data_from_checkpoint", "draw_poison_indices",
           "load_data", "make_synthetic", "poisoned_train_from_checkpoint"]
