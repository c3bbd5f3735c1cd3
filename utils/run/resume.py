"""Resumable runs: ``<out_dir>/state.pt`` holds everything a run needs to continue bit-exactly.

A run saves its state at every epoch boundary (and at the defenses' stage boundaries): the state
dicts of its live objects (model, optimizer, scheduler), the run's ``torch.Generator`` and the
global python/numpy/torch RNG states, the loop cursor and loop-carried values (a ``carry`` dict:
epoch, round or step, extra and poison sets, history, teacher and frozen-copy weights, ...) and the
number of metrics.jsonl lines written so far. ``--resume`` rebuilds the run from the same arguments,
loads that state and continues from the cursor; an interrupted epoch is redone from its start, so the
result equals an uninterrupted run of the same seed (bit-exact on CPU; on a GPU as exact as the
kernels are deterministic). The state file is removed when the run finishes (summary.json is then
the mark of a finished run). It holds only tensors, numbers, strings, lists and dicts and is read with
``weights_only=True``: the numpy and python RNG states and the scheduler's Counter of milestones are
converted both ways (``rng_state``/``set_rng_state``, ``object_state``/``load_object_state``); a version-1
state (numpy arrays, tuples, a Counter) is still read, with exactly the numpy globals it holds allowed.

``RunControl`` is used as a context manager around a run's work: it installs the SIGINT/SIGTERM
flag (``utils.run.interrupt``), and on the way out turns an ``Interrupted`` into a message with the
resume command and a ``DivergenceError`` into ``failure.json`` plus a note on what was kept.
"""
from __future__ import annotations

import json
import os
import random
import shlex
import time
from collections import Counter

import numpy as np
import torch

from utils.run import interrupt
from utils.run.checkpoint import atomic_write, check_plain, safe_load
from utils.run.distributed import is_main
from utils.run.errors import DivergenceError, Interrupted, UserError
from utils.run.runlock import lock_run_folder, release_all
from utils.run.runlog import FAILURE_FILE, STATE_FILE, RunDir, check_out_dir, check_writable
from utils.run.stagetimer import StageTimer, activate

FORMAT = "pud-toolkit-run-state"
VERSION = 2  # 2: only plain values (weights_only); 1: numpy RNG state as an array, tuples, a Counter
READABLE = (1, 2)
SCRIPT_FILES = {"attack": "train_blend.py", "pbe": "pbe_main.py", "pud": "PUD.py"}
# Arguments a resumed run may change: where it runs and how it is told to resume, not what it computes.
NOT_COMPARED = ("resume", "overwrite", "out_dir", "device", "num_workers", "threads", "figures", "command")


def comparable_args(job) -> dict:
    """The settings that define what a run computes, as JSON values (so tuples and lists compare equal)."""
    return json.loads(json.dumps({k: v for k, v in job.flat().items() if k not in NOT_COMPARED}, default=str))


def resume_command(script: str, job) -> str:
    """The command that continues this run: its own command line without --overwrite, plus --resume."""
    argv = [a for a in job.command[1:] if a not in ("--resume", "--overwrite")]
    if not any(a == "--out_dir" or a.startswith("--out_dir=") for a in argv):
        argv += ["--out_dir", job.run.out_dir]
    return "python " + shlex.join([SCRIPT_FILES[script], *argv, "--resume"])


def _legacy_state_globals() -> tuple:
    """Exactly what a version-1 state.pt pickles besides torch's own types: numpy's MT19937 key (a uint32 array),
    under numpy 2's module name and numpy 1's."""
    ma = np._core.multiarray if int(np.__version__.split(".")[0]) >= 2 else np.core.multiarray
    return (np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            *((ma._reconstruct, f"{m}._reconstruct") for m in ("numpy.core.multiarray", "numpy._core.multiarray")))


def rng_state(gen: torch.Generator) -> dict:
    """Every RNG a run draws from, as plain values (numpy's key as an int64 tensor, python's state as a list)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out = {"generator": gen.get_state(), "torch": torch.get_rng_state(),
           "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
           "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    npst, pyst = state["numpy"], state["python"]
    if isinstance(npst, dict):
        np.random.set_state((npst["name"], npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                             npst["cached_gaussian"]))
        random.setstate((pyst["version"], tuple(pyst["internal"]), pyst["gauss_next"]))
    else:  # a version-1 state: numpy's own tuple and python's
        np.random.set_state(npst)
        random.setstate(pyst)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def object_state(obj) -> dict:
    """``obj.state_dict()`` as plain values: MultiStepLR's ``milestones`` Counter becomes a dict."""
    sd = obj.state_dict()
    if isinstance(sd.get("milestones"), Counter):
        sd = {**sd, "milestones": dict(sd["milestones"])}
    return sd


def load_object_state(obj, sd: dict) -> None:
    """The inverse of ``object_state``: the scheduler gets its Counter back (its closed form calls ``elements()``)."""
    if isinstance(getattr(obj, "milestones", None), Counter):
        sd = {**sd, "milestones": Counter(sd["milestones"])}
    obj.load_state_dict(sd)


def load_state(out_dir: str) -> dict:
    """Read and check ``<out_dir>/state.pt``; every way it can be wrong is a ``UserError`` naming the fix."""
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.isdir(out_dir):
        raise UserError(f"--resume: '{out_dir}' does not exist; give the --out_dir of the interrupted run")
    if not os.path.isfile(path):
        raise UserError(f"--resume: '{out_dir}' holds no saved state ({STATE_FILE}), so there is nothing to resume; "
                        "run without --resume")
    start_over = "start the run over with --overwrite instead of --resume"
    state = safe_load(path, "run state", start_over, f"the run cannot be resumed, {start_over}",
                      _legacy_state_globals())
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a run state of this toolkit; start the run over with --overwrite")
    if state.get("version") not in READABLE:
        raise UserError(f"run state '{path}' has format version {state.get('version')}, this toolkit reads versions "
                        f"{' and '.join(map(str, READABLE))}; finish it with the toolkit version that wrote it, or "
                        "start over with --overwrite")
    return state


def default_args(job) -> dict:
    """``comparable_args`` of the job's parts at their defaults."""
    return comparable_args(type(job)(**{name: cls() for name, cls in job.part_types()}))


def setting_differences(saved: dict, now: dict, defaults: dict) -> list[str]:
    """The settings that differ; a setting the saved run does not know (added to the toolkit since) counts as
    its default."""
    out = []
    for k in sorted(set(saved) | set(now)):
        was = saved[k] if k in saved else defaults.get(k)
        if was != now.get(k):
            out.append(f"--{k} {now.get(k)} (the run used {was})")
    return out


def prepare_out_dir(script: str, job) -> dict | None:
    """Before any work: take the run folder's lock, check --out_dir for a fresh run, or load the state
    ``--resume`` continues (returned)."""
    out_dir = job.run.out_dir
    if not job.run.resume:
        check_writable(out_dir)
        if is_main():  # torchrun: rank 0 owns the run folder
            lock_run_folder(out_dir)
        check_out_dir(out_dir, job.run.overwrite)
        return None
    if os.path.isdir(out_dir) and is_main():
        lock_run_folder(out_dir)
    if os.path.exists(os.path.join(out_dir, "summary.json")):
        raise UserError(f"--resume: the run in '{out_dir}' is finished (summary.json); nothing to resume "
                        "(pass --overwrite instead of --resume to run it again)")
    state = load_state(out_dir)
    if state.get("script") != script:
        raise UserError(f"--resume: '{out_dir}' holds a {SCRIPT_FILES.get(state.get('script'), '?')} run, "
                        f"not a {SCRIPT_FILES[script]} run")
    diff = setting_differences(state["args"], comparable_args(job), default_args(job))
    if diff:
        shown = ", ".join(diff[:3]) + (f" and {len(diff) - 3} more" if len(diff) > 3 else "")
        raise UserError(f"--resume: arguments differ from the interrupted run in '{out_dir}': {shown}; "
                        "resume with the run's own arguments plus --resume")
    return state


class RunControl:
    """One run's resumable state, its SIGINT/SIGTERM handling and its failure record (see the module doc)."""

    def __init__(self, script: str, job, run: RunDir, gen: torch.Generator, loaded: dict | None):
        self.script, self.job, self.run, self.gen, self.loaded = script, job, run, gen, loaded
        self.path = run.file(STATE_FILE)
        self.saved_position = loaded["position"] if loaded else None
        self.t0 = time.time() - (loaded["elapsed"] if loaded else 0.0)
        self.timer = StageTimer(loaded.get("stages") if loaded else None)  # continued by a resumed run
        self._entered_from = time.time()
        self._signals = None
        self._timer_before = None

    @property
    def resuming(self) -> bool:
        return self.loaded is not None

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 2)

    def stages(self) -> dict:
        """summary.json's ``stages``: seconds per stage of this run (``utils.run.stagetimer``) against its wall time."""
        return self.timer.record(time.time() - self.t0)

    def save(self, position: str, carry: dict, **objects) -> None:
        """Save the state after ``position`` (e.g. "epoch 3"); then stop here if a signal is pending."""
        with self.timer.stage("saving"):
            payload = {"format": FORMAT, "version": VERSION, "script": self.script, "args": comparable_args(self.job),
                       "position": position, "carry": carry,
                       "objects": {k: object_state(o) for k, o in objects.items()}, "rng": rng_state(self.gen),
                       "log_lines": self.run.n_lines, "elapsed": time.time() - self.t0,
                       "stages": dict(self.timer.seconds)}
            check_plain(payload, "state.pt")
            atomic_write(self.path, lambda tmp: torch.save(payload, tmp))
        self.saved_position = position
        interrupt.check(f"the end of {position} (state saved)")

    def restore(self, **objects) -> dict:
        """Load the saved objects, RNG states and log position; returns the saved ``carry``."""
        st = self.loaded
        for name, obj in objects.items():
            load_object_state(obj, st["objects"][name])
        set_rng_state(st["rng"], self.gen)
        self.run.resume(st["log_lines"])
        if is_main() and os.path.exists(self.run.file(FAILURE_FILE)):
            os.remove(self.run.file(FAILURE_FILE))
        print(f"resuming the run in {self.run.path} after {st['position']}", flush=True)
        return st["carry"]

    def finish(self) -> None:
        """The run is complete (summary.json written): the state is no longer needed."""
        if is_main() and os.path.exists(self.path):  # torchrun: rank 0 owns the run folder
            os.remove(self.path)

    def __enter__(self) -> "RunControl":
        self._signals = interrupt.handle_signals()
        self._signals.__enter__()
        # the seconds between the run's start and its work (optimizer, a first-use import such as torch._dynamo's)
        self.timer.seconds["setup"] = self.timer.seconds.get("setup", 0.0) + time.time() - self._entered_from
        self._timer_before = activate(self.timer)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        activate(self._timer_before)
        self._signals.__exit__(exc_type, exc, tb)
        try:
            self._note(exc)
        finally:
            release_all()  # the run folder's lock (utils.run.runlock): this run is over
        return False

    def _note(self, exc) -> None:
        """What was kept and how to go on, for an interrupted or diverged run (and its failure.json)."""
        kept = (f"the state saved after {self.saved_position} is kept in {self.path}" if self.saved_position
                else "no state was saved yet")
        if isinstance(exc, Interrupted):
            exc.note = (f"{kept}; resume with: {resume_command(self.script, self.job)}" if self.saved_position
                        else f"{kept}; run the command again")
        elif isinstance(exc, DivergenceError):
            model = self.run.file("model.pt")
            record = {"status": "diverged", "message": str(exc), "script": SCRIPT_FILES[self.script],
                      "stage": exc.stage, "epoch": exc.epoch, "batch": exc.batch, "loss": str(exc.value),
                      "last_saved_state": self.saved_position,
                      "state_file": STATE_FILE if self.saved_position else None,
                      "model_file": "model.pt" if os.path.exists(model) else None,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            self.run.write_json(FAILURE_FILE, record)
            exc.note = (f"{kept}" + (f", the last model in {model}" if record["model_file"] else "")
                        + f"; details in {self.run.file(FAILURE_FILE)}. Lower the learning rate and start over with "
                        "--overwrite")
