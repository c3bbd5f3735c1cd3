"""The grid's table and figure, rebuilt from the run folders: one row per cell, the targets each defended
cell misses, markdown / CSV / heatmap, the README block, and the tables of the rows over the defenses' seeds or
over the infected models of several attack seeds."""
from __future__ import annotations

import json
import os

from benchmarks.grid_cells import Failures, Preset, attack_root, cells_of, finished, seed_root, with_attack_seed

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


README_START = "<!-- grid {key}: written by python -m benchmarks.grid {args} --readme {path} -->"
README_END = "<!-- /grid {key} -->"


def write_readme(path: str, key: str, args: str, text: str) -> None:
    """Put ``text`` between the grid's markers for ``key`` in ``path`` (appended at the end the first time). The
    start marker is the command that rewrites the block, ``--readme`` as given (the README, or a page of docs/)."""
    start, end = README_START.format(key=key, args=args, path=path), README_END.format(key=key)
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


def seeds_markdown(preset: Preset, dataset: str, root: str, seeds: tuple, attack_seed: int = 0) -> str:
    """Every defense row over the defenses' ``seeds`` (each figure ``seed a / seed b / ...``; the infected models
    are the same for all, trained with ``attack_seed``), with the targets each seed misses and how many seeds meet
    every one."""
    tables = [table_rows(preset, dataset, root, seed) for seed in seeds]
    return runs_markdown(tables, f"Defenses' seeds {', '.join(map(str, seeds))} (figures in that order) on the "
                                 f"infected models of attack seed {attack_seed}.", infected=False)


def attack_seeds_markdown(preset: Preset, dataset: str, root: str, attack_seeds: tuple, seed: int = 0) -> str:
    """Every row over the infected models of ``attack_seeds`` (the grids at ``attack_root(root, n)``), the defenses
    with their ``seed``: each figure ``attack seed a / b / ...``, the infected rows included (they differ)."""
    tables = [table_rows(with_attack_seed(preset, n), dataset, attack_root(root, n), seed) for n in attack_seeds]
    return runs_markdown(tables, f"Infected models of attack seeds {', '.join(map(str, attack_seeds))} (figures in "
                                 f"that order), the defenses with seed {seed}.", infected=True)


def runs_markdown(tables: list, title: str, infected: bool) -> str:
    """One row per (attack, defense) of ``tables[0]`` with each table's figure (``a / b / ...``; "·" where that
    table's run is not finished), the targets each misses and how many meet every one."""
    tables = [{(r["cell"], r["defense"]): r for r in rows} for rows in tables]
    head = ["attack", "defense", *(HEADERS[k] for k in SEED_COLUMNS), "misses", "seeds meeting every target"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, first in tables[0].items():
        if first["defense"] == "none" and not infected:
            continue
        rows = [t.get(key) for t in tables]
        done = [r for r in rows if r is not None and r["status"] == "done"]

        def each(k, sep=" / "):  # "·": that run is not finished
            return sep.join("·" if r is None or r["status"] != "done" else _cell_text(r, k, True) for r in rows)

        judged = [r["misses"] for r in done if r["misses"] is not None]  # None: an attack or a reference row
        met = f"{judged.count('')} of {len(judged)}" if judged else "–"
        cells = [*key, *(each(k) for k in SEED_COLUMNS), each("misses", "; ") if judged else "–", met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
