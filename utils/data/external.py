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
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from models import build_model
from utils.data.datasets import ImageSet, load_split
from utils.run.checkpoint import safe_load
from utils.run.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "netC")  # common {"<key>": state_dict} wrappers
_FEW = 4  # how many mismatched keys an error names


# ----- torch files --------------------------------------------------------------------------------

def _torch_load(path: str, what: str, hint: str, allowed: tuple = ()):
    """``safe_load`` (weights_only=True, exactly ``allowed`` extra globals); a missing file is one UserError too."""
    if not os.path.isfile(path):
        raise UserError(f"{what} '{path}' does not exist")
    return safe_load(path, what, hint, "pass a file written by torch.save", allowed)


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
    hint = "if you trust the file, pass --allow_pickle (or save model.state_dict() instead)"
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


def _folder_labels(root: str, names: list[str], classes: list[str] | None) -> tuple[list[int], list[str]]:
    """Each class folder's label and the class list (``classes[label]`` = folder name).

    Integer folder names are their labels (``0/``, ``1/``, ..., as BackdoorBench saves images); other names
    are numbered in sorted order. ``classes`` (another folder's list, e.g. the training set's) fixes the
    labels instead, so a test folder that lacks a class still labels the others alike.
    """
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise UserError(f"image folder '{root}' has class folders {', '.join(unknown[:4])} that the training "
                            f"set does not have (its classes: {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
        return [classes.index(n) for n in names], list(classes)
    if all(n.isdigit() for n in names):
        top = max(int(n) for n in names)
        return [int(n) for n in names], [str(i) for i in range(top + 1)]
    return list(range(len(names))), list(names)


def read_image_folder(root: str, size=None, classes: list[str] | None = None) -> tuple[ImageSet, list[str], list[str]]:
    """``root/<class>/<image>`` as (ImageSet, image paths, class names); ``class names[label]`` is a folder name.

    Labels: ``_folder_labels``. Order: by file stem as a number when every stem in the tree is a distinct
    integer (``<class>/<index>.png``: the stem is the sample's index, which keeps a training set in the order
    its poisoned indices refer to), else class by class, files sorted. Images are decoded to RGB, or to one
    channel when every image is grayscale. They must share one size unless ``size`` (an int or (H, W)) is
    given, which resizes the others (bilinear). The paths, in the set's order, name the files in reports.
    """
    from PIL import Image

    if not os.path.isdir(root):
        raise UserError(f"image folder '{root}' does not exist")
    names = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not names:
        raise UserError(f"image folder '{root}' has no class folders; expected root/<class>/<image>")
    labels_of, class_list = _folder_labels(root, names, classes)
    entries = []  # (path, label)
    for label, name in zip(labels_of, names):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise UserError(f"class folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        entries += [(os.path.join(folder, f), label) for f in files]
    stems = [os.path.splitext(os.path.basename(p))[0] for p, _ in entries]
    if all(st.isdigit() for st in stems) and len(set(map(int, stems))) == len(stems):
        entries = [e for _, e in sorted(zip(map(int, stems), entries), key=lambda t: t[0])]
    want = _size_hw(size)
    arrays, gray = [], []
    first = None  # (path, (w, h)) of the first image: the size every other must have without `size`
    for p, _ in entries:
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
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if all(gray):
        x = x[:, :1]
    y = torch.tensor([label for _, label in entries], dtype=torch.long)
    return ImageSet(x.contiguous(), y, len(class_list)), [p for p, _ in entries], class_list


def read_images(path: str, num_classes: int | None = None, classes: list[str] | None = None, size=None):
    """(ImageSet, paths or None, class names or None) from an image folder or a ``.pt``/``.npz`` tensor file.

    ``num_classes`` bounds the labels (folder labels too); ``classes`` and ``size`` are for folders only.
    """
    if os.path.isdir(path):
        data, paths, names = read_image_folder(path, size, classes)
        if num_classes is not None and int(data.y.max()) >= num_classes:
            bad = names[int(data.y.max())]
            raise UserError(f"image folder '{path}': class folder '{bad}' is label {int(data.y.max())}, outside "
                            f"[0, {num_classes}); check the class folders or --num_classes")
        k = num_classes if num_classes is not None else data.num_classes
        return ImageSet(data.x, data.y, k), paths, names
    if not os.path.exists(path):
        raise UserError(f"'{path}' does not exist; give an image folder (root/<class>/<image>) or a .pt/.npz "
                        "tensor file with 'x' and 'y'")
    return read_tensor_file(path, num_classes), None, None


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


# ----- BackdoorBench -------------------------------------------------------------------------------

# BackdoorBench's get_dataset_normalization (utils/aggregate_block/dataset_and_transform_generate.py): its models
# see normalised input, so a NormalizedModel must use these.
BACKDOORBENCH_NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
BACKDOORBENCH_ARCHS = {"preactresnet18": "preactresnet18", "resnet18": "resnet18"}  # their model_name -> ours
BACKDOORBENCH_DATASETS = ("cifar10", "gtsrb")  # clean sets rebuilt from data_root (utils.data.datasets.load_split)
BACKDOORBENCH_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")
V2_STATE_KEYS = ("bd_data_container", "original_index_array", "poison_indicator")
# Pillow classes a pickled poisoned image may carry; each is read into _PickledImage, no Pillow code runs.
PIL_IMAGE_CLASSES = ("PIL.Image.Image", "PIL.PngImagePlugin.PngImageFile", "PIL.JpegImagePlugin.JpegImageFile",
                     "PIL.PpmImagePlugin.PpmImageFile", "PIL.BmpImagePlugin.BmpImageFile")


class _PickledImage:
    """Stands in for a pickled PIL image while unpickling: keeps Pillow's state ([info, mode, size, palette,
    raw bytes]) and runs nothing; ``_decode_image`` turns the raw bytes into pixels afterwards."""

    def __setstate__(self, state):
        self.state = state


def _backdoorbench_safe_globals() -> list:
    """Exactly what a BackdoorBench v2 attack_result.pt pickles besides tensors: numpy arrays, numpy scalars
    (dict keys), their dtypes, and PIL images (mapped to the inert _PickledImage). numpy 1.x files name the
    array helpers numpy.core.multiarray, numpy 2.x files numpy._core.multiarray; both are mapped."""
    ma = np._core.multiarray if int(np.__version__.split(".")[0]) >= 2 else np.core.multiarray
    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int32, np.int64, np.float32, np.float64)]
    out: list = [np.ndarray, np.dtype, *dtypes]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(ma._reconstruct, f"{module}._reconstruct"), (ma.scalar, f"{module}.scalar")]
    return out + [(_PickledImage, name) for name in PIL_IMAGE_CLASSES]


@dataclass
class BackdoorBenchRun:
    """An attack run of BackdoorBench in the toolkit's forms.

    ``state_dict`` loads into ``build_model(arch, num_classes, input_size[0], mean, std)``; ``train`` is the
    poisoned training set (poisoned samples with their backdoor labels), ``poison_indices`` its ground truth;
    ``test_bd`` holds the triggered test images with their backdoor labels, taken from the clean test images
    ``test_bd_indices``.
    """

    state_dict: dict
    arch: str
    num_classes: int
    input_size: tuple  # (C, H, W)
    mean: tuple
    std: tuple
    dataset: str
    train: ImageSet
    poison_indices: torch.Tensor
    test: ImageSet
    test_bd: ImageSet
    test_bd_indices: torch.Tensor


def _decode_image(img, channels: int, hw: tuple[int, int], where: str) -> np.ndarray:
    """One poisoned image (pickled PIL state, or an HWC / CHW array) as an H x W x C uint8 array."""
    from PIL import Image

    if isinstance(img, _PickledImage):
        st = img.state
        if not (isinstance(st, (list, tuple)) and len(st) >= 5 and isinstance(st[1], str) and isinstance(st[4], bytes)):
            raise UserError(f"{where}: a pickled image has an unknown Pillow layout; this reader expects "
                            "[info, mode, size, palette, bytes]")
        _, mode, size, palette, raw = st[:5]
        try:
            im = Image.frombytes(mode, tuple(size), raw)
            if palette and mode in ("L", "LA", "P", "PA"):
                im.putpalette(palette)
        except Exception as e:
            raise UserError(f"{where}: a pickled {mode} image could not be decoded ({e})") from None
        arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    elif isinstance(img, (np.ndarray, torch.Tensor)):
        arr = to_uint8_nchw(_as_tensor(img)[None], where)[0].permute(1, 2, 0).numpy()
    else:
        raise UserError(f"{where}: a poisoned sample holds a {type(img).__name__}, not an image")
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    if arr.shape != (hw[0], hw[1], channels):
        raise UserError(f"{where}: a poisoned image is {arr.shape[1]}x{arr.shape[0]}x{arr.shape[2]}, "
                        f"the attack's img_size {hw[1]}x{hw[0]}x{channels}")
    return arr


def _image_path(stored: str, folder: str | None, result_dir: str) -> str:
    """Where a poisoned PNG is now. BackdoorBench stores '<save_path>/bd_train_dataset/<label>/<i>.png', with
    save_path relative to its own checkout ('./record/<run>'); a downloaded run folder keeps the image folders
    beside attack_result.pt, so that place is tried first, then the stored path as it is."""
    folder = (folder or "").rstrip("/\\")
    tail = stored[len(folder):].lstrip("/\\") if folder and stored.startswith(folder) else \
        os.path.join(*re.split(r"[/\\]", stored)[-2:])
    beside = os.path.join(result_dir, os.path.basename(folder) or "bd_train_dataset", tail)
    if os.path.isfile(beside):
        return beside
    if os.path.isfile(stored):
        return stored
    raise UserError(f"poisoned image '{stored}' is missing (looked for '{beside}' too); keep the run's "
                    f"'{os.path.basename(folder) or 'bd_*_dataset'}' folder beside attack_result.pt")


def _read_container(state: dict, keys: np.ndarray, channels: int, hw, result_dir: str, where: str):
    """(images uint8 N x C x H x W, backdoor labels, original labels) of the poisoned samples ``keys``, in order."""
    from PIL import Image

    cont = state["bd_data_container"]
    if not (isinstance(cont, dict) and isinstance(cont.get("data_dict"), dict)):
        raise UserError(f"{where}: bd_data_container is not BackdoorBench v2's (no data_dict)")
    items = {int(k): v for k, v in cont["data_dict"].items()}
    folder = cont.get("save_folder_path")
    arrays, bd_labels, labels = [], [], []
    for k in keys.tolist():
        if k not in items:
            raise UserError(f"{where}: poisoned sample {k} is marked but not stored in bd_data_container")
        item = items[k]
        if isinstance(item, dict):  # on disk: {"path": png, "other_info": [bd_label, label]}
            p = _image_path(str(item["path"]), folder, result_dir)
            try:
                with Image.open(p) as im:
                    img = np.array(im.convert("RGB" if channels == 3 else "L"))
            except Exception as e:
                raise UserError(f"poisoned image '{p}' cannot be decoded ({e.__class__.__name__})") from None
            bd_label, label = item["other_info"][:2]
        elif isinstance(item, (tuple, list)) and len(item) >= 3:  # in RAM: (image, bd_label, label)
            img, bd_label, label = item[:3]
        else:
            raise UserError(f"{where}: poisoned sample {k} is stored as {type(item).__name__}, not BackdoorBench v2's")
        arrays.append(_decode_image(img, channels, hw, f"{where}, sample {k}"))
        bd_labels.append(int(bd_label))
        labels.append(int(label))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else \
        torch.zeros((0, channels, *hw), dtype=torch.uint8)
    return x, torch.tensor(bd_labels, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def _v2_state(state, what: str, path: str) -> dict:
    if isinstance(state, dict) and all(k in state for k in V2_STATE_KEYS):
        return state
    if isinstance(state, dict) and "x" in state and "y" in state:
        raise UserError(f"'{path}' is a BackdoorBench v1 attack result ({what} holds x/y tensors); this reader "
                        "supports the v2 layout (BackdoorBench 2.x, bd_dataset_v2): re-run the attack with v2")
    found = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
    raise UserError(f"'{path}': {what} is not BackdoorBench v2's prepro_cls_DatasetBD_v2 state (found: {found})")


def _clean_split(name: str, data_root: str, train: bool) -> ImageSet:
    """The clean split BackdoorBench only names: rebuilt by torchvision from ``data_root``, never downloaded."""
    try:
        return load_split(name, data_root, train, download=False)
    except UserError as e:
        raise UserError(f"the attack's clean {name} set is needed and missing: {e}") from None


def _original_labels_match(clean_y: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, name: str, what: str):
    bad = torch.nonzero(clean_y[idx] != labels).flatten()
    if len(bad):
        i = int(idx[bad[0]])
        raise UserError(f"the {name} {what} set under data_root is not the attack's: sample {i} has label "
                        f"{int(clean_y[i])} there, {int(labels[bad[0]])} in attack_result.pt (another copy or order?)")


def read_backdoorbench(path: str, data_root: str) -> BackdoorBenchRun:
    """Read a BackdoorBench v2 ``attack_result.pt`` (save_attack_result) into a ``BackdoorBenchRun``.

    The file stores the model, the dataset's name and only the poisoned samples (as pickled PIL images, or
    as PNG paths in ``bd_train_dataset/`` / ``bd_test_dataset/`` beside it); the clean CIFAR-10 / GTSRB
    splits are rebuilt from ``data_root`` and the poisoned samples put in place, as BackdoorBench's
    load_attack_result does. Loaded with weights_only=True and only numpy/PIL globals allowed.
    """
    hint = "it is not a BackdoorBench v2 attack_result.pt, or holds objects this reader does not load"
    obj = _torch_load(path, "BackdoorBench result", hint, tuple(_backdoorbench_safe_globals()))
    if not isinstance(obj, dict) or any(k not in obj for k in BACKDOORBENCH_KEYS):
        found = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"'{path}' is not a BackdoorBench attack_result.pt (expected keys "
                        f"{', '.join(BACKDOORBENCH_KEYS)}; found: {found})")
    model_name, name = str(obj["model_name"]), str(obj["clean_data"])
    if model_name not in BACKDOORBENCH_ARCHS:
        raise UserError(f"'{path}' holds a BackdoorBench '{model_name}'; supported: {', '.join(BACKDOORBENCH_ARCHS)}")
    if name not in BACKDOORBENCH_DATASETS:
        raise UserError(f"'{path}' was attacked on '{name}'; supported: {', '.join(BACKDOORBENCH_DATASETS)}")
    size = obj["img_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3):
        raise UserError(f"'{path}': img_size is {size!r}; expected (height, width, channels)")
    h, w, c = (int(s) for s in size)
    arch, num_classes = BACKDOORBENCH_ARCHS[model_name], int(obj["num_classes"])
    mean, std = BACKDOORBENCH_NORMALIZATION[name]
    if not _is_state_dict(obj["model"]):
        raise UserError(f"'{path}': 'model' is not a state dict")
    state = fit_state_dict(obj["model"], arch, num_classes, c, mean, std)
    if obj["bd_test"] is None:
        raise UserError(f"'{path}' holds no triggered test set (bd_test is None: a clean, benign run)")
    result_dir = os.path.dirname(os.path.abspath(path))
    # the layout first: an unsupported file fails before the clean data is read
    train_state = None if obj["bd_train"] is None else _v2_state(obj["bd_train"], "bd_train", path)
    test_state = _v2_state(obj["bd_test"], "bd_test", path)

    train, test = _clean_split(name, data_root, True), _clean_split(name, data_root, False)
    if tuple(train.x.shape[1:]) != (c, h, w):
        raise UserError(f"the {name} images under data_root are {tuple(train.x.shape[1:])} (C, H, W), the attack's "
                        f"img_size {(c, h, w)}")
    train = ImageSet(train.x.clone(), train.y.clone(), num_classes)
    poison = torch.zeros(0, dtype=torch.long)
    if train_state is not None:  # None: the attack poisons during training only (e.g. LIRA, Blind)
        st = train_state
        indicator = np.asarray(st["poison_indicator"]).reshape(-1)
        if len(indicator) != len(train):
            raise UserError(f"'{path}' poisons a training set of {len(indicator)} samples, the {name} training set "
                            f"under data_root has {len(train)}")
        keys = np.flatnonzero(indicator == 1)
        x, bd_y, y0 = _read_container(st, keys, c, (h, w), result_dir, f"'{path}' bd_train")
        idx = torch.from_numpy(keys).long()
        _original_labels_match(train.y, idx, y0, name, "training")
        train.x[idx], train.y[idx] = x, bd_y
        order = torch.from_numpy(np.asarray(st["original_index_array"]).astype(np.int64).reshape(-1))
        if not torch.equal(order, torch.arange(len(train))):  # the attack trained on a subset: keep its order
            train = train.subset(order)
            poison = torch.nonzero(torch.from_numpy(indicator == 1)[order]).flatten()
        else:
            poison = idx
    st = test_state
    bd_idx = np.asarray(st["original_index_array"]).astype(np.int64).reshape(-1)
    if len(bd_idx) == 0 or int(bd_idx.max()) >= len(test) or int(bd_idx.min()) < 0:
        raise UserError(f"'{path}': bd_test indexes {len(bd_idx)} test samples outside the {name} test set "
                        f"of {len(test)}")
    x, bd_y, y0 = _read_container(st, bd_idx, c, (h, w), result_dir, f"'{path}' bd_test")
    test_bd_indices = torch.from_numpy(bd_idx)
    _original_labels_match(test.y, test_bd_indices, y0, name, "test")
    return BackdoorBenchRun(state, arch, num_classes, (c, h, w), mean, std, name, train, poison,
                            ImageSet(test.x, test.y, num_classes), ImageSet(x, bd_y, num_classes), test_bd_indices)
