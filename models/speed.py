"""The speed switches that follow a model: channels_last memory format, bf16 autocast and torch.compile.

``SpeedSettings`` is the one place where each switch is decided (``channels_last`` is also what the
training and evaluation loops use for their batches); ``prepare_model`` applies them to a freshly built
or loaded model without changing its state dict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models import ARCHS
from models.normalize import NormalizedModel, compile_forward
from utils.run.errors import UserError
from utils.settings import Settings, opt, require


# CPU flags of native bf16 arithmetic, where --amp auto turns bf16 on: AMX tiles, or AVX-512 BF16 dot products
# (2-core AMD EPYC Zen 4, cnn, bench.py: training 1.91x, PGD 1.53x, evaluation 1.53x fp32's; docs/speed.md)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def amp_choice(mode: str, device: torch.device) -> dict:
    """``--amp``, decided for this device: ``{"amp": "bf16" or "off", "why": ...}`` (the run records it).

    auto turns bf16 on for CUDA and for a CPU with native bf16 arithmetic (AMX-BF16 or AVX512-BF16, found at run
    time); elsewhere bf16 is emulated in fp32 units and slower than fp32, so auto leaves it off."""
    if mode in ("on", "off"):
        return {"amp": "bf16" if mode == "on" else "off", "why": f"--amp {mode}"}
    if device.type == "cuda":
        return {"amp": "bf16", "why": "--amp auto on CUDA"}
    if device.type != "cpu":
        return {"amp": "off", "why": f"--amp auto: off on {device.type}"}
    flags = cpu_flags()
    units = sorted(flags & set(BF16_FLAGS))
    capability = torch.backends.cpu.get_cpu_capability()
    if units:
        return {"amp": "bf16", "why": f"--amp auto: the CPU has native bf16 arithmetic ({', '.join(units)})",
                "cpu_bf16": units, "cpu_capability": capability}
    return {"amp": "off", "why": "--amp auto: the CPU has no native bf16 arithmetic (no " + " or ".join(BF16_FLAGS)
            + " flag; bf16 would be emulated and slower)", "cpu_bf16": units, "cpu_capability": capability}


def amp_dtype(mode: str, device: torch.device):
    """``--amp`` as the autocast dtype or None (``amp_choice``)."""
    return torch.bfloat16 if amp_choice(mode, device)["amp"] == "bf16" else None


def check_compile(device: torch.device) -> None:
    """Fail early, with one line, when torch.compile cannot build kernels here (no compiler, unsupported device)."""
    try:
        fn = torch.compile(lambda t: torch.relu(t) * 2 + 1)
        fn(torch.ones(4, device=device))
    except Exception as e:
        raise UserError(f"--compile: torch.compile does not work on this machine ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); run without --compile") from None


@dataclass(frozen=True)
class SpeedSettings(Settings):
    GROUP = "speed switches"
    channels_last: str = opt("auto", "channels_last memory format; auto = on", choices=("auto", "on", "off"))
    amp: str = opt("auto", "bf16 autocast inside the model (logits, losses and PGD steps stay float32); auto = on "
                           "for CUDA and for CPUs with native bf16 (AMX-BF16 or AVX512-BF16), detected at run time",
                   choices=("auto", "on", "off"))
    compile: bool = opt(False, "torch.compile the trained model's forward (the first batches are slow while it "
                               "compiles)", action="store_true")

    @property
    def use_channels_last(self) -> bool:
        return self.channels_last != "off"


@dataclass(frozen=True)
class ModelSettings(SpeedSettings):
    GROUP = "model"
    arch: str | None = opt(None, f"one of {', '.join(ARCHS)}", shown="per dataset")

    def check(self) -> None:
        require(self.arch is None or self.arch in ARCHS, f"unknown arch '{self.arch}'; choose one of {', '.join(ARCHS)}")


def prepare_model(model: torch.nn.Module, speed: SpeedSettings, device: torch.device) -> torch.nn.Module:
    """Apply channels_last, bf16 autocast and torch.compile to a freshly built/loaded model (state dict unchanged)."""
    if speed.use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    if isinstance(model, NormalizedModel):
        model.amp_dtype = amp_dtype(speed.amp, device)
        if speed.compile:
            check_compile(device)
            compile_forward(model)
    return model
