"""The one-file checkpoint: weights plus everything needed to rebuild and re-evaluate the model.

A checkpoint is a dict with ``format == FORMAT``: state dict, arch, dataset, classes, input size,
the trigger state (type, params, tensors), attack mode, target, poisoned indices, seed, args,
metrics and library versions. Writes are atomic (temp file in the same folder, then rename), so a
crash never leaves a torn file. ``load_checkpoint`` turns every way a file can be wrong into a
``UserError`` that names the problem.
"""
from __future__ import annotations

import os
import platform
import tempfile

import torch

from utils.run.distributed import is_main
from utils.run.errors import UserError

FORMAT = "pud-toolkit-checkpoint"
VERSION = 1


def versions() -> dict:
    import numpy
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "checkpoint_version": VERSION}


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
    state, the poisoned indices (``poisoned``: a ``PoisonedTrainSet``) and metrics."""
    fixed = poisoned is not None and poisoned.mode == "fixed"
    payload = {
        **meta, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "trigger": backdoor.trigger.state(), "attack_mode": backdoor.attack_mode, "target_label": backdoor.target_label,
        "poison_mode": poisoned.mode if poisoned is not None else None,
        "poisoned_indices": poisoned.poison_idx.clone() if fixed else None,
        "noise_indices": poisoned.noise_idx.clone() if fixed else None,
        "train_indices": train_indices, "metrics": metrics,
    }
    payload.update(extra or {})
    return payload


def save_checkpoint(path: str, payload: dict) -> None:
    payload = dict(payload, format=FORMAT, version=VERSION, versions=versions())
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
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' is unreadable or truncated ({e.__class__.__name__}); re-create it with train_blend.py") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a checkpoint of this toolkit (a plain state dict or another tool's file); "
                        "train the model with train_blend.py, which writes the one-file checkpoint")
    if ck.get("version") != VERSION:
        raise UserError(f"checkpoint '{path}' has format version {ck.get('version')}, this toolkit reads version {VERSION}")
    return ck
