"""Poisoned training data: which images carry the trigger, and batches with it applied on the device.

``poison_mode='fixed'`` (default) draws ``round(pc * N)`` indices once from a seeded generator; the
same images are poisoned in every epoch, and the indices are saved with the model so defenses can
rebuild the exact poisoned training set and measure detection against the ground truth.
``poison_mode='batch'`` reproduces the paper code: the first ``floor(pc * bs)`` images of every
shuffled batch are poisoned (different images each epoch; nothing to save).
For WaNet, ``cross_ratio * pc`` further images get the noise-mode warp with their true labels.
Clean-label poisoning (``among``: the target class's images, all2one) draws the poisoned images from
those only, so the backdoor label is the image's own label: the labels are kept, as Barni et al.'s SIG
and BackdoorBench run it.

``GivenTrainSet`` is a training set someone else poisoned (images and labels as given, no trigger known): it
has the same interface, so the defenses run on either without a special case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.data.datasets import ImageSet
from utils.run.errors import UserError
from utils.data.triggers import Trigger, WarpTrigger, backdoor_labels

POISON_MODES = ("fixed", "batch")


def draw_poison_indices(n: int, pc: float, seed: int, cross_ratio: float = 0.0,
                        among: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, disjoint (poison, noise) index sets: ``round(pc*n)`` and ``round(cross_ratio*pc*n)`` images.

    ``among`` (clean-label poisoning) restricts the poisoned images to those indices; the noise-mode images
    are drawn from the rest."""
    n_poison = int(round(pc * n))
    n_noise = int(round(cross_ratio * pc * n))
    if n_poison + n_noise > n:
        raise UserError(f"--pc {pc} with --cross_ratio {cross_ratio} needs {n_poison + n_noise} images but the training "
                        f"set has {n}; lower --pc or --cross_ratio")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 104729))
    if among is None:
        return perm[:n_poison].sort().values, perm[n_poison:n_poison + n_noise].sort().values
    inside = torch.zeros(n, dtype=torch.bool)
    inside[among.cpu()] = True
    if n_poison > int(inside.sum()):
        raise UserError(f"--clean_label --pc {pc} asks for {n_poison} poisoned images but the target class has only "
                        f"{int(inside.sum())}; lower --pc to at most {int(inside.sum()) / n:.3f}")
    poison = perm[inside[perm]][:n_poison]
    return poison.sort().values, perm[~inside[perm]][:n_noise].sort().values


@dataclass
class BackdoorSpec:
    """Everything that defines the attack: trigger, label map, target, class count."""

    trigger: Trigger
    attack_mode: str
    target_label: int
    num_classes: int

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        return backdoor_labels(y, self.attack_mode, self.target_label, self.num_classes)


class PoisonedTrainSet:
    """A device-resident training split that returns float batches with the backdoor applied."""

    def __init__(self, data: ImageSet, backdoor: BackdoorSpec, mode: str = "fixed", pc: float = 0.1,
                 poison_idx: torch.Tensor | None = None, noise_idx: torch.Tensor | None = None, cross_ratio: float = 0.0):
        if mode not in POISON_MODES:
            raise UserError(f"unknown --poison_mode '{mode}'; choose one of {', '.join(POISON_MODES)}")
        self.data = data
        self.backdoor = backdoor
        self.mode = mode
        self.pc = float(pc)
        self.cross_ratio = float(cross_ratio) if isinstance(backdoor.trigger, WarpTrigger) else 0.0
        dev = data.y.device
        n = len(data.y)
        self.is_poison = torch.zeros(n, dtype=torch.bool, device=dev)
        self.is_noise = torch.zeros(n, dtype=torch.bool, device=dev)
        self.poison_idx = poison_idx.cpu().long() if poison_idx is not None else torch.zeros(0, dtype=torch.long)
        self.noise_idx = noise_idx.cpu().long() if noise_idx is not None else torch.zeros(0, dtype=torch.long)
        if mode == "fixed":
            self.is_poison[self.poison_idx.to(dev)] = True
            self.is_noise[self.noise_idx.to(dev)] = True
        # Labels as the model sees them in training (the poisoned set's labels).
        self.train_labels = torch.where(self.is_poison, backdoor.labels(data.y), data.y)

    def __len__(self) -> int:
        return len(self.data.y)

    @property
    def truth(self) -> torch.Tensor | None:
        """The poisoned samples (a CPU bool mask) for detection metrics; None with ``batch`` poisoning, which
        poisons other images in every epoch."""
        return self.is_poison.cpu() if self.mode == "fixed" else None

    def untouched(self) -> torch.Tensor | None:
        """Indices of the images the attack left as they were (not poisoned, not WaNet noise-mode): the clean
        images a model-repair defense may use. With ``batch`` poisoning the stored images are all clean."""
        return torch.nonzero(~(self.is_poison | self.is_noise).cpu()).flatten()

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None, indices=None,
                augment=None):
        """Yield poisoned (idx, x, y) batches from the underlying split.

        ``augment`` runs before the trigger (as in the PBE code): the trigger then sits at the same
        pixels as at test time, which is what makes blend/patch/SIG learnable from few images.
        """
        for idx, x, y in self.data.batches(batch_size, shuffle=shuffle, generator=generator, indices=indices):
            if augment is not None:
                x = augment(x, generator)
            x, y = self.poison(idx, x, y, generator)
            yield idx, x, y

    def poison(self, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the backdoor to a float [0,1] batch ``x`` with true labels ``y`` of dataset indices ``idx``."""
        x = x.clone()
        if self.mode == "fixed":
            pmask, nmask = self.is_poison[idx], self.is_noise[idx]
        else:
            b = idx.shape[0]
            k = int(self.pc * b)
            kn = int(self.cross_ratio * self.pc * b)
            pos = torch.arange(b, device=idx.device)
            pmask, nmask = pos < k, (pos >= k) & (pos < k + kn)
        if pmask.any():
            x[pmask] = self.backdoor.trigger(x[pmask])
            y = torch.where(pmask, self.backdoor.labels(y), y)
        if nmask.any():
            x[nmask] = self.backdoor.trigger.apply_noise(x[nmask], generator)
        return x, y


class GivenTrainSet:
    """A training set as another tool left it: the images already carry whatever trigger it used, the labels
    are the ones it trained on. ``truth`` is the ground truth of the poisoned samples when the user gives it
    (for detection metrics and the model-repair simulation only), else None: nothing here knows which they are.
    """

    mode = "given"
    backdoor = None

    def __init__(self, data: ImageSet, truth: torch.Tensor | None = None):
        self.data = data
        self.train_labels = data.y
        self._truth = None if truth is None else truth.cpu().bool()

    def __len__(self) -> int:
        return len(self.data.y)

    @property
    def truth(self) -> torch.Tensor | None:
        return self._truth

    def untouched(self) -> torch.Tensor | None:
        """The samples the ground truth calls clean; None without a ground truth."""
        return None if self._truth is None else torch.nonzero(~self._truth).flatten()

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None, indices=None,
                augment=None):
        """(idx, x, y) batches of the images as given; ``augment`` as for ``PoisonedTrainSet`` (there is no trigger
        to apply after it)."""
        for idx, x, y in self.data.batches(batch_size, shuffle=shuffle, generator=generator, indices=indices):
            yield idx, (augment(x, generator) if augment is not None else x), y
