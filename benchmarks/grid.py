"""The papers' experiment grid as one command: attacks x defenses over triggers and modes; one table, one figure.

    python -m benchmarks.grid --preset quick                       # synthetic set, cnn: a 2-core CPU
    python -m benchmarks.grid --preset quick --autoattack 200      # then AutoAttack on 200 seeded test images
    python -m benchmarks.grid --preset quick --autoattack 200 --autoattack_only   # only that pass, no cell
    python -m benchmarks.grid --preset paper --dataset cifar10     # a GPU: PreActResNet18, the papers' schedules
    python -m benchmarks.grid --preset quick --report_only         # table and figure from the run folders
    python -m benchmarks.grid --preset quick --attack_seed 1       # the grid again on other infected models
    python -m benchmarks.grid --preset quick --attack_seeds 0 1    # every row over both infected models

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
import time
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):  # run as a file: re-run as the module from the repository root
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks.grid", *sys.argv[1:]], cwd=root))

from benchmarks.grid_cells import (PRESETS, ROOT, Cell, Failures, Preset, cells_of, default_root,  # noqa: E402
                                   attack_root, finished, seed_root, with_attack_seed)
from benchmarks.grid_table import (attack_seeds_markdown, markdown, seeds_markdown, write_outputs,  # noqa: E402
                                   write_readme)


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
    """Run every unfinished cell (attacks first, each defense once its attack is done, a clean-model row after the
    row whose clean training it shares); returns {cell: status}.

    ``only``: shell patterns of cell names (``attack/defense``, e.g. ``*/attack`` or ``patch-*/pud``) to run.
    ``seed`` N > 0: the defenses with ``--seed N`` in ``seed_root(root, N)`` on the infected models of ``root``
    (which are not run here: their defenses fail until the seed-0 grid has them)."""
    every = cells_of(preset, dataset, root, seed)
    chosen = {c.name for c in every if not only or any(fnmatch.fnmatch(c.name, p) for p in only)}
    # a chosen defense needs its attack, only its attack; a reference row that trains the attack again needs none
    needed = {c.attack.name for c in every if c.name in chosen and not (c.defense and c.defense.retrain)}
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

    # attacks, then their defenses; last the clean-model rows that score another row's clean training (a row whose
    # training did not finish trains its own)
    phases = ([c for c in cells if c.defense is None], [c for c in cells if c.defense is not None and not c.clean_from],
              [c for c in cells if c.clean_from])
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        for phase in phases:
            list(pool.map(one, phase))
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
    pending = [c for c in cells_of(preset, dataset, root, seed)  # another seed's infected models: seed 0's pass
               if finished(c.folder) and not c.borrowed
               and not os.path.exists(os.path.join(c.folder, "autoattack.json"))]
    threads = threads_per_job(jobs)

    def one(cell: Cell) -> None:
        if shared_autoattack(cell, images):
            return
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
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:  # a row sharing a clean training after its owner
        for phase in ([c for c in pending if not c.clean_from], [c for c in pending if c.clean_from]):
            list(pool.map(one, phase))
    return time.time() - t0


def shared_autoattack(cell: Cell, images: int) -> bool:
    """A clean-model row that scored another row's weights (``--clean_model_from``) takes that row's AutoAttack
    figure on the same ``images`` (the same weights and seeded images: the trigger plays no part); False if there
    is none to take."""
    if not cell.clean_from:
        return False
    source = os.path.join(cell.clean_from, "autoattack.json")
    summary = json.load(open(os.path.join(cell.folder, "summary.json")))
    if summary.get("clean_model_from") != os.path.join(cell.clean_from, "model.pt") or not os.path.exists(source):
        return False
    res = json.load(open(source))
    if res["autoattack_eval"].get("images") != images:
        return False
    from utils.run.checkpoint import atomic_write

    res["autoattack_eval"] = {**res["autoattack_eval"], "shared_from": cell.clean_from}
    atomic_write(os.path.join(cell.folder, "autoattack.json"),  # as autoattack_cell writes it
                 lambda tmp: open(tmp, "w").write(json.dumps(res, indent=2, sort_keys=True) + "\n"))
    print(f"[grid] {cell.name}: AutoAttack {res['autoattack_acc']:.3f}, the figure of {cell.clean_from} (the same "
          "weights and images)", flush=True)
    return True


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


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grid", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    p.add_argument("--dataset", default=None, help="the preset's dataset (quick: synthetic; paper: cifar10, gtsrb, "
                                                   "imagenet; default: the preset's first)")
    p.add_argument("--root", default=None, help="where the run folders go (default: runs/grid-<preset>-<dataset>)")
    p.add_argument("--seed", type=int, default=0,
                   help="run the defenses with --seed N on the infected models of --root, in <root>-seed<N> (0: the "
                        "grid itself, attacks and clean-model references included)")
    p.add_argument("--attack_seed", type=int, default=0, metavar="N",
                   help="the grid on infected models trained with --seed N (another trigger pattern, poisoned images, "
                        "initial weights and test images; the same data), in <root>-attack<N>")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                   help="only the table of every defense row over these defenses' seeds (e.g. 0 1 2), from their "
                        "folders; with --readme also there")
    p.add_argument("--attack_seeds", type=int, nargs="+", default=None, metavar="N",
                   help="only the table of every row over the infected models of these attack seeds (e.g. 0 1), "
                        "the defenses with --seed; from <root> and <root>-attack<N>; with --readme also there")
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
    a.grid = attack_root(a.root, a.attack_seed)  # this grid's folder: --root itself for attack seed 0
    if a.autoattack_only and not a.autoattack:
        p.error("--autoattack_only needs --autoattack N")
    if a.seed < 0 or a.attack_seed < 0 or any(n < 0 for n in (*(a.seeds or ()), *(a.attack_seeds or ()))):
        p.error("seeds must be >= 0")
    return a


def _grid_args(a: argparse.Namespace) -> str:
    """The command-line arguments that name this grid (for the README's markers)."""
    return (f"--preset {a.preset} --dataset {a.dataset}" + (f" --attack_seed {a.attack_seed}" if a.attack_seed else "")
            + (f" --root {os.path.relpath(a.root, ROOT)}" if a.root != default_root(a.preset, a.dataset) else ""))


def _readme_key(a: argparse.Namespace, *rest: str) -> str:
    """The README block's name: preset, dataset, the attack seed if any, then ``rest``."""
    return "-".join((a.preset, a.dataset, *((f"attack{a.attack_seed}",) if a.attack_seed else ()), *rest))


def seeds_report(preset: Preset, a: argparse.Namespace) -> int:
    """``--seeds``: the defense rows over several seeds' folders, to ``<root>/grid_seeds.md`` (and the README)."""
    seeds = tuple(dict.fromkeys(a.seeds))
    return _table_report(a, seeds_markdown(preset, a.dataset, a.grid, seeds, a.attack_seed),
                         os.path.join(a.grid, "grid_seeds.md"), _readme_key(a, "seeds"),
                         _grid_args(a) + " --seeds " + " ".join(map(str, seeds)),
                         [seed_root(a.grid, n) for n in seeds], f"seeds {', '.join(map(str, seeds))}")


def attack_seeds_report(a: argparse.Namespace) -> int:
    """``--attack_seeds``: every row over several attack seeds' grids, to ``<root>/grid_attack_seeds.md`` (and the
    README)."""
    seeds = tuple(dict.fromkeys(a.attack_seeds))
    seed = (f"seed{a.seed}",) if a.seed else ()
    return _table_report(a, attack_seeds_markdown(PRESETS[a.preset], a.dataset, a.root, seeds, a.seed),
                         os.path.join(seed_root(a.root, a.seed), "grid_attack_seeds.md"),
                         "-".join((a.preset, a.dataset, "attack-seeds", *seed)),
                         _grid_args(a) + (f" --seed {a.seed}" if a.seed else "") + " --attack_seeds "
                         + " ".join(map(str, seeds)),
                         [seed_root(attack_root(a.root, n), a.seed) for n in seeds],
                         f"attack seeds {', '.join(map(str, seeds))}")


def _table_report(a: argparse.Namespace, text: str, out: str, key: str, args: str, folders: list, what: str) -> int:
    """Write a table over several grids' folders to ``out``, stdout and (``--readme``) its block."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    if a.readme:
        names = ", ".join(f"`{os.path.relpath(folder, ROOT)}`" for folder in folders)
        write_readme(a.readme, key, args, text + f"\nFrom {names}; table: `{os.path.relpath(out, ROOT)}`.\n")
    print(f"[grid] table over {what}: {out}")
    return 0


def main(argv=None) -> int:
    a = parse(argv)
    if a.autoattack_cell:
        autoattack_cell(os.path.abspath(a.autoattack_cell), a.autoattack or 200, a.threads)
        return 0
    if a.attack_seeds:
        return attack_seeds_report(a)
    preset = with_attack_seed(PRESETS[a.preset], a.attack_seed)
    if a.seeds:
        return seeds_report(preset, a)
    here = seed_root(a.grid, a.seed)  # this run's folder
    t0 = time.time()
    if not a.report_only and not a.autoattack_only:
        before = {c.name for c in cells_of(preset, a.dataset, a.grid, a.seed) if finished(c.folder)}
        status = run_grid(preset, a.dataset, a.grid, a.jobs, only=tuple(a.only), seed=a.seed)
        ran = sum(1 for n, s in status.items() if s == "done" and n not in before)
        print(f"[grid] {sum(s == 'done' for s in status.values())} of {len(status)} cells done in "
              f"{time.time() - t0:.0f}s", flush=True)
        if ran:
            record_run(here, "cells", time.time() - t0, a.jobs, ran)
    if a.autoattack and not a.report_only:
        seconds = autoattack_pass(preset, a.dataset, a.grid, a.autoattack, a.jobs, seed=a.seed)
        print(f"[grid] AutoAttack pass: {seconds:.0f}s", flush=True)
        record_run(here, f"autoattack {a.autoattack}", seconds, a.jobs, 0)
    rows = write_outputs(preset, a.dataset, a.grid, a.seed)
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
        write_readme(a.readme, _readme_key(a, *((f"seed{a.seed}",) if a.seed else ())),
                     _grid_args(a) + (f" --seed {a.seed}" if a.seed else ""), markdown(rows) + note)
    print(f"[grid] table: {os.path.join(here, 'grid.md')} (and .csv); figure: {os.path.join(here, 'grid.png')}")
    return 0 if all(r["status"] == "done" for r in rows) or a.report_only or a.autoattack_only else 1


if __name__ == "__main__":
    sys.exit(main())
