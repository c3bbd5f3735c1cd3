"""Backdoor triggers as pure batched operations on [0,1] NCHW tensors, plus the label maps.

Each trigger is a small ``nn.Module``-free class holding its own tensors (blend image, patch
pattern and mask, SIG signal, WaNet grids). ``trigger(x)`` poisons a whole batch on any device in
one tensor op; ``trigger.state()`` is a plain dict (type, params, tensors) stored in checkpoints
and ``trigger_from_state`` rebuilds the identical object, so training, defense and evaluation all
use the very same trigger. ``TRIGGERS`` is the registry (name -> class).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from utils.run.errors import UserError
from utils.settings import Settings, fraction, opt, require

Tensor = torch.Tensor


class Trigger:
    """Base class: ``apply`` poisons a batch; ``state``/``from_state`` round-trip it exactly."""

    name = "base"

    def __init__(self, shape: tuple[int, int, int], params: dict, tensors: dict[str, Tensor]):
        self.shape = tuple(int(s) for s in shape)  # (C, H, W)
        self.params = dict(params)
        self.tensors = {k: v.detach().clone() for k, v in tensors.items()}
        self._cache: dict[tuple, dict[str, Tensor]] = {}

    def _on(self, ref: Tensor) -> dict[str, Tensor]:
        """The trigger's tensors on ``ref``'s device and dtype (cached per device/dtype)."""
        key = (ref.device, ref.dtype)
        if key not in self._cache:
            self._cache[key] = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in self.tensors.items()}
        return self._cache[key]

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.name} trigger built for inputs of shape (N, {self.shape}), got {tuple(x.shape)}")

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x)
        return self.apply(x)

    def apply(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def state(self) -> dict:
        return {"type": self.name, "shape": list(self.shape), "params": dict(self.params),
                "tensors": {k: v.cpu().clone() for k, v in self.tensors.items()}}


class BlendTrigger(Trigger):
    """Blended attack: x' = (1 - alpha) x + alpha * image."""

    name = "blend"

    @classmethod
    def build(cls, shape, generator: torch.Generator, blend_alpha: float = 0.1, blend_image: str | None = None, **_):
        c, h, w = shape
        if blend_image:
            image = load_image_tensor(blend_image, c, h, w)
        else:
            image = default_blend_pattern(c, h, w)
        return cls(shape, {"blend_alpha": float(blend_alpha), "blend_image": blend_image}, {"image": image})

    def apply(self, x):
        a = self.params["blend_alpha"]
        return torch.lerp(x, self._on(x)["image"].unsqueeze(0), a)


def default_blend_pattern(c: int, h: int, w: int) -> Tensor:
    """A fixed colour mosaic standing in for the paper's Hello-Kitty image (which cannot be shipped).

    8x8 cells of saturated colours (each channel 0 or 1, like the cartoon's flat high-contrast areas)
    spread over the image (nearest upsampling), from its own seed, so the pattern is the same for
    every run. A mosaic has edges at a scale a CNN sees, unlike per-pixel noise, so it is learned much
    faster at alpha 0.1 (docs/data.md); saturated cells keep the alpha-0.1 signal above the images' pixel
    noise.
    """
    cells = (torch.rand((1, c, 8, 8), generator=torch.Generator().manual_seed(20230401)) > 0.5).float()
    return F.interpolate(cells, size=(h, w), mode="nearest")[0].contiguous()


class PatchTrigger(Trigger):
    """BadNets: the 3x3 black/white pattern pasted into the bottom-right corner (cells scaled by patch_size)."""

    name = "patch"
    PATTERN = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0))

    @classmethod
    def build(cls, shape, generator: torch.Generator, patch_size: int | None = None, **_):
        c, h, w = shape
        s = int(patch_size) if patch_size else max(1, round(min(h, w) / 32))
        if 3 * s > min(h, w):
            raise UserError(f"--patch_size {s} makes a {3 * s}x{3 * s} patch, larger than the {h}x{w} image; use a smaller --patch_size")
        cells = torch.tensor(cls.PATTERN)
        block = cells.repeat_interleave(s, 0).repeat_interleave(s, 1)
        pattern = torch.zeros(c, h, w)
        mask = torch.zeros(1, h, w)
        pattern[:, h - 3 * s:, w - 3 * s:] = block
        mask[:, h - 3 * s:, w - 3 * s:] = 1.0
        return cls(shape, {"patch_size": s}, {"pattern": pattern, "mask": mask})

    def apply(self, x):
        t = self._on(x)
        return x * (1 - t["mask"]) + t["pattern"] * t["mask"]


class SigTrigger(Trigger):
    """SIG: add a horizontal sinusoid delta * sin(2 pi j f / W) to every row and channel, then clamp."""

    name = "sig"

    @classmethod
    def build(cls, shape, generator: torch.Generator, sig_delta: float = 10 / 255, sig_freq: float = 6, **_):
        c, h, w = shape
        j = torch.arange(w, dtype=torch.float64)
        row = float(sig_delta) * torch.sin(2 * math.pi * j * float(sig_freq) / w)
        signal = row.to(torch.float32).view(1, 1, w).expand(c, h, w).clone()
        return cls(shape, {"sig_delta": float(sig_delta), "sig_freq": float(sig_freq)}, {"signal": signal})

    def apply(self, x):
        return (x + self._on(x)["signal"]).clamp_(0.0, 1.0)


class WarpTrigger(Trigger):
    """WaNet: resample the image through a fixed smooth warping field (grids seeded and saved)."""

    name = "warp"

    @classmethod
    def build(cls, shape, generator: torch.Generator, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0, **_):
        c, h, w = shape
        if k < 2:
            raise UserError(f"--k must be at least 2 for the WaNet control grid, got {k}")
        ctrl = torch.rand((1, 2, k, k), generator=generator) * 2 - 1
        ctrl = ctrl / ctrl.abs().mean()
        noise_grid = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity_grid = torch.stack((xs, ys), dim=-1).unsqueeze(0)
        params = {"k": int(k), "s": float(s), "grid_rescale": float(grid_rescale)}
        return cls(shape, params, {"noise_grid": noise_grid, "identity_grid": identity_grid})

    def _grid(self, ref: Tensor) -> Tensor:
        t = self._on(ref)
        _, h, w = self.shape
        scale = torch.tensor([w, h], device=ref.device, dtype=ref.dtype)
        grid = (t["identity_grid"] + self.params["s"] * t["noise_grid"] / scale) * self.params["grid_rescale"]
        return grid.clamp(-1, 1)

    def apply(self, x):
        grid = self._grid(x).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp_(0.0, 1.0)

    def apply_noise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """WaNet's noise ("cross") mode: the backdoor grid plus a random per-image field; labels are kept."""
        self._check(x)
        n, _, h, w = x.shape
        field = torch.rand((n, h, w, 2), generator=generator, device=x.device if generator is None else generator.device)
        field = field.to(x.device, x.dtype) * 2 - 1
        scale = torch.tensor([w, h], device=x.device, dtype=x.dtype)
        grid = (self._grid(x) + field / scale).clamp(-1, 1)
        return F.grid_sample(x, grid, align_corners=True).clamp_(0.0, 1.0)


TRIGGERS: dict[str, type[Trigger]] = {t.name: t for t in (BlendTrigger, PatchTrigger, SigTrigger, WarpTrigger)}


def build_trigger(name: str, shape: tuple[int, int, int], seed: int = 0, **params) -> Trigger:
    """Build trigger ``name`` for images of ``shape`` = (C, H, W); random parts come from ``seed``."""
    if name not in TRIGGERS:
        raise UserError(f"unknown trigger '{name}'; choose one of {', '.join(TRIGGERS)}")
    return TRIGGERS[name].build(tuple(shape), torch.Generator().manual_seed(int(seed)), **params)


def trigger_from_state(state: dict) -> Trigger:
    """Rebuild the exact trigger saved by ``Trigger.state()``."""
    cls = TRIGGERS.get(state.get("type"))
    if cls is None:
        raise UserError(f"the checkpoint's trigger type {state.get('type')!r} is not one of {', '.join(TRIGGERS)}; "
                        "it was written by another version: re-create it with train_blend.py")
    return cls(tuple(state["shape"]), state["params"], state["tensors"])


def load_image_tensor(path: str, channels: int, height: int, width: int) -> Tensor:
    """Read an image file as a (C, H, W) float tensor in [0,1], resized (bicubic) to the data's size."""
    from PIL import Image
    import numpy as np

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --blend_image '{path}' ({e.__class__.__name__}: {e}); give a readable PNG/JPEG file") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class TriggerSettings(Settings):
    GROUP = "trigger"
    trigger_type: str = opt("blend", f"one of {', '.join(TRIGGERS)}")
    blend_alpha: float = opt(0.1, "blend: weight of the blended image", type=fraction)
    blend_image: str | None = opt(None, "blend: image file to blend in", shown="a fixed colour mosaic", metavar="PATH")
    patch_size: int | None = opt(None, "patch: BadNets cell size in pixels (the patch is 3x3 cells)", type=int,
                                 shown="image size / 32")
    sig_delta: float = opt(10 / 255, "SIG: amplitude in pixel units", type=fraction)
    sig_freq: float = opt(6.0, "SIG: cycles of the sine across the image width", type=float)
    k: int = opt(4, "WaNet: control-grid size", type=int)
    s: float = opt(0.5, "WaNet: warp strength", type=fraction)
    grid_rescale: float = opt(1.0, "WaNet: grid rescale", type=fraction, aliases=("--grid-rescale",))
    cross_ratio: float = opt(2.0, "WaNet: noise-mode images per poisoned image (labels kept)", type=fraction)

    def check(self) -> None:
        require(self.trigger_type in TRIGGERS,
                f"unknown trigger '{self.trigger_type}'; choose one of {', '.join(TRIGGERS)}")
        require(0 < self.blend_alpha <= 1, f"--blend_alpha must be in (0, 1], got {self.blend_alpha}")
        require(0 < self.sig_delta <= 1,
                f"--sig_delta is in pixel units and must be in (0, 1], e.g. 10/255; got {self.sig_delta}")
        require(self.patch_size is None or self.patch_size > 0, f"--patch_size must be positive, got {self.patch_size}")
        require(self.sig_freq > 0, f"--sig_freq must be positive, got {self.sig_freq}")
        require(self.cross_ratio >= 0, f"--cross_ratio must be >= 0, got {self.cross_ratio}")
        if self.blend_image is not None:
            require(os.path.isfile(self.blend_image),
                    f"--blend_image '{self.blend_image}' does not exist; give a PNG/JPEG file")

    def params(self) -> dict:
        """The keyword arguments of ``build_trigger`` (each trigger class takes the ones it needs)."""
        return {"blend_alpha": self.blend_alpha, "blend_image": self.blend_image, "patch_size": self.patch_size,
                "sig_delta": self.sig_delta, "sig_freq": self.sig_freq, "k": self.k, "s": self.s,
                "grid_rescale": self.grid_rescale}


# ----- label maps -------------------------------------------------------------------------------

def _all2one(y: Tensor, target: int, num_classes: int) -> Tensor:
    return torch.full_like(y, int(target))


def _all2all(y: Tensor, target: int, num_classes: int) -> Tensor:
    return (y + 1) % int(num_classes)


LABEL_MAPS: dict[str, Callable[[Tensor, int, int], Tensor]] = {"all2one": _all2one, "all2all": _all2all}


def backdoor_labels(y: Tensor, attack_mode: str, target: int, num_classes: int) -> Tensor:
    """The labels the backdoor maps ``y`` to: all2one -> target; all2all -> (y + 1) mod C."""
    if attack_mode not in LABEL_MAPS:
        raise UserError(f"unknown attack mode '{attack_mode}'; choose one of {', '.join(LABEL_MAPS)}")
    return LABEL_MAPS[attack_mode](y, target, num_classes)
