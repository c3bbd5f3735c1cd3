"""A run folder: args.json, metrics.jsonl (one line per epoch/round), summary.json, atomically written (rank 0 only)."""
from __future__ import annotations

import json
import os

from utils.checkpoint import atomic_write
from utils.distributed import is_main
from utils.errors import UserError


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


class RunDir:
    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def start(self, args: dict) -> None:
        if not is_main():  # torchrun: only rank 0 writes the run folder
            return
        os.makedirs(self.path, exist_ok=True)
        self.write_json("args.json", args)
        atomic_write(self.file("metrics.jsonl"), lambda tmp: open(tmp, "w").close())

    def write_json(self, name: str, obj) -> None:
        text = _dump(obj)

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text + "\n")
        atomic_write(self.file(name), write)

    def log(self, record: dict) -> None:
        if not is_main():
            return
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            f.flush()

    def records(self) -> list[dict]:
        if not is_main():
            return []
        with open(self.file("metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]


def check_out_dir(path: str, overwrite: bool = False) -> None:
    """Refuse to reuse a folder that holds a finished run, and check the folder can be written."""
    if os.path.exists(os.path.join(path, "summary.json")) and not overwrite:
        raise UserError(f"'{path}' already holds a finished run (summary.json); pick another --out_dir or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    probe = path if os.path.isdir(path) else parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to '{path}' (no write permission on '{probe}'); choose a writable --out_dir")
