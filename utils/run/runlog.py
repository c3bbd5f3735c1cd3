"""A run folder: args.json, metrics.jsonl (one line per epoch/round), summary.json, all written atomically (rank 0 only under torchrun).

Every write replaces the whole file through ``atomic_write`` (metrics.jsonl included: a run logs a few
hundred lines at most, so rewriting it is cheap), so a killed process never leaves a torn line.
``resume`` cuts metrics.jsonl back to the lines the saved state had seen, so a resumed run does not
log an epoch twice.
"""
from __future__ import annotations

import json
import os
import time

from utils.run.checkpoint import atomic_write
from utils.run.distributed import is_main
from utils.run.errors import UserError

STATE_FILE = "state.pt"  # written by utils.run.resume; here because check_out_dir must know it
FAILURE_FILE = "failure.json"
# What a fresh run (or --overwrite) clears, so a new run never mixes with an old one's results.
RUN_FILES = ("summary.json", STATE_FILE, FAILURE_FILE, "model.pt", "curves.png", "samples.png", "rounds.png",
             "suspects.csv")


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


class RunDir:
    def __init__(self, path: str):
        self.path = path
        self._lines: list[str] = []

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def start(self, args: dict) -> None:
        """A fresh run: remove a previous run's files (only reached with --overwrite), write args.json."""
        self._lines = []
        if not is_main():  # torchrun: only rank 0 touches the run folder
            return
        os.makedirs(self.path, exist_ok=True)
        for name in RUN_FILES:
            if os.path.exists(self.file(name)):
                os.remove(self.file(name))
        self.write_json("args.json", args)
        _write_text(self.file("metrics.jsonl"), "")

    def resume(self, n_lines: int) -> None:
        """Continue a run whose saved state had logged ``n_lines`` lines; later lines are dropped."""
        path = self.file("metrics.jsonl")
        lines = []
        if os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
        self._lines = lines[:n_lines]
        _write_text(path, "".join(line + "\n" for line in self._lines))

    @property
    def n_lines(self) -> int:
        return len(self._lines)

    def write_json(self, name: str, obj) -> None:
        _write_text(self.file(name), _dump(obj) + "\n")

    def write_text(self, name: str, text: str) -> None:
        _write_text(self.file(name), text)

    def log(self, record: dict) -> None:
        self._lines.append(json.dumps(record, sort_keys=True, default=str))
        _write_text(self.file("metrics.jsonl"), "".join(line + "\n" for line in self._lines))

    def records(self) -> list[dict]:
        """The lines logged so far (kept in memory, so every torchrun rank sees the same)."""
        return [json.loads(line) for line in self._lines]


def check_out_dir(path: str, overwrite: bool = False) -> None:
    """A fresh run: refuse a folder holding a finished or an interrupted run unless --overwrite."""
    if not overwrite:
        if os.path.exists(os.path.join(path, "summary.json")):
            raise UserError(f"'{path}' already holds a finished run (summary.json); pick another --out_dir or pass --overwrite")
        if os.path.exists(os.path.join(path, STATE_FILE)):
            how = ("stopped on a non-finite loss (failure.json)" if os.path.exists(os.path.join(path, FAILURE_FILE))
                   else "was interrupted")
            raise UserError(f"'{path}' holds a run that {how} ({STATE_FILE}); continue it with --resume "
                            "or start over with --overwrite")


def check_writable(path: str) -> None:
    """``path`` is (or can become) a folder this process can write to."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out_dir '{path}' is a file, not a folder; choose another --out_dir")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    probe = path if os.path.isdir(path) else parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"--out_dir '{path}' lies under '{probe}', which is a file; choose another --out_dir")
    if not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to '{path}' (no write permission on '{probe}'); choose a writable --out_dir")


def default_out_dir(script: str, *tags) -> str:
    """``runs/<script>-<tags>-<time>``: a new folder per run (script: attack, pbe or pud)."""
    tag = "-".join(str(t) for t in tags if t)
    return os.path.join("runs", f"{script}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
