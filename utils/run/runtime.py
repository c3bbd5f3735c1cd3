"""Device choice, seeding and the CPU/GPU speed switches every entry script uses."""
from __future__ import annotations

import random

import numpy as np
import torch

from utils.run.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for but CUDA is not available here; use --device auto or cpu")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for the run's own random draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(int(seed))


# ----- speed switches (shared by train_blend.py, pbe_main.py, PUD.py and benchmarks/bench.py) --------------------

def use_channels_last(mode: str) -> bool:
    """``--channels_last``: auto means on (measured faster for every arch here, CPU included; see README Benchmarks)."""
    return mode != "off"


def amp_dtype(mode: str, device: torch.device):
    """``--amp``: bf16 autocast; auto = on for CUDA only. Returns the autocast dtype or None."""
    if mode == "on" or (mode == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def check_compile(device: torch.device) -> None:
    """Fail early, with one line, when torch.compile cannot build kernels here (no compiler, unsupported device)."""
    try:
        fn = torch.compile(lambda t: torch.relu(t) * 2 + 1)
        fn(torch.ones(4, device=device))
    except Exception as e:
        raise UserError(f"--compile: torch.compile does not work on this machine ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); run without --compile") from None


def prepare_model(model: torch.nn.Module, args, device: torch.device) -> torch.nn.Module:
    """Apply ``--channels_last``, ``--amp`` and ``--compile`` to a freshly built/loaded model (state dict unchanged)."""
    from models.normalize import NormalizedModel, compile_forward

    if use_channels_last(getattr(args, "channels_last", "auto")):
        model = model.to(memory_format=torch.channels_last)
    if isinstance(model, NormalizedModel):
        model.amp_dtype = amp_dtype(getattr(args, "amp", "auto"), device)
        if getattr(args, "compile", False):
            check_compile(device)
            compile_forward(model)
    return model
