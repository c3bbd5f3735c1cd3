"""The papers' experiment grid as one command: attacks x defenses over triggers and modes; one table, one figure.

    python -m benchmarks.grid --preset quick                       # synthetic set, cnn: a 2-core CPU
    python -m benchmarks.grid --preset quick --autoattack 200      # then AutoAttack on 200 seeded test images
    python -m benchmarks.grid --preset quick --autoattack 200 --autoattack_only   # only that pass, no cell
    python -m benchmarks.grid --preset paper --dataset cifar10     # a GPU: PreActResNet18, the papers' schedules
    python -m benchmarks.grid --preset quick --report_only         # table and figure from the run folders

Every cell is a run folder under ``--root`` (default ``runs/grid-<preset>-<dataset>``): ``<attack>/attack``
for the infected model and ``<attack>/<defense>`` for each defense of it, run as the entry scripts with
the arguments below (the settings the README documents; one setting per defense for every cell). A
finished cell (``summary.json``) is skipped, an interrupted one (``state.pt``) resumed, one that failed is
retried, and a cell that still fails is shown as failed in the table (``grid_failures.json`` keeps its
exit code and the end of its log; logs are in ``<root>/logs``). Every run of a preset evaluates on the
same seeded test images (``--test_subset`` of the attack and the defenses). ``--autoattack N`` is a second
pass over the finished cells: AutoAttack at the reference strength on N seeded test images (the same
images for every cell), written to the cell's ``autoattack.json``; with ``--autoattack_only`` no cell is run
(without it the unfinished cells run first, with this checkout's code). At the end the table (markdown and
CSV, through ``utils.report``) and the heatmap of ASR, ACC and RA per cell are written to ``<root>``.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a file: re-run as the module from the repository root
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks.grid", *sys.argv[1:]], cwd=root))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"attack": "train_blend.py"}


@dataclass(frozen=True)
class Attack:
    """One attack cell: its folder name, train_blend.py arguments, and its all2one target (None: all2all)."""

    name: str
    args: tuple
    target: int | None


@dataclass(frozen=True)
class Defense:
    """A defense row: its folder name, entry script, arguments; ``wrong_target`` runs it on all2one cells only,
    with ``--target_label`` set to a class that is not the target. ``retrain``: a reference row, not a defense of
    the attack's model but the attack's own training again with ``args`` added (``CLEAN_MODEL``)."""

    name: str
    script: str
    args: tuple
    wrong_target: bool = False
    retrain: bool = False


# The attack's training without a poisoned image (the trigger kept): its ASR is what the trigger does to a model
# that never saw it, the floor a defense's ASR is read against (a blended image can look like a class by itself).
CLEAN_MODEL = Defense("clean-model", SCRIPTS["attack"], ("--pc", "0"), retrain=True)


@dataclass(frozen=True)
class Preset:
    name: str
    datasets: dict  # dataset -> the attack's data and model arguments (the defenses read them from the checkpoint)
    shared: dict  # dataset -> arguments of every run, attack and defenses (the same seeded test images for every row)
    attacks: tuple  # (dataset, list of Attack) pairs
    defenses: tuple
    num_classes: dict


def _attacks(common: tuple, schedules: dict, clean_sig: bool) -> list:
    """The trigger x mode cells, each trigger with its own epochs (``schedules[(trigger, mode)]``)."""
    out = []
    for (trigger, mode), sched in schedules.items():
        out.append(Attack(f"{trigger}-{mode}", (*common, "--trigger_type", trigger, "--attack_mode", mode, *sched),
                          0 if mode == "all2one" else None))
    if clean_sig:
        sched = schedules[("sig", "all2one")]
        out.append(Attack("sig-all2one-clean", (*common, "--trigger_type", "sig", "--attack_mode", "all2one",
                                                "--clean_label", *sched), 0))
    return out


QUICK_SCHED = {("blend", "all2one"): ("--n_iters", "5", "--schedulerC_milestones", "4"),
               ("patch", "all2one"): ("--n_iters", "5", "--schedulerC_milestones", "4"),
               ("sig", "all2one"): ("--n_iters", "5", "--schedulerC_milestones", "4"),
               ("warp", "all2one"): ("--n_iters", "18", "--schedulerC_milestones", "14"),
               ("blend", "all2all"): ("--n_iters", "14", "--schedulerC_milestones", "11"),
               ("patch", "all2all"): ("--n_iters", "14", "--schedulerC_milestones", "11", "--patch_size", "2"),
               ("sig", "all2all"): ("--n_iters", "14", "--schedulerC_milestones", "11"),
               ("warp", "all2all"): ("--n_iters", "36", "--schedulerC_milestones", "28")}  # 18 epochs: ASR 14 %
# the 43-class synthetic set (GTSRB-like class sizes): the all2one cells the issue asks for
QUICK43_SCHED = {(t, "all2one"): ("--n_iters", "10", "--schedulerC_milestones", "8") for t in ("blend", "patch", "sig")}
QUICK_DEFENSES = (
    CLEAN_MODEL,
    Defense("aft", "pbe_main.py", ("--ft_lr", "0.01")),
    # patch-shaped examples, half their windows where a universal patch fools the model most, each the worst of 4,
    # and 10 more clean epochs (all2all's backdoor is still falling at epoch 20): docs/ablations.md, three seeds
    Defense("aft-window", "pbe_main.py", ("--ft_lr", "0.01", "--adv_window", "5", "--adv_eps", "1", "--adv_alpha",
                                          "1/4", "--adv_random_start", "--adv_eps_outside", "6/255",
                                          "--window_search", "4", "--adv_restarts", "4", "--aft_epochs", "30")),
    Defense("pbe", "pbe_main.py", ("--progressive", "--ft_lr", "0.01", "--later_lr", "0.001", "--partial_batches", "0")),
    Defense("pud", "PUD.py", ("--step_epochs", "5", "3", "3", "3", "6", "--step_adv_epochs", "5", "2", "1", "1", "1",
                              "--pud_milestones", "15", "--unlearn_epochs", "5", "--mt_epochs", "5", "--unlearn_lambda",
                              "0.3", "--poison_fraction", "0.02")),
)
QUICK_DEFENSES = QUICK_DEFENSES + tuple(Defense(d.name + "-wrong-target", d.script, d.args, wrong_target=True)
                                        for d in QUICK_DEFENSES if d.name in ("pbe", "pud"))

PAPER_SCHED = {(t, m): () for t in ("blend", "patch", "sig", "warp") for m in ("all2one", "all2all")}
PAPER_DEFENSES = (CLEAN_MODEL, Defense("aft", "pbe_main.py", ()), Defense("pbe", "pbe_main.py", ("--progressive",)),
                  Defense("pud", "PUD.py", ()),
                  Defense("pbe-wrong-target", "pbe_main.py", ("--progressive",), wrong_target=True),
                  Defense("pud-wrong-target", "PUD.py", (), wrong_target=True))

PRESETS = {
    "quick": Preset("quick", {"synthetic": ("--dataset", "synthetic", "--arch", "cnn"),
                              "synthetic43": ("--dataset", "synthetic43", "--arch", "cnn")},
                    # 43 classes: every one of the 2,150 test images, so the target class 0 has 49 of them,
                    # not 24 (one image was 4.2 points of target-class accuracy against a 10-point target)
                    {"synthetic": ("--test_subset", "500"), "synthetic43": ()},
                    (("synthetic", _attacks(("--bs", "64", "--lr_C", "0.05"), QUICK_SCHED, clean_sig=True)),
                     ("synthetic43", _attacks(("--bs", "64", "--lr_C", "0.05"), QUICK43_SCHED, clean_sig=False))),
                    QUICK_DEFENSES, {"synthetic": 10, "synthetic43": 43}),
    "paper": Preset("paper", {"cifar10": ("--dataset", "cifar10"), "gtsrb": ("--dataset", "gtsrb"),
                              "imagenet": ("--dataset", "imagenet")}, {"cifar10": (), "gtsrb": (), "imagenet": ()},
                    tuple((d, _attacks((), PAPER_SCHED, clean_sig=True)) for d in ("cifar10", "gtsrb", "imagenet")),
                    PAPER_DEFENSES, {"cifar10": 10, "gtsrb": 43, "imagenet": 10}),  # times per cell: docs/grid.md
}


@dataclass
class Cell:
    attack: Attack
    defense: Defense | None  # None: the attack run itself
    folder: str
    log: str
    attack_folder: str  # the infected model's run folder (the seed-0 grid's)
    seed: int = 0  # the defenses' --seed (0: the grid's own; the attacks are always seed 0's)

    @property
    def name(self) -> str:
        return f"{self.attack.name}/{self.defense.name if self.defense else 'attack'}"

    @property
    def borrowed(self) -> bool:
        """An attack cell of another seed's grid: its infected model comes from the seed-0 grid, never run here."""
        return self.defense is None and self.seed != 0

    def command(self, preset: Preset, dataset: str) -> list:
        if self.defense is None or self.defense.retrain:
            argv = [SCRIPTS["attack"], *preset.datasets[dataset], *preset.shared[dataset], *self.attack.args,
                    *(self.defense.args if self.defense else ())]
        else:
            model = os.path.join(self.attack_folder, "model.pt")
            argv = [self.defense.script, "--model_path", model, *preset.shared[dataset], *self.defense.args]
            if self.defense.wrong_target:
                wrong = (self.attack.target + 1) % preset.num_classes[dataset]
                argv += ["--target_label", str(wrong)]
        if self.seed:
            argv += ["--seed", str(self.seed)]
        argv += ["--out_dir", self.folder]
        if os.path.exists(os.path.join(self.folder, "state.pt")):
            argv.append("--resume")
        return [sys.executable, *argv]


def seed_root(root: str, seed: int) -> str:
    """Where the defenses run with ``--seed seed``: the grid's own folder for 0, ``<root>-seed<N>`` otherwise."""
    return root if seed == 0 else f"{root}-seed{seed}"


def cells_of(preset: Preset, dataset: str, root: str, seed: int = 0) -> list:
    """The cells of the grid at ``root`` (the seed-0 folder); with ``seed`` N > 0 the defenses of
    ``seed_root(root, N)``, run with ``--seed N`` on seed 0's infected models (a defense evaluates on its infected
    model's seeded test images, so every seed's rows are scored on the same images). The clean-model reference
    is not repeated: trained with another seed it would have its own trigger pattern and test images."""
    attacks = dict(preset.attacks)[dataset]
    here = seed_root(root, seed)
    out = []
    for a in attacks:
        infected = os.path.join(root, a.name, "attack")
        out.append(Cell(a, None, infected, os.path.join(root, "logs", f"{a.name}-attack.log"), infected, seed))
        for d in preset.defenses:
            if (d.wrong_target and a.target is None) or (d.retrain and seed):  # a retrained reference is seed 0's
                continue
            log = os.path.join(here, "logs", f"{a.name}-{d.name}.log")
            out.append(Cell(a, d, os.path.join(here, a.name, d.name), log, infected, seed))
    return out


def finished(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "summary.json"))


class Failures:
    """``grid_failures.json``: the cells whose last run failed (exit code, the end of the log)."""

    def __init__(self, root: str):
        self.path = os.path.join(root, "grid_failures.json")
        self.items = json.load(open(self.path)) if os.path.exists(self.path) else {}
        self.lock = threading.Lock()  # cells finish on several worker threads at once

    def set(self, cell: Cell, rc: int | None, tail: str) -> None:
        with self.lock:
            self._set(cell, rc, tail)

    def _set(self, cell: Cell, rc: int | None, tail: str) -> None:
        if rc is None:
            self.items.pop(cell.name, None)
        else:
            self.items[cell.name] = {"rc": rc, "log": cell.log, "tail": tail, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self.path + ".tmp"
        os.makedirs(os.path.dirname(self.path), exist_ok=True)  # another seed's folder may not exist yet
        with open(tmp, "w") as f:
            json.dump(self.items, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)


def run_cell(cell: Cell, preset: Preset, dataset: str, threads: int, runner) -> int:
    os.makedirs(os.path.dirname(cell.log), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = cell.command(preset, dataset)
    t0 = time.time()
    print(f"[grid] {cell.name}: start", flush=True)
    rc = runner(cmd, env, cell.log)
    print(f"[grid] {cell.name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f}s", flush=True)
    return rc


def subprocess_runner(cmd: list, env: dict, log: str) -> int:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def log_tail(path: str, lines: int = 8) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of ``jobs`` processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


def run_grid(preset: Preset, dataset: str, root: str, jobs: int = 1, runner=subprocess_runner,
             only: tuple = (), seed: int = 0) -> dict:
    """Run every unfinished cell (attacks first, each defense once its attack is done); returns {cell: status}.

    ``only``: shell patterns of cell names (``attack/defense``, e.g. ``*/attack`` or ``patch-*/pud``) to run.
    ``seed`` N > 0: the defenses with ``--seed N`` in ``seed_root(root, N)`` on the infected models of ``root``
    (which are not run here: their defenses fail until the seed-0 grid has them)."""
    every = cells_of(preset, dataset, root, seed)
    chosen = {c.name for c in every if not only or any(fnmatch.fnmatch(c.name, p) for p in only)}
    needed = {c.attack.name for c in every if c.name in chosen}  # a chosen cell needs its attack, only its attack
    cells = [c for c in every if c.name in chosen or (c.defense is None and c.attack.name in needed)]
    failures = Failures(seed_root(root, seed))
    threads = threads_per_job(jobs)
    status = {c.name: "done" for c in cells if finished(c.folder)}

    def one(cell: Cell) -> None:
        if cell.name in status:
            return
        if cell.borrowed:  # seed 0's infected model, not this grid's to run
            status[cell.name] = "not run"
            return
        if cell.defense is not None and not cell.defense.retrain and status.get(f"{cell.attack.name}/attack") != "done":
            status[cell.name] = "failed"
            failures.set(cell, -1, f"its attack {cell.attack.name} did not finish"
                         + (f" (the seed-0 grid in {root} must have it)" if seed else ""))
            return
        rc = run_cell(cell, preset, dataset, threads, runner)
        ok = rc == 0 and finished(cell.folder)
        status[cell.name] = "done" if ok else "failed"
        failures.set(cell, None if ok else rc, "" if ok else log_tail(cell.log))

    attacks = [c for c in cells if c.defense is None]
    defenses = [c for c in cells if c.defense is not None]
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        list(pool.map(one, attacks))
        list(pool.map(one, defenses))
    return status


# ----- the second pass: AutoAttack ----------------------------------------------------------------------------

def autoattack_cell(folder: str, images: int, threads: int = 1) -> dict:
    """AutoAttack (reference strength, L-inf 8/255) on ``images`` seeded test images of one finished cell's model,
    written to its ``autoattack.json`` (the same images for every cell of a preset: the run's seed and
    ``--test_subset`` pick them); returns what was written."""
    import torch

    from models.speed import SpeedSettings
    from utils.autoattack import autoattack_accuracy
    from utils.data.build import DataSource
    from utils.defenses.infected import DefenseInput, load_infected, read_infected
    from utils.run.checkpoint import atomic_write

    src = read_infected(DefenseInput(model_path=os.path.join(folder, "model.pt")), DataSource())
    args = src.meta["args"]  # the run's own data settings: the same seeded test images as the cell
    source = DataSource(data_root=args["data_root"], download="never", num_workers=0, test_subset=args["test_subset"])
    inf = load_infected(src, source, SpeedSettings(channels_last="off"), torch.device("cpu"))
    t1 = time.time()
    res = autoattack_accuracy(inf.model, inf.test, eps=8 / 255, n_images=images, seed=args["seed"],
                              num_threads=threads)
    res["autoattack_eval"]["seconds"] = round(time.time() - t1, 1)
    out = os.path.join(folder, "autoattack.json")
    atomic_write(out, lambda tmp: open(tmp, "w").write(json.dumps(res, indent=2, sort_keys=True) + "\n"))
    return res


def autoattack_pass(preset: Preset, dataset: str, root: str, images: int, jobs: int = 1,
                    runner=subprocess_runner, seed: int = 0) -> float:
    """AutoAttack on ``images`` seeded test images of every finished cell without ``autoattack.json``, ``jobs``
    cells at a time (each its own process, as the cells themselves run: ``--autoattack_cell``); seconds."""
    t0 = time.time()
    pending = [c for c in cells_of(preset, dataset, root, seed)
               if finished(c.folder) and not os.path.exists(os.path.join(c.folder, "autoattack.json"))]
    threads = threads_per_job(jobs)

    def one(cell: Cell) -> None:
        log = cell.log[:-len(".log")] + "-autoattack.log"
        cmd = [sys.executable, "-m", "benchmarks.grid", "--autoattack", str(images), "--autoattack_cell", cell.folder,
               "--threads", str(threads)]
        t1 = time.time()
        rc = runner(cmd, dict(os.environ, OMP_NUM_THREADS=str(threads)), log)
        out = os.path.join(cell.folder, "autoattack.json")
        if rc == 0 and os.path.exists(out):
            acc = json.load(open(out))["autoattack_acc"]
            print(f"[grid] {cell.name}: AutoAttack {acc:.3f} on {images} images in {time.time() - t1:.0f}s", flush=True)
        else:
            print(f"[grid] {cell.name}: AutoAttack FAILED (exit {rc}; log {log})", flush=True)

    os.makedirs(os.path.join(seed_root(root, seed), "logs"), exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        list(pool.map(one, pending))
    return time.time() - t0


def record_run(root: str, what: str, seconds: float, jobs: int, cells: int) -> None:
    """Append one grid invocation's wall time to ``grid_runs.jsonl`` (the README note sums them)."""
    os.makedirs(root, exist_ok=True)
    rec = {"what": what, "seconds": round(seconds, 1), "jobs": jobs, "cells": cells, "cpus": os.cpu_count(),
           "end": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(root, "grid_runs.jsonl"), "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def recorded_runs(root: str) -> list:
    path = os.path.join(root, "grid_runs.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


# ----- the table and the figure -------------------------------------------------------------------------------

COLUMNS = ("cell", "defense", "acc", "asr", "asr_late_max", "ra", "aa", "tca", "det_precision", "det_recall", "seconds",
           "misses")
HEADERS = {"cell": "attack", "defense": "defense", "acc": "ACC %", "asr": "ASR %", "asr_late_max": "ASR late max %",
           "ra": "RA % (PGD-20)", "aa": "RA % (AutoAttack)", "tca": "target-class ACC %",
           "det_precision": "det. precision %", "det_recall": "det. recall %", "seconds": "seconds",
           "misses": "misses"}
# A defended cell meets the targets when: ASR and its late maximum <= 10 %, ACC at most 5 points below the
# infected model's, RA above it, target-class ACC at most 10 points below it (all2one), detection precision
# >= 80 % where the defense identifies poisons. ``misses`` names the ones it does not meet.
TARGETS = (("ASR", lambda r, inf: r["asr"] is None or r["asr"] <= 0.10),
           ("late ASR", lambda r, inf: r["asr_late_max"] is None or r["asr_late_max"] <= 0.10),
           ("ACC", lambda r, inf: r["acc"] >= inf["acc"] - 0.05),
           ("RA", lambda r, inf: r["ra"] is None or inf["ra"] is None or r["ra"] > inf["ra"]),
           ("target ACC", lambda r, inf: r["tca"] is None or inf["tca"] is None or r["tca"] >= inf["tca"] - 0.10),
           ("precision", lambda r, inf: r["det_precision"] is None or r["det_precision"] >= 0.8))


def misses(row: dict, infected: dict | None) -> str | None:
    """The targets a defended cell misses ("" = meets all; None for the attack row, a reference row (``retrain``,
    the clean model) or a cell not finished)."""
    if (row["defense"] == "none" or row.get("reference") or row["status"] != "done" or not infected
            or infected["status"] != "done"):
        return None
    return ", ".join(name for name, ok in TARGETS if not ok(row, infected))


def table_rows(preset: Preset, dataset: str, root: str, seed: int = 0) -> list:
    from utils.report import read_run

    failures = Failures(seed_root(root, seed)).items
    rows = []
    for cell in cells_of(preset, dataset, root, seed):
        row = {k: None for k in COLUMNS}
        row.update(cell=cell.attack.name, defense=cell.defense.name if cell.defense else "none",
                   reference=bool(cell.defense and cell.defense.retrain))
        if finished(cell.folder):
            run = read_run(cell.folder)
            summary = json.load(open(os.path.join(cell.folder, "summary.json")))
            final = summary["final"]
            row.update({k: run[k] for k in ("acc", "asr", "ra", "det_precision", "det_recall", "seconds")})
            row["tca"] = final.get("target_class_acc")
            row["asr_late_max"] = summary.get("asr_late_max")
            aa = final.get("autoattack_acc")
            aa_file = os.path.join(cell.folder, "autoattack.json")
            if aa is None and os.path.exists(aa_file):
                aa = json.load(open(aa_file))["autoattack_acc"]
            row["aa"] = aa
            row["status"] = "done"
        else:
            row["status"] = "failed" if cell.name in failures else "not run"
        rows.append(row)
    infected = {r["cell"]: r for r in rows if r["defense"] == "none"}
    for cell in cells_of(preset, dataset, root, seed):  # an attack run measures no RA: its defenses' "before" is it
        inf = infected[cell.attack.name]
        if cell.defense is not None and inf["ra"] is None and finished(cell.folder):
            before = json.load(open(os.path.join(cell.folder, "summary.json"))).get("initial", {})
            inf["ra"] = before.get("robust_acc")
    for r in rows:
        r["misses"] = misses(r, infected.get(r["cell"]))
    return rows


def _cell_text(row: dict, key: str, percent: bool) -> str:
    v = row[key]
    if key in ("cell", "defense"):
        return str(v) + ("" if row["status"] == "done" or key == "cell" else f" ({row['status'].upper()})")
    if v is None:
        return "–" if percent and key != "misses" else ""
    if key == "misses":
        return v if v or not percent else "none"
    if key == "seconds":
        return f"{v:.0f}" if percent else f"{v:g}"
    return f"{100 * v:.1f}" if percent else f"{v:.6g}"


def markdown(rows: list) -> str:
    lines = ["| " + " | ".join(HEADERS[k] for k in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell_text(r, k, True) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list) -> str:
    import csv
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([*COLUMNS, "status"])
    for r in rows:
        w.writerow([*(_cell_text(r, k, False) for k in COLUMNS), r["status"]])
    return out.getvalue()


def heatmap(rows: list, path: str, title: str) -> None:
    """ASR, ACC and RA per cell (attack x defense); failed cells crossed, cells not run blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = list(dict.fromkeys(r["cell"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(3.2 + 1.1 * len(defenses) * 3, 1.2 + 0.45 * len(attacks)), squeeze=False)
    for ax, (key, name, cmap) in zip(axes[0], (("asr", "ASR", "Reds"), ("acc", "clean accuracy", "Greens"),
                                               ("ra", "robust accuracy (PGD-20)", "Blues"))):
        grid = np.full((len(attacks), len(defenses)), np.nan)
        for r in rows:
            i, j = attacks.index(r["cell"]), defenses.index(r["defense"])
            if r["status"] == "done" and r[key] is not None:
                grid[i, j] = r[key]
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for r in rows:
            i, j = attacks.index(r["cell"]), defenses.index(r["defense"])
            if r["status"] == "failed":
                ax.text(j, i, "failed", ha="center", va="center", fontsize=7, color="black", weight="bold")
            elif r["status"] == "done" and r[key] is not None:
                ax.text(j, i, f"{100 * r[key]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if r[key] > 0.6 else "black")
        ax.set_xticks(range(len(defenses)), defenses, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
        ax.set_title(f"{name} (%)", fontsize=10)
        ax.set_xlabel("defense")
        ax.set_ylabel("attack (trigger-mode)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


README_START = "<!-- grid {key}: written by python -m benchmarks.grid {args} --readme README.md -->"
README_END = "<!-- /grid {key} -->"


def write_readme(path: str, key: str, args: str, text: str) -> None:
    """Put ``text`` between the grid's markers for ``key`` in ``path`` (appended at the end the first time)."""
    start, end = README_START.format(key=key, args=args), README_END.format(key=key)
    with open(path) as f:
        doc = f.read()
    head = doc.find(f"<!-- grid {key}:")
    block = f"{start}\n{text.rstrip()}\n{end}"
    if head >= 0 and end in doc[head:]:
        doc = doc[:head] + block + doc[doc.index(end, head) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(doc)
    os.replace(path + ".tmp", path)


def write_outputs(preset: Preset, dataset: str, root: str, seed: int = 0) -> list:
    rows = table_rows(preset, dataset, root, seed)
    title = f"{preset.name} grid, {dataset}" + (f", defenses' seed {seed}" if seed else "")
    root = seed_root(root, seed)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "grid.md"), "w") as f:
        f.write(markdown(rows))
    with open(os.path.join(root, "grid.csv"), "w") as f:
        f.write(to_csv(rows))
    heatmap(rows, os.path.join(root, "grid.png"), title)
    return rows


SEED_COLUMNS = ("acc", "asr", "asr_late_max", "ra", "tca", "det_precision")


def seeds_markdown(preset: Preset, dataset: str, root: str, seeds: tuple) -> str:
    """Every defense row over the defenses' ``seeds`` (each figure ``seed a / seed b / ...``; the infected models
    are seed 0's for all), with the targets each seed misses and how many seeds meet every one."""
    tables = [{(r["cell"], r["defense"]): r for r in table_rows(preset, dataset, root, seed)} for seed in seeds]
    head = ["attack", "defense", *(HEADERS[k] for k in SEED_COLUMNS), "misses", "seeds meeting every target"]
    lines = [f"Defenses' seeds {', '.join(map(str, seeds))} (figures in that order) on seed 0's infected models.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, first in tables[0].items():
        if first["defense"] == "none":
            continue
        rows = [t.get(key) for t in tables]
        done = [r for r in rows if r is not None and r["status"] == "done"]

        def each(k, sep=" / "):  # "·": that seed's run is not finished
            return sep.join("·" if r is None or r["status"] != "done" else _cell_text(r, k, True) for r in rows)

        judged = [r["misses"] for r in done if r["misses"] is not None]  # None: a reference row
        met = f"{judged.count('')} of {len(judged)}" if judged else "–"
        cells = [*key, *(each(k) for k in SEED_COLUMNS), each("misses", "; ") if judged else "–", met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_root(preset: str, dataset: str) -> str:
    return os.path.join(ROOT, "runs", f"grid-{preset}-{dataset}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grid", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    p.add_argument("--dataset", default=None, help="the preset's dataset (quick: synthetic; paper: cifar10, gtsrb, "
                                                   "imagenet; default: the preset's first)")
    p.add_argument("--root", default=None, help="where the run folders go (default: runs/grid-<preset>-<dataset>)")
    p.add_argument("--seed", type=int, default=0,
                   help="run the defenses with --seed N on the infected models of --root, in <root>-seed<N> (0: the "
                        "grid itself, attacks and clean-model references included)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                   help="only the table of every defense row over these defenses' seeds (e.g. 0 1 2), from their "
                        "folders; with --readme also there")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (each gets cores/jobs threads)")
    p.add_argument("--autoattack", type=int, default=0, metavar="N",
                   help="then AutoAttack on N seeded test images of every finished cell (0: no; at least 200 for "
                        "the published table)")
    p.add_argument("--autoattack_only", action="store_true",
                   help="with --autoattack: run no cell, only the AutoAttack pass on the finished ones (safe beside "
                        "other runs in the folder: unfinished cells are left to them)")
    p.add_argument("--autoattack_cell", default=None, metavar="FOLDER",
                   help="only AutoAttack of this one finished cell (what the pass runs per cell)")
    p.add_argument("--threads", type=int, default=1, help="with --autoattack_cell: torch threads")
    p.add_argument("--only", nargs="+", default=(), metavar="PATTERN",
                   help="run only the cells matching these patterns (and their attacks), e.g. '*/attack' 'patch-*/pud'")
    p.add_argument("--report_only", action="store_true", help="only rebuild the table and the figure")
    p.add_argument("--readme", default=None, metavar="PATH",
                   help="also put the table between this file's grid markers (the README's results)")
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    a.dataset = a.dataset or next(iter(preset.datasets))
    if a.dataset not in preset.datasets:
        p.error(f"the {a.preset} preset has no dataset '{a.dataset}'; choose one of {', '.join(preset.datasets)}")
    a.root = os.path.abspath(a.root or default_root(a.preset, a.dataset))
    if a.autoattack_only and not a.autoattack:
        p.error("--autoattack_only needs --autoattack N")
    if a.seed < 0 or any(n < 0 for n in a.seeds or ()):
        p.error("seeds must be >= 0")
    return a


def _grid_args(a: argparse.Namespace) -> str:
    """The command-line arguments that name this grid (for the README's markers)."""
    return (f"--preset {a.preset} --dataset {a.dataset}"
            + (f" --root {os.path.relpath(a.root, ROOT)}" if a.root != default_root(a.preset, a.dataset) else ""))


def seeds_report(preset: Preset, a: argparse.Namespace) -> int:
    """``--seeds``: the defense rows over several seeds' folders, to ``<root>/grid_seeds.md`` (and the README)."""
    seeds = tuple(dict.fromkeys(a.seeds))
    text = seeds_markdown(preset, a.dataset, a.root, seeds)
    out = os.path.join(a.root, "grid_seeds.md")
    os.makedirs(a.root, exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    if a.readme:
        folders = ", ".join(f"`{os.path.relpath(seed_root(a.root, n), ROOT)}`" for n in seeds)
        write_readme(a.readme, f"{a.preset}-{a.dataset}-seeds", _grid_args(a) + " --seeds " + " ".join(map(str, seeds)),
                     text + f"\nFrom {folders}; table: `{os.path.relpath(out, ROOT)}`.\n")
    print(f"[grid] table over seeds {', '.join(map(str, seeds))}: {out}")
    return 0


def main(argv=None) -> int:
    a = parse(argv)
    if a.autoattack_cell:
        autoattack_cell(os.path.abspath(a.autoattack_cell), a.autoattack or 200, a.threads)
        return 0
    preset = PRESETS[a.preset]
    if a.seeds:
        return seeds_report(preset, a)
    here = seed_root(a.root, a.seed)  # this run's folder
    t0 = time.time()
    if not a.report_only and not a.autoattack_only:
        before = {c.name for c in cells_of(preset, a.dataset, a.root, a.seed) if finished(c.folder)}
        status = run_grid(preset, a.dataset, a.root, a.jobs, only=tuple(a.only), seed=a.seed)
        ran = sum(1 for n, s in status.items() if s == "done" and n not in before)
        print(f"[grid] {sum(s == 'done' for s in status.values())} of {len(status)} cells done in "
              f"{time.time() - t0:.0f}s", flush=True)
        if ran:
            record_run(here, "cells", time.time() - t0, a.jobs, ran)
    if a.autoattack and not a.report_only:
        seconds = autoattack_pass(preset, a.dataset, a.root, a.autoattack, a.jobs, seed=a.seed)
        print(f"[grid] AutoAttack pass: {seconds:.0f}s", flush=True)
        record_run(here, f"autoattack {a.autoattack}", seconds, a.jobs, 0)
    rows = write_outputs(preset, a.dataset, a.root, a.seed)
    sys.stdout.write(markdown(rows))
    if a.readme:
        done = [r for r in rows if r["status"] == "done"]
        total = sum(r["seconds"] or 0 for r in done)
        runs = recorded_runs(here)
        walls = {what: sum(r["seconds"] for r in runs if r["what"].split()[0] == what) for what in ("cells", "autoattack")}
        wall = (f"; wall time of the grid runs that made them: {walls['cells'] / 60:.0f} min for the cells"
                + (f", {walls['autoattack'] / 60:.0f} min for the AutoAttack pass" if walls["autoattack"] else "")
                + f" (`--jobs {runs[-1]['jobs']}` on {runs[-1]['cpus']} CPUs, `grid_runs.jsonl`)") if runs else ""
        note = (f"\n{len(done)} of {len(rows)} cells finished; the cells' own seconds sum to {total / 60:.0f} min"
                f"{wall}. Table: `{os.path.relpath(os.path.join(here, 'grid.md'), ROOT)}`, "
                f"figure: `{os.path.relpath(os.path.join(here, 'grid.png'), ROOT)}`.\n")
        write_readme(a.readme, f"{a.preset}-{a.dataset}" + (f"-seed{a.seed}" if a.seed else ""),
                     _grid_args(a) + (f" --seed {a.seed}" if a.seed else ""), markdown(rows) + note)
    print(f"[grid] table: {os.path.join(here, 'grid.md')} (and .csv); figure: {os.path.join(here, 'grid.png')}")
    return 0 if all(r["status"] == "done" for r in rows) or a.report_only or a.autoattack_only else 1


if __name__ == "__main__":
    sys.exit(main())
