"""Where and how a run runs: device choice, seeding, and the run settings every entry script shares."""
from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from utils.run.errors import UserError
from utils.settings import Settings, opt, require


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)  # absent from some builds
        if mps is not None and mps.is_available():
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


@dataclass(frozen=True)
class RunSettings(Settings):
    GROUP = "run"
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    seed: int = opt(0, "seeds python, numpy and torch; every random draw of the run follows from it", type=int)
    out_dir: str | None = opt(None, "run folder", shown="a new folder under runs/", metavar="PATH")
    overwrite: bool = opt(False, "start over in a folder holding a finished or interrupted run", action="store_true")
    resume: bool = opt(False, "continue the interrupted run in --out_dir from its last saved state (same arguments "
                              "otherwise)", action="store_true")
    bs: int = opt(128, "training batch size (under torchrun the global one)", type=int)
    eval_bs: int = opt(512, "evaluation batch size", type=int)
    figures: bool = opt(True, "draw the run's figures when it ends (curves.png, samples.png, PBE's rounds.png; "
                              "--no-figures skips them, about 1.5 s a run on a CPU; python -m utils.figures FOLDER "
                              "draws the curves later)",
                        action=argparse.BooleanOptionalAction)
    threads: int | None = opt(None, "CPU threads torch computes with (1 is the fastest when other jobs share the "
                                    "CPU)", type=int, shown="torch's own choice")

    def check(self) -> None:
        pick_device(self.device)  # an unknown or absent device is a UserError
        require(not (self.resume and self.overwrite),
                "--resume continues the run in --out_dir and --overwrite starts it over; pass only one of them")
        require(not self.resume or self.out_dir is not None, "--resume needs the --out_dir of the interrupted run")
        require(self.out_dir is None or not os.path.isfile(self.out_dir),
                f"--out_dir '{self.out_dir}' is a file, not a folder; choose another --out_dir")
        require(self.bs > 0, f"--bs must be positive, got {self.bs}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        require(self.bs % world == 0, f"--bs {self.bs} is the global batch size and must divide by the {world} "
                                      f"processes; use a multiple of {world}")
        require(self.eval_bs > 0, f"--eval_bs must be positive, got {self.eval_bs}")
        require(self.threads is None or self.threads > 0,
                f"--threads must be a positive number of CPU threads, got {self.threads}; leave it out for torch's own")

    def apply_threads(self) -> None:
        """``--threads``: torch's intra-op thread count for this process (None leaves torch's default)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
