"""Readers for models and data this toolkit did not make: other code's weights, tensor files, image folders,
ground-truth poison lists and BackdoorBench attack results.

Everything comes back in the toolkit's own forms (a state dict that loads into ``models.build_model``, an
``ImageSet`` of uint8 NCHW images), so the defenses need no special cases. Files are read with
``torch.load(..., weights_only=True)``: a foreign file is untrusted, and unpickling arbitrary objects runs
their code. Only ``load_weights(..., allow_pickle=True)`` (the user's explicit ``--allow_pickle``) lifts
that. Every user-fixable problem is a one-line ``UserError``. The formats are in docs/external_formats.md.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict

import numpy as np
import torch

from models import build_model
from utils.datasets import ImageSet
from utils.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "netC")  # common {"<key>": state_dict} wrappers
_FEW = 4  # how many mismatched keys an error names


# ----- torch files --------------------------------------------------------------------------------

def _pickle_culprit(err: Exception) -> str | None:
    """The object a weights_only load refused, as torch names it; None when the bytes are no pickle at all."""
    for pattern in (r"GLOBAL ([\w.]+)", r"got <class '([\w.]+)'>", r"unrecognized function (\S+)"):
        m = re.search(pattern, str(err))
        if m:
            return m.group(1)
    return None


def _torch_load(path: str, what: str, hint: str):
    """``torch.load`` with weights_only=True; a refused pickle or an unreadable file becomes one UserError."""
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _pickle_culprit(e) is None:  # garbage also fails inside the weights-only unpickler
            raise UserError(f"{what} '{path}' is not a torch file (its bytes are no pickle torch can read)") from None
        raise UserError(f"{what} '{path}' holds pickled Python objects ({_pickle_culprit(e)}), "
                        f"not only tensors; {hint}") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/... for truncated or foreign files
        raise UserError(f"{what} '{path}' is not a readable torch file "
                        f"({e.__class__.__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_module_prefix(state: dict) -> dict:
    """Drop the ``module.`` that DataParallel/DDP put before every key (possibly more than once)."""
    out = OrderedDict()
    for k, v in state.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _unwrap_state_dict(obj, path: str) -> dict:
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
            if isinstance(obj.get(key), torch.nn.Module):
                return obj[key].state_dict()
        keys = ", ".join(map(str, list(obj)[:8]))
        raise UserError(f"'{path}' holds a dict without a state dict (keys: {keys}); expected a state dict "
                        f"or one under {', '.join(repr(k) for k in WRAPPER_KEYS)}")
    raise UserError(f"'{path}' holds a {type(obj).__name__}, not a state dict or an nn.Module")


def load_weights(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from ``path``: plain, wrapped (``{"state_dict"|"model"|"net"|"netC": ...}``) or DataParallel's.

    A whole pickled ``nn.Module`` (or any other pickle) is read only with ``allow_pickle=True``, because
    unpickling runs code the file names; without it such a file is refused before anything in it runs.
    """
    hint = ("loading it runs code from the file: only for a file you trust, pass --allow_pickle "
            "(or save model.state_dict() instead)")
    if allow_pickle:
        if not os.path.isfile(path):
            raise UserError(f"weights file '{path}' does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)  # the user's explicit opt-in
        except Exception as e:
            raise UserError(f"weights file '{path}' could not be unpickled ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''})") from None
    else:
        obj = _torch_load(path, "weights file", hint)
    return strip_module_prefix(_unwrap_state_dict(obj, path))


# ----- mapping other code's parameter names onto ours ---------------------------------------------

# (pattern, replacement) on a key without our "net." prefix. kuangliu / WaNet / BackdoorBench PreActResNet18 keep
# the 1x1 shortcut conv in an nn.Sequential (``shortcut.0.weight``); ours is the bare conv (``shortcut.weight``).
RENAMES = {
    "preactresnet18": ((re.compile(r"\.shortcut\.0\."), ".shortcut."), (re.compile(r"^fc\."), "linear.")),
    "resnet18": (),  # torchvision's own names
    "cnn": (),
}
# Layers some lineages have and ours lacks: an exact diagnosis instead of a list of unexpected keys.
EXTRA_LAYERS = {
    "preactresnet18": (re.compile(r"^bn\.(weight|bias|running_mean|running_var|num_batches_tracked)$"),
                       "a final BatchNorm 'bn' (BN-ReLU before pooling, as in the fast adversarial training "
                       "lineage) that this toolkit's PreActResNet18 lacks"),
}


def _target_key(key: str, arch: str) -> str:
    if key.startswith("normalize."):
        return key
    name = key[len("net."):] if key.startswith("net.") else key
    for pattern, repl in RENAMES.get(arch, ()):
        name = pattern.sub(repl, name)
    return "net." + name


def _filled_by_default(key: str) -> bool:
    """Keys a foreign file may lack without harm: our normalisation buffers and BN step counters."""
    return key.startswith("normalize.") or key.endswith("num_batches_tracked")


def fit_state_dict(state: dict, arch: str, num_classes: int, in_channels: int = 3, mean=None, std=None) -> dict:
    """Rename ``state`` (ours, kuangliu/WaNet/BackdoorBench PreActResNet18, torchvision ResNet18) to the keys of
    ``build_model(arch, num_classes, in_channels, mean, std)`` and check every shape.

    Tensors are passed through unchanged (bit-exact). Keys the file lacks that carry no learned state
    (``normalize.*``, BN ``num_batches_tracked``) come from the freshly built model, so pass the
    normalisation the weights were trained with as ``mean``/``std``; a file's own ``normalize.*`` wins.
    """
    target = build_model(arch, num_classes, in_channels, mean, std).state_dict()
    src = strip_module_prefix(state)
    mapped: dict[str, tuple[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in src.items():
        tkey = _target_key(key, arch)
        if tkey in target:
            mapped[tkey] = (key, value)
        else:
            unexpected.append(key)
    missing = [k for k in target if k not in mapped and not _filled_by_default(k)]
    extra = EXTRA_LAYERS.get(arch)
    if extra is not None and any(extra[0].match(k) for k in unexpected):
        raise UserError(f"the weights have {extra[1]} ({', '.join(k for k in unexpected if extra[0].match(k))}); "
                        f"they cannot be loaded into arch '{arch}' without changing the model")
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:_FEW]) + (", ..." if len(keys) > _FEW else "")
        parts = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected ({few(unexpected)})"] if unexpected else [])
        raise UserError(f"the weights do not fit arch '{arch}': keys {'; '.join(parts)}; "
                        f"pass the --arch the weights were trained as")
    classifier = [k for k, v in target.items() if v.dim() == 2][-1]  # the final Linear layer's weight
    for tkey, (key, value) in mapped.items():
        want = target[tkey].shape
        if value.shape == want:
            continue
        if tkey in (classifier, classifier[:-len("weight")] + "bias") and value.shape[1:] == want[1:]:
            raise UserError(f"the weights' classifier ({key}) has {value.shape[0]} outputs, not {want[0]}; "
                            f"pass --num_classes {value.shape[0]}")
        raise UserError(f"the weights do not fit arch '{arch}' with {in_channels} input channels: {key} has shape "
                        f"{tuple(value.shape)}, the model's {tkey} {tuple(want)}")
    out = OrderedDict()
    for tkey, default in target.items():
        value = mapped[tkey][1] if tkey in mapped else default
        out[tkey] = value if value.dtype == default.dtype else value.to(default.dtype)
    return out


# ----- images in tensor files ----------------------------------------------------------------------

def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def to_uint8_nchw(x, where: str) -> torch.Tensor:
    """Images as uint8 (N, C, H, W) from NCHW / NHWC (N×H×W: one channel), uint8, integers or floats.

    Floats whose maximum is at most 1 are [0, 1] pixels, other floats 0..255 (rounded); integers are 0..255.
    """
    x = _as_tensor(x)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise UserError(f"{where}: x has shape {tuple(x.shape)}; expected N x C x H x W or N x H x W x C images")
    if x.shape[1] not in (1, 3):
        if x.shape[-1] not in (1, 3):
            raise UserError(f"{where}: x has shape {tuple(x.shape)}; expected 1 or 3 channels, in dimension 1 "
                            "(N x C x H x W) or last (N x H x W x C)")
        x = x.permute(0, 3, 1, 2)
    if x.shape[0] == 0:
        raise UserError(f"{where}: x holds no images")
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.dtype == torch.bool or x.is_complex():
        raise UserError(f"{where}: x has dtype {x.dtype}; expected uint8, integer or float pixels")
    if x.is_floating_point():
        if not torch.isfinite(x).all():
            raise UserError(f"{where}: x holds NaN or infinite pixels")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 255:
            raise UserError(f"{where}: float pixels span [{lo:g}, {hi:g}]; expected [0, 1] or 0..255")
        x = x.double() * 255 if hi <= 1 else x.double()
        return x.round().to(torch.uint8).contiguous()
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
        raise UserError(f"{where}: integer pixels span [{lo}, {hi}]; expected 0..255")
    return x.to(torch.uint8).contiguous()


def to_labels(y, n: int, num_classes: int | None, where: str) -> tuple[torch.Tensor, int]:
    """int64 labels of length ``n`` inside [0, num_classes); ``num_classes`` None = largest label + 1."""
    y = _as_tensor(y)
    if y.dim() != 1 or y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise UserError(f"{where}: y must be a vector of integer labels, got {y.dtype} of shape {tuple(y.shape)}")
    if len(y) != n:
        raise UserError(f"{where}: {n} images but {len(y)} labels")
    y = y.long()
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise UserError(f"{where}: labels span [{int(y.min())}, {int(y.max())}], outside [0, {k}); "
                        "check the labels or --num_classes")
    return y.contiguous(), k


def read_tensor_file(path: str, num_classes: int | None = None) -> ImageSet:
    """An ``ImageSet`` from a ``.pt`` (weights_only) or ``.npz`` file holding ``x`` (images) and ``y`` (labels).

    ``num_classes`` None takes the largest label + 1 (the class count is ``.num_classes`` of the result).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        obj = _torch_load(path, "tensor file", "save plain tensors: torch.save({'x': x, 'y': y}, path)")
        if not isinstance(obj, dict):
            raise UserError(f"tensor file '{path}' holds a {type(obj).__name__}; expected a dict with 'x' and 'y'")
        data = obj
    elif ext == ".npz":
        if not os.path.isfile(path):
            raise UserError(f"tensor file '{path}' does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files if k in ("x", "y")}
        except ValueError as e:  # object arrays need pickle, which is refused
            raise UserError(f"tensor file '{path}' holds arrays numpy cannot read without pickle ({e}); "
                            "save numeric arrays: np.savez(path, x=x, y=y)") from None
        except Exception as e:
            raise UserError(f"tensor file '{path}' is not a readable .npz ({e.__class__.__name__})") from None
    else:
        raise UserError(f"tensor file '{path}' has extension '{ext}'; use .pt or .npz holding 'x' and 'y'")
    absent = [k for k in ("x", "y") if k not in data]
    if absent:
        raise UserError(f"tensor file '{path}' lacks {' and '.join(repr(k) for k in absent)} "
                        f"(keys found: {', '.join(map(str, data)) or 'none'}); store images as 'x', labels as 'y'")
    if not isinstance(data["x"], (torch.Tensor, np.ndarray)) or not isinstance(data["y"], (torch.Tensor, np.ndarray)):
        raise UserError(f"tensor file '{path}': 'x' and 'y' must be tensors or arrays")
    x = to_uint8_nchw(data["x"], f"tensor file '{path}'")
    y, k = to_labels(data["y"], x.shape[0], num_classes, f"tensor file '{path}'")
    return ImageSet(x, y, k)


# ----- image folders -------------------------------------------------------------------------------

def _size_hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


def read_image_folder(root: str, size=None) -> tuple[ImageSet, list[str], list[str]]:
    """``root/<class>/<image>`` as (ImageSet, image paths, class names); labels follow the sorted class names.

    Images are decoded to RGB, or to one channel when every image is grayscale. They must share one size
    unless ``size`` (an int or (H, W)) is given, which resizes the others (bilinear). The paths, in the
    set's order, let a later report name the files.
    """
    from PIL import Image

    if not os.path.isdir(root):
        raise UserError(f"image folder '{root}' does not exist")
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise UserError(f"image folder '{root}' has no class folders; expected root/<class>/<image>")
    want = _size_hw(size)
    arrays, labels, paths, gray = [], [], [], []
    first = None  # (path, (w, h)) of the first image: the size every other must have without `size`
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise UserError(f"class folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        for f in files:
            p = os.path.join(folder, f)
            try:
                with Image.open(p) as im:
                    gray.append(im.mode in ("1", "L", "I", "I;16", "F"))
                    rgb = im.convert("RGB")
            except Exception as e:  # PIL raises UnidentifiedImageError/OSError/... for broken files
                raise UserError(f"image '{p}' cannot be decoded ({e.__class__.__name__})") from None
            if want is not None:
                if rgb.size != (want[1], want[0]):
                    rgb = rgb.resize((want[1], want[0]), Image.BILINEAR)
            elif first is None:
                first = (p, rgb.size)
            elif rgb.size != first[1]:
                (w0, h0), (w1, h1) = first[1], rgb.size
                raise UserError(f"image '{p}' is {w1}x{h1} but '{first[0]}' is {w0}x{h0}; all images need one "
                                "size, or pass --image_size to resize them")
            arrays.append(np.asarray(rgb, dtype=np.uint8))
            labels.append(label)
            paths.append(p)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if all(gray):
        x = x[:, :1]
    return ImageSet(x.contiguous(), torch.tensor(labels, dtype=torch.long), len(classes)), paths, classes


# ----- ground-truth poisoned indices ---------------------------------------------------------------

def read_poison_indices(path: str, n: int) -> torch.Tensor:
    """Sorted int64 indices of the poisoned samples among ``n``, for detection metrics only.

    ``.txt``: one index per line (blank lines and ``#`` comments skipped). ``.pt`` / ``.npy``: an index
    vector, or a 0/1 (or bool) mask of length ``n`` -- a length-``n`` vector of only 0s and 1s is a mask.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        if not os.path.isfile(path):
            raise UserError(f"poison index file '{path}' does not exist")
        values = []
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                try:
                    values.append(int(line))
                except ValueError:
                    raise UserError(f"poison index file '{path}', line {lineno}: '{line}' is not an integer index") from None
        v, is_mask = torch.tensor(values, dtype=torch.long), False
    elif ext in (".pt", ".npy"):
        if ext == ".pt":
            obj = _torch_load(path, "poison index file", "save a plain tensor: torch.save(indices, path)")
        else:
            if not os.path.isfile(path):
                raise UserError(f"poison index file '{path}' does not exist")
            try:
                obj = np.load(path, allow_pickle=False)
            except Exception as e:
                raise UserError(f"poison index file '{path}' is not a numeric .npy ({e.__class__.__name__})") from None
        if isinstance(obj, (list, tuple)):
            obj = torch.tensor(obj)
        if not isinstance(obj, (torch.Tensor, np.ndarray)):
            raise UserError(f"poison index file '{path}' holds a {type(obj).__name__}; expected an index vector or mask")
        v = _as_tensor(obj).flatten() if _as_tensor(obj).dim() <= 1 else None
        if v is None:
            raise UserError(f"poison index file '{path}' holds shape {tuple(_as_tensor(obj).shape)}; expected a vector")
        is_mask = v.dtype == torch.bool or (len(v) == n and bool(((v == 0) | (v == 1)).all()))
        if not is_mask and v.is_floating_point():
            if not bool((v == v.round()).all()):
                raise UserError(f"poison index file '{path}' holds non-integer indices")
            v = v.long()
    else:
        raise UserError(f"poison index file '{path}' has extension '{ext}'; use .txt, .pt or .npy")
    if is_mask:
        if len(v) != n:
            raise UserError(f"poison mask '{path}' has length {len(v)}, the training set {n} samples")
        return torch.nonzero(v.bool(), as_tuple=False).flatten().long()
    v = v.long()
    if len(v) and (int(v.min()) < 0 or int(v.max()) >= n):
        raise UserError(f"poison index file '{path}': indices span [{int(v.min())}, {int(v.max())}], "
                        f"outside the training set's [0, {n})")
    uniq = torch.unique(v)
    if len(uniq) != len(v):
        raise UserError(f"poison index file '{path}' lists {len(v) - len(uniq)} indices more than once")
    return uniq

