"""Datasets: a spec per dataset name and loaders that return whole splits as uint8 tensors.

Small datasets (synthetic, MNIST-likes, CIFAR-10, GTSRB) are returned as one ``ImageSet`` -- a
uint8 NCHW tensor plus int64 labels -- so the caller can keep the split on the device and do
augmentation and poisoning as batched tensor ops. ImageNet subsets are too big for that and are
streamed from disk (see ``utils.data.streaming``). ``DATASETS`` is the registry (name -> spec).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from utils.run.checkpoint import atomic_write
from utils.run.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    channels: int
    size: int
    arch: str
    mean: tuple
    std: tuple
    crop_pad: int = 5
    rotation: float = 10.0
    flip: bool = False
    in_memory: bool = True
    train_size: int | None = None
    test_size: int | None = None


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("synthetic", 10, 3, 32, "cnn", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pad=0, rotation=0.0, flip=False,
                train_size=5000, test_size=1000),
    DatasetSpec("synthetic43", 43, 3, 32, "cnn", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pad=0, rotation=0.0,
                flip=False, train_size=8600, test_size=2150),
    DatasetSpec("cifar10", 10, 3, 32, "preactresnet18", (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), flip=True),
    DatasetSpec("gtsrb", 43, 3, 32, "preactresnet18", (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
    DatasetSpec("mnist", 10, 1, 28, "preactresnet18", (0.1307,), (0.3081,), crop_pad=2, rotation=10.0),
    DatasetSpec("fashionmnist", 10, 1, 28, "preactresnet18", (0.2860,), (0.3530,), crop_pad=2, rotation=10.0),
    DatasetSpec("imagenet", 10, 3, 224, "resnet18", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crop_pad=0,
                rotation=0.0, flip=True, in_memory=False),
)}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class ImageSet:
    """A whole split: ``x`` uint8 (N, C, H, W), ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device) -> "ImageSet":
        return ImageSet(self.x.to(device), self.y.to(device), self.num_classes)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        idx = idx.to(self.y.device)
        return ImageSet(self.x[idx], self.y[idx], self.num_classes)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                indices: torch.Tensor | None = None):
        """Yield (idx, x, y): dataset indices, float [0,1] images and labels, all on the data's device.

        ``indices`` restricts the pass to those dataset indices (e.g. a defense's extra set);
        ``shuffle`` draws the order from ``generator`` (a CPU generator, so runs are reproducible).
        """
        dev = self.y.device
        idx_all = torch.arange(len(self), device=dev) if indices is None else indices.to(dev)
        if shuffle:
            idx_all = idx_all[torch.randperm(len(idx_all), generator=generator).to(dev)]
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            yield idx, self.x[idx].float().div_(255), self.y[idx]


# ----- synthetic --------------------------------------------------------------------------------

SYNTH_ORIENTATIONS = (18.0, 54.0, 90.0, 126.0, 162.0)  # degrees; none at 0 so SIG's vertical stripes match no class
SYNTH_FREQUENCIES = (2.5, 5.0)  # cycles per image width
# more than 10 classes (synthetic43): a 9 x 5 grid of orientations and frequencies, still none at 0 degrees
MANY_ORIENTATIONS = tuple(10.0 + 20.0 * i for i in range(9))
MANY_FREQUENCIES = (2.0, 3.5, 5.0, 6.5, 8.0)


def gtsrb_like_weights(num_classes: int = 43) -> torch.Tensor:
    """Class frequencies spread like GTSRB's training set (its smallest class has 210 images, its largest 2,250:
    about 10.7x): evenly spaced from 1 to 10.7, in a fixed shuffled order."""
    w = torch.linspace(1.0, 10.7, num_classes)
    return w[torch.randperm(num_classes, generator=torch.Generator().manual_seed(43))]
# Pixel noise: fine texture as in natural images. WaNet's warp is only visible through how resampling moves and
# smooths fine detail, and a small CNN learns it only with enough of that detail (docs/data.md).
SYNTH_NOISE = 0.08


def make_synthetic(n: int, seed: int, size: int = 32, channels: int = 3, num_classes: int = 10,
                   class_weights: torch.Tensor | None = None) -> ImageSet:
    """A seeded procedural set: oriented gratings with random colours, phase, contrast and noise (10 classes, or
    up to 45 on a finer grid; ``class_weights`` draws the labels with those relative frequencies).

    The class is the (orientation, frequency) pair of the grating; the two colours, the phase, the
    contrast, a smooth illumination gradient and fine pixel noise are drawn independently of the class, so
    the mean colour carries no class information and a model has to see the texture.
    """
    g = torch.Generator().manual_seed(int(seed))
    if class_weights is None:
        y = torch.randint(0, num_classes, (n,), generator=g)
    else:
        y = torch.multinomial(class_weights.double(), n, replacement=True, generator=g)
    grid = (SYNTH_FREQUENCIES, SYNTH_ORIENTATIONS) if num_classes <= 10 else (MANY_FREQUENCIES, MANY_ORIENTATIONS)
    combos = [(o, f) for f in grid[0] for o in grid[1]]
    theta = torch.tensor([math.radians(combos[c % len(combos)][0]) for c in range(num_classes)])[y]
    freq = torch.tensor([combos[c % len(combos)][1] * (1 + c // len(combos)) for c in range(num_classes)])[y]
    theta = theta + torch.randn(n, generator=g) * math.radians(4)
    freq = freq * (1 + 0.08 * torch.randn(n, generator=g))
    phase = torch.rand(n, generator=g) * 2 * math.pi
    coords = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    arg = 2 * math.pi * freq.view(n, 1, 1) * (xx * torch.cos(theta).view(n, 1, 1) + yy * torch.sin(theta).view(n, 1, 1))
    wave = 0.5 + 0.5 * torch.sin(arg + phase.view(n, 1, 1))  # (n, H, W) in [0, 1]
    contrast = 0.35 + 0.35 * torch.rand(n, 1, 1, 1, generator=g)
    c1 = 0.15 + 0.7 * torch.rand(n, channels, 1, 1, generator=g)
    c2 = 0.15 + 0.7 * torch.rand(n, channels, 1, 1, generator=g)
    mix = 0.5 + (wave.unsqueeze(1) - 0.5) * contrast
    img = c1 * mix + c2 * (1 - mix)
    gx, gy = (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.1, (torch.rand(n, 1, 1, 1, generator=g) - 0.5) * 0.1
    img = img + gx * (xx - 0.5) + gy * (yy - 0.5)
    img = img + SYNTH_NOISE * torch.randn(img.shape, generator=g)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(x.contiguous(), y.long(), num_classes)


# ----- torchvision datasets ---------------------------------------------------------------------

def _missing_data(name: str, root: str, download: bool, hint: str, err: Exception) -> UserError:
    """The data is not under ``root``: with ``--download never`` say so (torchvision's own message suggests its
    ``download=True``, which is no flag here), else quote why the download failed."""
    if not download:
        return UserError(f"{name} data not found under --data_root '{root}', and --download never does not fetch it; "
                         f"{hint}, or leave out --download never to let torchvision download it")
    return UserError(f"{name} data not found under --data_root '{root}' and downloading it failed "
                     f"({err.__class__.__name__}: {str(err)[:120]}); check the network, or {hint}")


def _to_imageset(data, targets, num_classes: int) -> ImageSet:
    x = torch.as_tensor(np.asarray(data))
    if x.dim() == 3:  # N, H, W (MNIST-likes)
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3):  # N, H, W, C
        x = x.permute(0, 3, 1, 2)
    return ImageSet(x.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(targets)).long(), num_classes)


def _torchvision_set(cls_name: str, spec: DatasetSpec, root: str, train: bool, download: bool, hint: str) -> ImageSet:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(root, train=train, download=download)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError when files are missing
        raise _missing_data(spec.name, root, download, hint, e) from None
    return _to_imageset(ds.data, ds.targets, spec.num_classes)


def _gtsrb(spec: DatasetSpec, root: str, train: bool, download: bool) -> ImageSet:
    """GTSRB through torchvision's reader, resized to the spec size once and cached as a tensor file."""
    import torchvision
    from PIL import Image

    split = "train" if train else "test"
    cache = os.path.join(root, "gtsrb", f"gtsrb_{split}_{spec.size}x{spec.size}.pt")
    if os.path.exists(cache):
        d = torch.load(cache, weights_only=True)  # our own cache: tensors only
        return ImageSet(d["x"], d["y"], spec.num_classes)
    hint = f"run 'bash gtsrb_download.sh {root}' on a connected machine or copy the GTSRB folder to '{root}/gtsrb'"
    try:
        ds = torchvision.datasets.GTSRB(root, split=split, download=download)
    except Exception as e:
        raise _missing_data("gtsrb", root, download, hint, e) from None
    xs, ys = [], []
    for path, label in ds._samples:  # one-off conversion; the cache makes later runs instant
        with Image.open(path) as im:
            xs.append(np.asarray(im.convert("RGB").resize((spec.size, spec.size), Image.BILINEAR)))
        ys.append(label)
    out = _to_imageset(np.stack(xs), ys, spec.num_classes)
    atomic_write(cache, lambda tmp: torch.save({"x": out.x, "y": out.y}, tmp))  # a unique temp name per writer
    return out


def _synthetic(spec: DatasetSpec, root: str, train: bool, download: bool) -> ImageSet:
    n = spec.train_size if train else spec.test_size
    weights = gtsrb_like_weights(spec.num_classes) if spec.num_classes > 10 else None  # synthetic43: GTSRB-like
    return make_synthetic(n, seed=1 if train else 2, size=spec.size, channels=spec.channels,
                          num_classes=spec.num_classes, class_weights=weights)


TORCHVISION_FOLDERS = {"CIFAR10": "cifar-10-batches-py", "MNIST": "MNIST", "FashionMNIST": "FashionMNIST"}


def _torchvision_loader(cls_name: str):
    def load(spec: DatasetSpec, root: str, train: bool, download: bool) -> ImageSet:
        hint = f"copy the {TORCHVISION_FOLDERS[cls_name]} folder (as torchvision downloads it) into '{root}'"
        return _torchvision_set(cls_name, spec, root, train, download, hint)
    return load


LOADERS = {"synthetic": _synthetic, "synthetic43": _synthetic, "cifar10": _torchvision_loader("CIFAR10"), "mnist": _torchvision_loader("MNIST"),
           "fashionmnist": _torchvision_loader("FashionMNIST"), "gtsrb": _gtsrb}


def load_split(name: str, root: str, train: bool, download: bool = True) -> ImageSet:
    """Load one split of an in-memory dataset as an ``ImageSet`` on the CPU."""
    spec = get_spec(name)
    if name not in LOADERS:
        raise UserError(f"dataset '{name}' is streamed from disk, not loaded into memory")
    return LOADERS[name](spec, root, train, download)


def seeded_subset(n_total: int, n: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a seeded random subset of size ``n`` (None = keep everything)."""
    if n is None or n >= n_total:
        return None
    g = torch.Generator().manual_seed(int(seed) + 7919)
    return torch.randperm(n_total, generator=g)[:n].sort().values
