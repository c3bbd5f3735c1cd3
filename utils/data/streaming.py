"""Streamed (disk) datasets: an ImageNet-style class-folder subset read with DataLoader workers.

Layout (``--dataset imagenet``)::

    <data_root>/imagenet/train/<class>/<image>     e.g. imagenet/train/n01440764/n01440764_10026.JPEG
    <data_root>/imagenet/val/<class>/<image>       the same class folder names

Any ImageNet subset in this layout works (Imagenette, the paper's 10-class set, is one). The classes
are the first ``--imagenet_classes N`` folder names of ``train/`` in sorted order (default 10), or the
names listed in ``--imagenet_class_list FILE`` (one per line, in label order); only those folders are
scanned, so pointing at a full ImageNet-1k tree is fine. The resolved names are stored in the run's
args (``imagenet_class_names``) and so in the checkpoint, and the defenses reuse them.

Workers decode, resize and (for training) randomly crop/flip the images (``num_workers``; pinned
host memory and non-blocking copies on CUDA); the float batch then moves to the device,
where the trigger and the poisoning are applied as batched tensor ops, like the in-memory sets.
"""
from __future__ import annotations

import os

import torch

from utils.run.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def split_folder(root: str, train: bool) -> str:
    return os.path.join(root, "imagenet", "train" if train else "val")


def _class_folders(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"imagenet folder '{folder}' not found; put an ImageNet subset there as <class>/<image> folders "
                        f"(train/ and val/ with the same class names), e.g. Imagenette")
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def resolve_classes(root: str, n: int | None = None, list_file: str | None = None) -> list[str]:
    """The class folder names used as labels 0..C-1: from ``list_file``, else the first ``n`` of train/ sorted."""
    available = _class_folders(split_folder(root, True))
    if list_file:
        try:
            with open(list_file) as f:
                names = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except OSError as e:
            raise UserError(f"--imagenet_class_list '{list_file}' cannot be read ({e.strerror}); give a readable text "
                            "file with one class folder per line") from None
        if not names:
            raise UserError(f"--imagenet_class_list '{list_file}' lists no class names; write one class folder name "
                            "per line")
        if len(set(names)) != len(names):
            raise UserError(f"--imagenet_class_list '{list_file}' names a class twice; list each class folder once")
        missing = [c for c in names if c not in set(available)]
        if missing:
            raise UserError(f"--imagenet_class_list names {len(missing)} class folder(s) missing from "
                            f"'{split_folder(root, True)}', e.g. '{missing[0]}'; fix the names or add the folders")
        return names
    n = 10 if n is None else n
    if n > len(available):
        raise UserError(f"--imagenet_classes {n} but '{split_folder(root, True)}' has only {len(available)} class "
                        f"folders; pass --imagenet_classes {len(available)} or fewer")
    return available[:n]


class _ClassFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder restricted to (and labelled by the order of) ``classes``; only those folders are read."""

    def __init__(self, folder: str, classes: list[str], transform):
        from torchvision.datasets.folder import default_loader

        self.loader, self.transform = default_loader, transform
        self.samples: list[tuple[str, int]] = []
        missing = [c for c in classes if not os.path.isdir(os.path.join(folder, c))]
        if missing:
            raise UserError(f"class folder '{missing[0]}' is missing from '{folder}' ({len(missing)} of {len(classes)} "
                            "missing); train/ and val/ need the same class folders")
        for label, c in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(folder, c), followlinks=True)):
                for name in sorted(files):
                    if name.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), label))
        if not self.samples:
            raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders under '{folder}'; point "
                            "--data_root at the folder holding imagenet/train and imagenet/val")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return i, self.transform(self.loader(path)), label


class StreamingSplit:
    """A class-folder split that yields (idx, x, y) batches on ``device`` like ``ImageSet.batches``.

    ``keep`` (sorted sample indices) restricts the split to a seeded subset (``--train_subset``); the
    split is then re-indexed 0..len-1 like an ``ImageSet`` subset.
    """

    def __init__(self, root: str, train: bool, size: int, num_workers: int, device, classes: list[str] | int | None = None,
                 keep: torch.Tensor | None = None):
        import torchvision.transforms as T

        if classes is None or isinstance(classes, int):
            classes = resolve_classes(root, classes)
        if train:
            tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
        else:
            tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])
        self.base = _ClassFolder(split_folder(root, train), list(classes), tf)
        if keep is not None:
            self.base.samples = [self.base.samples[i] for i in keep.tolist()]
        self.classes = list(classes)
        self.num_classes = len(classes)
        self.num_workers = num_workers
        self.device = torch.device(device)
        # labels live on the device, like ImageSet.y: PoisonedTrainSet indexes its masks with device indices
        self.y = torch.tensor([y for _, y in self.base.samples], dtype=torch.long).to(self.device)
        self._loaders: dict = {}

    def __len__(self):
        return len(self.base)

    def _loader(self, ds, batch_size: int, shuffle: bool, generator, persistent: bool):
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                           num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                                           persistent_workers=persistent and self.num_workers > 0)

    def batches(self, batch_size: int, shuffle: bool = False, generator=None, indices=None):
        if indices is None:
            # whole-split passes (every epoch, every evaluation) reuse one loader: workers stay alive
            key = (batch_size, shuffle, id(generator))
            if key not in self._loaders:
                self._loaders[key] = self._loader(self.base, batch_size, shuffle, generator, persistent=True)
            loader = self._loaders[key]
        else:
            ds = torch.utils.data.Subset(self.base, indices.cpu().tolist())
            loader = self._loader(ds, batch_size, shuffle, generator, persistent=False)
        nb = self.device.type == "cuda"
        for idx, x, y in loader:
            yield idx.to(self.device, non_blocking=nb), x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)


def write_synthetic_folders(root: str, num_classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                            size: int = 224, seed: int = 0) -> list[str]:
    """An ImageNet-style class-folder tree of synthetic gratings (``<root>/imagenet/{train,val}/<class>/*.png``)
    at ``size`` pixels: the 224 px path (streaming, resnet18) run offline; returns the class names."""
    from PIL import Image

    from utils.data.datasets import make_synthetic

    names = [f"n{c:08d}" for c in range(num_classes)]
    for split, per, s in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
        data = make_synthetic(per * num_classes * 3, seed=s, size=size, num_classes=num_classes)
        for c, name in enumerate(names):
            folder = os.path.join(root, "imagenet", split, name)
            os.makedirs(folder, exist_ok=True)
            for i, j in enumerate(torch.nonzero(data.y == c).flatten()[:per].tolist()):
                Image.fromarray(data.x[j].permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{name}_{i}.png"))
    return names
