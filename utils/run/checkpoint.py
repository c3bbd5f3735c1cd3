"""The one-file checkpoint: weights plus everything needed to rebuild and re-evaluate the model.

A checkpoint is a dict with ``format == FORMAT``: state dict, arch, dataset, classes, input size,
the trigger state (type, params, tensors), attack mode, target, poisoned indices, seed, args,
metrics and library versions. Writes are atomic (temp file in the same folder, then rename), so a
crash never leaves a torn file. ``load_checkpoint`` turns every way a file can be wrong into a
``UserError`` that names the problem.

Every file is read with ``torch.load(..., weights_only=True)`` (``safe_load``): unpickling an arbitrary
object runs code the file names, so a crafted ``--model_path`` must not be unpickled. Files written here
hold only tensors, numbers, strings, None, lists and dicts (``check_plain`` refuses anything else before
it is written); checkpoints of earlier versions are read with exactly the extra globals they contain.
"""
from __future__ import annotations

import os
import pickle
import platform
import re
import tempfile
from collections import OrderedDict

import torch
from torch.torch_version import TorchVersion

from utils.run.distributed import is_main
from utils.run.errors import UserError

FORMAT = "pud-toolkit-checkpoint"
VERSION = 1
# Checkpoints written before the weights_only loads stored ``versions["torch"]`` as torch's TorchVersion (a str).
LEGACY_CHECKPOINT_GLOBALS = (TorchVersion,)
PLAIN_SCALARS = (str, int, float, bool, type(None))


def versions() -> dict:
    import numpy
    import torchvision

    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "numpy": numpy.__version__,
            "python": platform.python_version(), "checkpoint_version": VERSION}


def check_plain(obj, where: str = "the payload") -> None:
    """``TypeError`` naming the first value that is not a tensor, number, string, None, list or dict (exact types:
    a numpy float or a str subclass would need a pickled global to load), so every file written here loads with
    ``weights_only=True``. A programming error, not bad input: whatever put it there must convert it."""
    kind = type(obj)
    if kind in PLAIN_SCALARS or isinstance(obj, torch.Tensor):
        return
    if kind in (list,):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    if kind in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; only str and int keys load safely")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {kind.__module__}.{kind.__qualname__}; store it as tensors, numbers, strings, "
                    "lists and dicts so the file loads with weights_only=True")


def pickle_culprit(err: Exception) -> str | None:
    """The global a weights_only load refused, as torch names it; None when the bytes are no pickle at all."""
    for pattern in (r"GLOBAL ([\w.]+)", r"got <class '([\w.]+)'>", r"unrecognized function (\S+)"):
        m = re.search(pattern, str(err))
        if m:
            return m.group(1)
    return None


def safe_load(path: str, what: str, refused: str, unreadable: str, allowed: tuple = (), map_location="cpu"):
    """``torch.load(path, weights_only=True)``, with exactly the globals ``allowed`` besides torch's own.

    A file that pickles any other object is refused before that object is built (its code never runs):
    ``UserError`` "<what> '<path>' holds pickled Python objects (<global>) ...; <refused>". A torn or foreign
    file: "<what> '<path>' is unreadable or truncated (...); <unreadable>".
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = pickle_culprit(e)
        if culprit is not None:
            raise UserError(f"{what} '{path}' holds pickled Python objects ({culprit}), not only tensors and plain "
                            f"values; it is refused unread because loading them could run code: {refused}") from None
        raise UserError(f"{what} '{path}' is not a torch file (its bytes are no pickle torch can read); "
                        f"{unreadable}") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/KeyError/... for torn or foreign files
        raise UserError(f"{what} '{path}' is unreadable or truncated ({e.__class__.__name__}); {unreadable}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    """Flush a file's (or a folder's) data to disk; folders cannot be opened on some systems (Windows): skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, then rename the temp file over ``path`` (same folder, so the rename is atomic).

    A crash or a signal during ``write`` leaves the old file (or none) and never a torn one; the data and the
    rename are fsynced, so a power cut does not either. ``mkstemp``
    creates the temp file 0600; it gets the usual umask-based mode, so run folders stay readable by the team.
    Under torchrun only rank 0 writes; on the other ranks this is a no-op.
    """
    if not is_main():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # the data is on disk before the rename makes it the file (a power cut keeps old or new)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync(folder)  # and the rename itself
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def checkpoint_payload(meta: dict, model, backdoor, poisoned, train_indices, metrics: dict,
                       extra: dict | None = None) -> dict:
    """The one-file checkpoint: ``meta`` (arch, dataset, classes, input size, seed, args), weights, the trigger's
    state, the poisoned indices (``poisoned``: a ``PoisonedTrainSet``) and metrics. A model defended on data of
    other code has no trigger (``backdoor`` None): trigger, mode, target and indices are None."""
    fixed = poisoned is not None and poisoned.mode == "fixed"
    payload = {
        **meta, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "trigger": backdoor.trigger.state() if backdoor is not None else None,
        "attack_mode": backdoor.attack_mode if backdoor is not None else None,
        "target_label": backdoor.target_label if backdoor is not None else None,
        "poison_mode": poisoned.mode if poisoned is not None else None,
        "poisoned_indices": poisoned.poison_idx.clone() if fixed else None,
        "noise_indices": poisoned.noise_idx.clone() if fixed else None,
        "train_indices": train_indices, "metrics": metrics,
    }
    payload.update(extra or {})
    return payload


def save_checkpoint(path: str, payload: dict) -> None:
    payload = dict(payload, format=FORMAT, version=VERSION, versions=versions())
    check_plain(payload, "model.pt")
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and validate a checkpoint written by ``save_checkpoint``."""
    if not path:
        raise UserError("no checkpoint given; pass --model_path PATH to a model.pt written by train_blend.py")
    if os.path.isdir(path):
        inside = os.path.join(path, "model.pt")
        raise UserError(f"--model_path '{path}' is a folder; pass the checkpoint in it: --model_path {inside}"
                        if os.path.isfile(inside) else
                        f"--model_path '{path}' is a folder without a model.pt; pass --model_path <attack run "
                        "folder>/model.pt (the file train_blend.py writes)")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist; pass --model_path to a model.pt written by train_blend.py")
    ck = safe_load(path, "checkpoint", "pass a model.pt written by this toolkit (or a plain state dict with --arch "
                   "and --train_data)", "re-create it with train_blend.py", LEGACY_CHECKPOINT_GLOBALS, map_location)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a checkpoint of this toolkit (a plain state dict or another tool's file); "
                        "train the model with train_blend.py, which writes the one-file checkpoint")
    if ck.get("version") != VERSION:
        raise UserError(f"checkpoint '{path}' has format version {ck.get('version')}, this toolkit reads version {VERSION}")
    return ck
