"""Streamed (disk) datasets: an ImageNet-style class-folder subset read with DataLoader workers.

Images are decoded, resized and (for training) randomly cropped/flipped by the workers; the batch
is then moved to the device where triggers are applied as batched tensor ops, like the in-memory
sets. Layout: ``<data_root>/imagenet/{train,val}/<class>/<image>``.
"""
from __future__ import annotations

import os

import torch

from utils.errors import UserError


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return i, x, y


class StreamingSplit:
    """A class-folder split that yields (idx, x, y) batches on ``device`` like ``ImageSet.batches``."""

    def __init__(self, root: str, train: bool, size: int, num_workers: int, device, classes: int | None = None):
        import torchvision
        import torchvision.transforms as T

        folder = os.path.join(root, "imagenet", "train" if train else "val")
        if not os.path.isdir(folder):
            raise UserError(f"imagenet folder '{folder}' not found; put an ImageNet subset there as <class>/<image> folders "
                            f"(train/ and val/), e.g. Imagenette")
        if train:
            tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
        else:
            tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])
        self.base = torchvision.datasets.ImageFolder(folder, transform=tf)
        if classes is not None and classes < len(self.base.classes):
            keep = [i for i, (_, y) in enumerate(self.base.samples) if y < classes]
            self.base = torch.utils.data.Subset(self.base, keep)
            self.num_classes = classes
        else:
            self.num_classes = len(self.base.classes)
        self.y = torch.tensor([y for _, y in (self.base.dataset.samples if isinstance(self.base, torch.utils.data.Subset) else self.base.samples)])
        if isinstance(self.base, torch.utils.data.Subset):
            self.y = self.y[torch.tensor(self.base.indices)]
        self.num_workers = num_workers
        self.device = torch.device(device)

    def __len__(self):
        return len(self.base)

    def batches(self, batch_size: int, shuffle: bool = False, generator=None, indices=None):
        ds = _Indexed(self.base)
        if indices is not None:
            ds = torch.utils.data.Subset(ds, indices.cpu().tolist())
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                                             persistent_workers=False)
        for idx, x, y in loader:
            yield idx.to(self.device), x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
