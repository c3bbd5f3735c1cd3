"""The infected run a defense starts from, from one of three sources; the defenses run on it alike.

- ``toolkit``: ``--model_path`` is a model.pt written by train_blend.py (the research simulation): its model,
  the exact poisoned training set rebuilt from the clean dataset, the saved trigger and poisoned indices, and
  ASR from the trigger.
- ``files``: a model and data of other code (``--train_data``): a state dict (``--arch``, ``--num_classes``,
  the input normalisation) and the training set as given, an image folder or a tensor file;
  ``--poison_indices`` is the ground truth for the detection metrics only; ``--test_data`` and optionally a
  triggered ``--test_bd_data`` for ASR.
- ``backdoorbench``: ``--from_backdoorbench`` a BackdoorBench v2 attack_result.pt: model, poisoned training set
  with its poisoned indices, triggered test set; the clean sets from ``--data_root``.

``read_infected`` reads the files once, before any output (an ``InfectedSource``); ``DefenseInput.resolve``
fixes the dataset, arch, classes and input shape from it; ``load_infected`` builds the ``InfectedRun``:
model, reference copy, backdoor (or None), poisoned training set (``truth``: ground truth or None), test
sets, augmentation. Every file is read with weights_only=True; only ``--allow_pickle`` unpickles a model.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from models import ARCHS, build_model, eval_mode, frozen_copy, model_from_checkpoint
from models.speed import SpeedSettings, prepare_model
from utils.data.augment import Augment
from utils.data.build import (DataSettings, DataSource, backdoor_from_checkpoint, data_from_checkpoint, load_data,
                              poisoned_train_from_checkpoint)
from utils.data.datasets import DATASETS, ImageSet, get_spec, seeded_subset
from utils.data.external import (fit_state_dict, load_weights, read_backdoorbench, read_images,
                                 read_poison_indices, strip_module_prefix)
from utils.data.poison import BackdoorSpec, GivenTrainSet, PoisonedTrainSet
from utils.run.checkpoint import load_checkpoint
from utils.run.errors import UserError
from utils.settings import Settings, derived, opt, require

# flags of the ``files`` source, each refused elsewhere with a one-line reason
FILES_ONLY = ("test_data", "test_bd_data", "poison_indices", "num_classes", "mean", "std", "allow_pickle",
              "image_size")


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number")
    return v


@dataclass(frozen=True)
class DefenseInput(Settings):
    GROUP = "the infected model and its data"
    model_path: str | None = opt(None, "the infected model: a model.pt written by train_blend.py, or (with "
                                       "--train_data) a state dict of other code", metavar="PATH")
    from_backdoorbench: str | None = opt(None, "a BackdoorBench v2 attack_result.pt: model, poisoned training set, "
                                               "its poisoned indices and triggered test set (the clean CIFAR-10 or "
                                               "GTSRB from --data_root); no other input flag", metavar="PATH")
    dataset: str | None = opt(None, "a model.pt: must match the checkpoint's; other code's model: the dataset its "
                                    "defaults (arch, classes, normalisation, augmentation) come from",
                              shown="the checkpoint's / none")
    arch: str | None = opt(None, f"a model.pt: must match the checkpoint's; other code's model: its architecture, "
                                 f"one of {', '.join(ARCHS)}", shown="the checkpoint's / --dataset's")
    train_data: str | None = opt(None, "the training set of other code, possibly poisoned: an image folder "
                                       "(root/<class>/<image>) or a .pt/.npz tensor file with x (images) and y "
                                       "(labels as trained on)", metavar="PATH")
    poison_indices: str | None = opt(None, "with --train_data: ground truth of its poisoned samples (.txt, .pt or "
                                           ".npy indices or 0/1 mask), for the detection metrics only", metavar="PATH")
    test_data: str | None = opt(None, "with --train_data: a clean test set (folder or tensor file)", metavar="PATH")
    test_bd_data: str | None = opt(None, "with --train_data: a triggered test set (x with the trigger, y the "
                                         "backdoor labels) for ASR; without it ASR is not measured", metavar="PATH")
    num_classes: int | None = opt(None, "with --train_data: the model's class count", type=int,
                                  shown="--dataset's")
    mean: tuple | None = opt(None, "with --train_data: the input normalisation the model was trained with, one "
                                   "value per channel", type=float, nargs="+", metavar="X",
                             shown="the weights' own, else --dataset's")
    std: tuple | None = opt(None, "with --train_data: its standard deviations, one per channel", type=_positive,
                            nargs="+", metavar="X", shown="the weights' own, else --dataset's")
    image_size: int | None = opt(None, "with --train_data: resize the images of every folder to NxN", type=int,
                                 shown="as they are")
    allow_pickle: bool = opt(False, "with --train_data: also read a --model_path that is a pickle (e.g. a whole "
                                    "nn.Module); unpickling can run any code the file contains, so only for a file "
                                    "you trust", action="store_true")
    # resolved from the source (``resolve``)
    input_shape: tuple | None = derived()
    trigger_type: str | None = derived()
    attack_mode: str | None = derived()

    @property
    def origin(self) -> str:
        if self.from_backdoorbench:
            return "backdoorbench"
        return "files" if self.train_data else "toolkit"

    def check(self) -> None:
        given = [k for k in FILES_ONLY if getattr(self, k) not in (None, False)]
        if self.origin == "backdoorbench":
            others = [k for k in ("model_path", "train_data", "dataset", "arch", *FILES_ONLY)
                      if getattr(self, k) not in (None, False)]
            require(not others, f"--from_backdoorbench reads the model and data from the attack result; drop "
                                f"{', '.join('--' + k for k in others)}")
            return
        if self.origin == "toolkit":
            require(bool(self.model_path),
                    "no checkpoint given; pass --model_path PATH to a model.pt written by train_blend.py (or "
                    "--from_backdoorbench, or --model_path with --train_data for a model of other code)")
            require(not given, f"--{given[0] if given else ''} is for a model and data of other code: it needs "
                               "--train_data (a model.pt of train_blend.py brings its own data)")
            return
        require(bool(self.model_path), "--train_data needs the model it trained: pass --model_path PATH to its "
                                       "state dict")
        require(bool(self.test_data), "--train_data needs a clean test set: pass --test_data PATH (an image folder "
                                      "or a tensor file)")
        require(self.num_classes is None or self.num_classes >= 2,
                f"--num_classes must be at least 2, got {self.num_classes}")
        require((self.mean is None) == (self.std is None), "pass --mean and --std together")
        require(self.mean is None or len(self.mean) == len(self.std),
                f"--mean has {len(self.mean or ())} values, --std {len(self.std or ())}; give one of each per channel")
        require(self.image_size is None or self.image_size > 0, f"--image_size must be positive, got {self.image_size}")
        if self.dataset is not None:
            get_spec(self.dataset)
        require(self.arch is None or self.arch in ARCHS, f"unknown arch '{self.arch}'; choose one of {', '.join(ARCHS)}")

    def resolve(self, src: "InfectedSource") -> "DefenseInput":
        """The source's dataset, arch, classes, input shape, trigger and mode; a mismatching flag is an error."""
        m = src.meta
        if src.origin == "toolkit":
            ck = src.ck
            if (self.dataset or ck["dataset"]) != ck["dataset"] or (self.arch or ck["arch"]) != ck["arch"]:
                asked = " ".join(f"--{k} {v}" for k, v in (("dataset", self.dataset), ("arch", self.arch)) if v)
                raise UserError(f"'{self.model_path}' is a {ck['dataset']}/{ck['arch']} model but {asked} was asked; "
                                "drop those flags or pass the matching checkpoint")
            return self.replace(dataset=ck["dataset"], arch=ck["arch"], num_classes=ck["num_classes"],
                                input_shape=tuple(ck["input_size"]), trigger_type=ck["trigger"]["type"],
                                attack_mode=ck["attack_mode"])
        return self.replace(dataset=m["dataset"], arch=m["arch"], num_classes=m["num_classes"],
                            input_shape=tuple(m["input_size"]))


@dataclass
class InfectedSource:
    """What a defense reads before any output: the checkpoint (toolkit) or the files of other code, on the CPU."""

    origin: str  # toolkit, files or backdoorbench
    meta: dict  # the model.pt fields that describe the model and data: arch, arch_kwargs, dataset, classes, ...
    ck: dict | None = None  # toolkit: the checkpoint
    state_dict: dict | None = None  # otherwise: the weights under build_model's names (normalisation included)
    train: ImageSet | None = None
    paths: list | None = None  # the training images' files (an image folder)
    classes: list | None = None  # an image folder's class names (label order), which other folders follow
    truth: torch.Tensor | None = None  # ground truth of the poisoned training samples (bool), if given
    test: ImageSet | None = None
    test_bd: ImageSet | None = None
    files: dict = field(default_factory=dict)  # where each part came from

    @property
    def clean_known(self) -> bool:
        """Whether the training set's clean samples are known (the model-repair simulation can draw from them)."""
        return self.origin == "toolkit" or self.truth is not None


def read_infected(inp: DefenseInput, source: DataSource) -> InfectedSource:
    """The one read of the model and data files (before any output); every problem is a one-line UserError."""
    if inp.origin == "backdoorbench":
        return _read_backdoorbench(inp.from_backdoorbench, source)
    if inp.origin == "files":
        return _read_files(inp)
    ck = load_checkpoint(inp.model_path)
    if ck["trigger"] is None:
        raise UserError(f"'{inp.model_path}' is a model defended on data of other code (no trigger or poisoned "
                        "training set to rebuild); defend it again with --train_data and --test_data (it loads as a "
                        "state dict)")
    meta = {k: ck[k] for k in ("arch", "arch_kwargs", "dataset", "num_classes", "input_size", "seed", "args")}
    return InfectedSource("toolkit", meta, ck=ck, files={"model": inp.model_path})


def _mask(indices: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[indices] = True
    return m


def _same_shape(data: ImageSet, shape: tuple, what: str, path: str) -> None:
    got = tuple(data.x.shape[1:])
    if got != tuple(shape):
        raise UserError(f"{what} '{path}' holds {got[0]}x{got[1]}x{got[2]} images (C x H x W), the model's are "
                        f"{shape[0]}x{shape[1]}x{shape[2]}; give images of the model's size and channels"
                        + (" (or --image_size for folders)" if what != "BackdoorBench" else ""))


def _first_conv_channels(state: dict) -> tuple[str, int] | None:
    """(name, input channels) of the first convolution's weight (our normalisation buffers are 4-D too)."""
    for k, v in state.items():
        if v.dim() == 4 and not k.startswith("normalize."):
            return k, int(v.shape[1])
    return None


def _normalisation(inp: DefenseInput, weights: dict, channels: int, spec) -> tuple:
    """(mean, std) for the fresh model: --mean/--std, else the weights' own ``normalize.*`` (kept by
    fit_state_dict), else --dataset's; one of them must say it."""
    own = "normalize.mean" in weights and "normalize.std" in weights
    if inp.mean is not None:
        require(len(inp.mean) == channels, f"--mean/--std give {len(inp.mean)} value(s) but the images have {channels} "
                                           "channel(s); give one per channel")
        if own:
            m, s = weights["normalize.mean"].flatten().tolist(), weights["normalize.std"].flatten().tolist()
            same = len(m) == channels and all(abs(a - b) < 1e-6 for a, b in zip(m + s, [*inp.mean, *inp.std]))
            require(same, f"the weights carry their own normalisation (mean {[round(v, 4) for v in m]}, std "
                          f"{[round(v, 4) for v in s]}), which --mean/--std contradict; drop --mean and --std")
        return tuple(inp.mean), tuple(inp.std)
    if own:
        return None, None
    if spec is not None and spec.channels == channels:
        return spec.mean, spec.std
    raise UserError("the model's input normalisation is unknown: pass --mean and --std (one value per channel) it "
                    "was trained with, or --dataset for that dataset's (e.g. --mean 0 0 0 --std 1 1 1 for none)")


def _read_files(inp: DefenseInput) -> InfectedSource:
    spec = get_spec(inp.dataset) if inp.dataset else None
    arch = inp.arch or (spec.arch if spec else None)
    k = inp.num_classes or (spec.num_classes if spec else None)
    require(arch is not None, f"a model of other code needs --arch (one of {', '.join(ARCHS)}) or --dataset")
    require(k is not None, "a model of other code needs --num_classes (its class count) or --dataset")
    weights = strip_module_prefix(load_weights(inp.model_path, inp.allow_pickle))
    train, paths, classes = read_images(inp.train_data, k, size=inp.image_size)
    shape = tuple(train.x.shape[1:])
    if spec is not None and shape != (spec.channels, spec.size, spec.size):
        raise UserError(f"--train_data holds {shape[0]}x{shape[1]}x{shape[2]} images, {inp.dataset}'s are "
                        f"{spec.channels}x{spec.size}x{spec.size}; drop --dataset or give {inp.dataset} images")
    conv = _first_conv_channels(weights)
    if conv is not None and conv[1] != shape[0]:
        raise UserError(f"the training images have {shape[0]} channel(s) but the model's first layer ({conv[0]}) "
                        f"takes {conv[1]}; give images with {conv[1]} channel(s)")
    mean, std = _normalisation(inp, weights, shape[0], spec)
    state = fit_state_dict(weights, arch, k, shape[0], mean, std)
    test, _, _ = read_images(inp.test_data, k, classes, inp.image_size)
    _same_shape(test, shape, "--test_data", inp.test_data)
    test_bd = None
    if inp.test_bd_data:
        test_bd, _, _ = read_images(inp.test_bd_data, k, classes, inp.image_size)
        _same_shape(test_bd, shape, "--test_bd_data", inp.test_bd_data)
    truth = None
    if inp.poison_indices:
        truth = _mask(read_poison_indices(inp.poison_indices, len(train)), len(train))
    meta = {"arch": arch, "arch_kwargs": {"num_classes": k, "in_channels": shape[0]}, "dataset": inp.dataset,
            "num_classes": k, "input_size": list(shape), "seed": None, "args": {}}
    files = {"model": inp.model_path, "train": inp.train_data, "poison_indices": inp.poison_indices,
             "test": inp.test_data, "test_bd": inp.test_bd_data}
    return InfectedSource("files", meta, state_dict=state, train=ImageSet(train.x, train.y, k), paths=paths,
                          classes=classes, truth=truth, test=ImageSet(test.x, test.y, k),
                          test_bd=None if test_bd is None else ImageSet(test_bd.x, test_bd.y, k), files=files)


def _read_backdoorbench(path: str, source: DataSource) -> InfectedSource:
    run = read_backdoorbench(path, source.data_root)
    c = run.input_size[0]
    meta = {"arch": run.arch, "arch_kwargs": {"num_classes": run.num_classes, "in_channels": c},
            "dataset": run.dataset, "num_classes": run.num_classes, "input_size": list(run.input_size), "seed": None,
            "args": {}}
    return InfectedSource("backdoorbench", meta, state_dict=run.state_dict, train=run.train,
                          truth=_mask(run.poison_indices, len(run.train)), test=run.test, test_bd=run.test_bd,
                          files={"backdoorbench": path, "data_root": source.data_root})


@dataclass
class InfectedRun:
    origin: str
    meta: dict  # what the defended model.pt records about the model and data
    model: torch.nn.Module
    reference: torch.nn.Module  # frozen copy of the infected model
    backdoor: BackdoorSpec | None  # the trigger (toolkit); None for other code's data
    poisoned: PoisonedTrainSet | GivenTrainSet  # the training data as the attacker left it
    test: object
    test_bd: ImageSet | None  # triggered test set (images with the trigger, backdoor labels): ASR without a trigger
    augment: object  # the attack's training augmentation (other code's: --dataset's, else none)
    extra: ImageSet | None = None  # a clean extra set the defender holds (AFT's --extra_data)
    paths: list | None = None  # the training images' files
    files: dict = field(default_factory=dict)
    ck: dict | None = None  # toolkit: the checkpoint
    data: DataSettings | None = None  # toolkit: the attack's data settings, read from the defense's --data_root

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def truth(self) -> torch.Tensor | None:
        """Ground truth of the poisoned training samples (CPU bool mask), or None: detection is not measurable."""
        return self.poisoned.truth

    @property
    def true_target(self) -> int | None:
        """The attack's all2one target, for the summary: the trigger's, or the triggered test set's one label."""
        if self.backdoor is not None:
            return self.backdoor.target_label if self.backdoor.attack_mode == "all2one" else None
        if self.test_bd is not None and len(self.test_bd) and bool((self.test_bd.y == self.test_bd.y[0]).all()):
            return int(self.test_bd.y[0])
        return None

    @property
    def train_indices(self):
        return self.ck["train_indices"] if self.ck is not None else None

    def not_measurable(self) -> dict:
        """What this run cannot measure, and why (summary.json and the log say it)."""
        out = {}
        if self.backdoor is None and self.test_bd is None:
            out["asr"] = "no trigger is known and no triggered test set was given (--test_bd_data)"
        if self.truth is None:
            out["detection"] = ("no ground truth of the poisoned training samples was given (--poison_indices)"
                                if self.backdoor is None else "batch poisoning poisons other images every epoch")
        return out

    def describe(self) -> str:
        if self.origin == "toolkit":
            ck = self.ck
            return f"{ck['trigger']['type']} {ck['attack_mode']} {ck['dataset']} model from {self.files['model']}"
        where = self.files.get("backdoorbench") or f"{self.files['model']} with training set {self.files['train']}"
        return f"{self.meta['arch']} model of other code ({self.origin}: {where})"


def _augment_for(dataset: str | None) -> Augment:
    if dataset is None or dataset not in DATASETS:
        return Augment()
    spec = get_spec(dataset)
    return Augment(spec.crop_pad, spec.rotation, spec.flip)


def _check_forward(model, shape, device) -> None:
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *shape, device=device))
    except RuntimeError as e:
        raise UserError(f"the model cannot take {shape[1]}x{shape[2]} images ({str(e).splitlines()[0][:120]}); give "
                        "images of the size it was trained on") from None


def _test_subset(test: ImageSet | None, n: int | None) -> ImageSet | None:
    """``--test_subset`` of a test set of other code: the same seeded subset as an attack of seed 0 would draw."""
    idx = None if test is None else seeded_subset(len(test), n, 0 + 1)
    return test if idx is None else test.subset(idx)


def _read_extra(path: str, src: InfectedSource, shape: tuple, num_classes: int) -> ImageSet:
    extra, _, _ = read_images(path, num_classes, src.classes)
    _same_shape(extra, shape, "--extra_data", path)
    return ImageSet(extra.x, extra.y, num_classes)


def load_infected(src: InfectedSource, source: DataSource, speed: SpeedSettings, device,
                  extra_data: str | None = None) -> InfectedRun:
    """Build the run from its source: the model (with the speed switches) and the data on ``device``."""
    shape, k = tuple(src.meta["input_size"]), int(src.meta["num_classes"])
    extra = _read_extra(extra_data, src, shape, k).to(device) if extra_data else None
    if src.origin == "toolkit":
        ck = src.ck
        data = data_from_checkpoint(ck, source)
        train, test, _ = load_data(data, ck["args"]["seed"], device, train_indices=ck["train_indices"])
        pidx = ck["poisoned_indices"]
        if pidx is not None and len(pidx) and int(pidx.max()) >= len(train):
            raise UserError(f"the training data under '{source.data_root}' has {len(train)} images, fewer than the "
                            "checkpoint's poisoned indices need; point --data_root at the data the model was trained "
                            "on")
        backdoor = backdoor_from_checkpoint(ck)
        poisoned = poisoned_train_from_checkpoint(ck, train, backdoor)
        model = prepare_model(model_from_checkpoint(ck, device), speed, device)  # channels_last, bf16, compile
        return InfectedRun("toolkit", src.meta, model, frozen_copy(model), backdoor, poisoned, test, None,
                           data.augment(), extra, None, src.files, ck, data)
    model = build_model(src.meta["arch"], k, shape[0])
    model.load_state_dict(src.state_dict)  # fit_state_dict checked every name and shape
    _check_forward(model, shape, "cpu")
    model = prepare_model(model.to(device), speed, device)
    poisoned = GivenTrainSet(src.train.to(device), src.truth)
    test, test_bd = _test_subset(src.test, source.test_subset), _test_subset(src.test_bd, source.test_subset)
    return InfectedRun(src.origin, src.meta, model, frozen_copy(model), None, poisoned, test.to(device),
                       test_bd.to(device) if test_bd is not None else None, _augment_for(src.meta["dataset"]), extra,
                       src.paths, src.files)
